"""The process around the app: the listening socket, uvicorn, and a shutdown that honours the deadline.

``listen`` takes the port before anything slow happens, so a port in use or out of range is one line at
once, and the real address (``--port 0`` picks a free one) can be printed. ``Server`` is uvicorn's
server with one change to its shutdown: when SIGINT or SIGTERM arrives, it first drains the app
(stop admitting, let requests in flight finish until ``--shutdown-deadline``, end the rest with a final
chunk and ``[DONE]``), and only then lets uvicorn close connections. uvicorn alone closes the listener,
waits for open connections up to its own timeout and then cancels their tasks mid-stream, while the
engine keeps generating: clients saw tokens past the deadline and a stream with no ``[DONE]``.
"""

from __future__ import annotations

import logging
import signal
import socket
from typing import Any

import uvicorn

from quantdeploy.errors import ConfigError

log = logging.getLogger(__name__)


def listen(host: str, port: int) -> tuple[socket.socket, str]:
    """A bound, listening TCP socket for ``host:port`` and its ``http://`` address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"cannot listen on {host}:{port}: unknown host ({err}); use e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, where = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(where)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port or --host") from None
    sock.set_inheritable(True)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return sock, f"http://{shown}:{bound_port}"


class _Stop(Exception):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown: the server has stopped as asked."""


def _stop(*_: Any) -> None:
    raise _Stop()


class Server(uvicorn.Server):
    """uvicorn's server for one app, draining it at the shutdown signal (see the module docstring)."""

    def __init__(self, app: Any, shutdown_deadline_s: float) -> None:
        # loop/http "auto": uvloop and httptools when installed (the [serve] extra has them); against asyncio
        # and h11, uvicorn's send of one streamed chunk went from ~130 to ~32 µs of interpreter time.
        super().__init__(uvicorn.Config(app, log_level="warning", loop="auto", http="auto",
                                        timeout_graceful_shutdown=int(shutdown_deadline_s) + 5))
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if not self.force_exit:  # a second Ctrl-C skips the drain
            await self.app.state.drain()
        await super().shutdown(sockets)

    def serve_on(self, sock: socket.socket) -> None:
        """Serve until a signal (or ``should_exit``); a signal ends it with a drained, clean stop."""
        previous = signal.signal(signal.SIGTERM, _stop)  # uvicorn re-raises the signal it handled when done
        try:
            self.run(sockets=[sock])
        except (KeyboardInterrupt, _Stop):
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            sock.close()
