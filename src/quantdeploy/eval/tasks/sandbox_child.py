"""The child side of the code sandbox: limits, guards, then the untrusted program (``sandbox.py`` runs it).

Run as ``python -I sandbox_child.py FOLDER PROGRAM TOKEN MEMORY_BYTES CPU_SECONDS``. Before the program's
first line runs, this process:

- sets resource limits: address space (``MEMORY_BYTES``), CPU seconds, files of at most 16 MiB, 64 open
  files, no core dumps;
- installs an audit hook (PEP 578, it cannot be removed from Python) that refuses, with PermissionError:
  opening a file for writing, and creating, removing or renaming a path, outside ``FOLDER``; sockets;
  starting processes (subprocess, os.system, exec, spawn, fork); loading native code through ctypes;
- deletes the token from its environment.

When the program returns, it prints ``TOKEN`` as its last line: the parent counts a run as passed only
when the exit status is 0 and the token came, so a program that calls ``os._exit(0)`` before its checks
is not a pass. The hook is a guard against mistakes and careless code, not a security boundary against
code written to escape it (a Python-level hook can be defeated from native code, which is why ctypes is
refused); ``sandbox.py`` adds the operating-system limits: a new network namespace where the kernel
allows one, a wall-clock timeout that kills the whole process group.
"""

from __future__ import annotations

import os
import resource
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove": 0, "os.rmdir": 0, "os.mkdir": 0, "os.rename": (0, 1), "os.link": (0, 1),
                "os.symlink": (0, 1), "os.truncate": 0, "os.chmod": 0, "os.chown": 0, "shutil.rmtree": 0,
                "os.utime": 0}
_REFUSED_PREFIXES = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
                     "os.system", "os.kill", "os.killpg", "ctypes.", "pty.", "resource.setrlimit")


def _inside(folder: str, path) -> bool:  # noqa: ANN001 - str, bytes, PathLike or a file descriptor
    if isinstance(path, int):
        return True  # an already open descriptor: its opening was checked
    path = os.fsdecode(os.fspath(path))
    full = os.path.realpath(os.path.join(folder, path))
    return full == folder or full.startswith(folder + os.sep)


def guard(folder: str):  # noqa: ANN201 - the audit hook
    folder = os.path.realpath(folder)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & _WRITE_FLAGS)
            if writing and path is not None and not _inside(folder, path):
                raise PermissionError(f"sandbox: writing outside the working folder is refused: {path!r}")
        elif event in _PATH_EVENTS:
            where = _PATH_EVENTS[event]
            for i in (where if isinstance(where, tuple) else (where,)):
                if i < len(args) and not _inside(folder, args[i]):
                    raise PermissionError(f"sandbox: {event} outside the working folder is refused: {args[i]!r}")
        elif event.startswith(_REFUSED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is refused")

    return hook


def main() -> None:
    folder, program, token, memory, cpu = sys.argv[1:6]
    os.environ.pop("QUANTDEPLOY_SANDBOX_TOKEN", None)
    memory, cpu = int(memory), int(cpu)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with open(program, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, program, "exec")
    sys.argv = [program]
    sys.addaudithook(guard(folder))
    exec(code, {"__name__": "__main__", "__file__": program})  # noqa: S102 - running it is the point
    sys.stdout.flush()
    print(f"\n{token}", flush=True)


if __name__ == "__main__":
    main()
