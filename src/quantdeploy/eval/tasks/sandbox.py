"""Run generated code in a separate process with limits: what HumanEval needs to execute model output.

Each program runs in its own Python process (``python -I``: no user site, no ``PYTHON*`` variables),
in a fresh temporary folder that is its working directory and is deleted afterwards, with:

- a wall-clock timeout; at it, the whole process group is killed (``SIGKILL``), children included;
- the resource limits and audit-hook guards of ``sandbox_child.py``: address space (memory), CPU time,
  file size and count; writes, renames and deletions outside its folder, sockets, new processes and
  ctypes refused;
- no network at the operating-system level too where the kernel lets us create a network namespace
  (``unshare -rn``: a user namespace mapping us to root inside, with only a loopback device that is
  down); whether it did is reported in every result (``network_namespace``);
- an environment of ``PATH`` and ``LANG`` only, stdin from ``/dev/null``, output capped at 64 KiB.

What it does not protect against: code written on purpose to escape (the guards are a Python audit
hook; native code could bypass it, which is why ctypes is refused, but a determined attacker with a
native extension already installed could); reading files the user can read (nothing is hidden, only
writes are refused); using the CPU and memory up to the limits. Run untrusted models' code on a machine
or container you can throw away, as HumanEval's own authors advise.

The evaluator itself never executes the code: a program that crashes, loops, exhausts memory or is
killed yields a result (``passed=False`` with the reason), never an exception in the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = Path(__file__).with_name("sandbox_child.py")
_OUTPUT_CAP = 64 << 10


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    network_namespace: bool = True  # use one where the kernel allows it


@dataclasses.dataclass(frozen=True)
class RunResult:
    passed: bool
    reason: str  # passed | failed | timeout | killed:SIGNAL | exited-early
    exit_code: int | None
    output: str  # stdout and stderr, capped
    network_namespace: bool


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether ``unshare -rn`` works here (a user namespace with its own network)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        done = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run ``source`` as a Python program under ``limits``; see the module docstring."""
    folder = Path(tempfile.mkdtemp(prefix="quantdeploy-sandbox-"))
    try:
        program = folder / "program.py"
        program.write_text(source, encoding="utf-8")
        token = secrets.token_hex(16)
        cpu = max(1, int(limits.timeout_s) + 1)
        cmd = [sys.executable, "-I", str(_CHILD), str(folder), str(program), token,
               str(limits.memory_mb << 20), str(cpu)]
        netns = limits.network_namespace and network_namespace_available()
        if netns:
            cmd = [shutil.which("unshare") or "unshare", "-rn", *cmd]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=limits.timeout_s)
            reason = None
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            reason = "timeout"
        finally:
            _kill_group(proc)  # anything the program left running in its group
        text = out[:_OUTPUT_CAP].decode("utf-8", "replace")
        code = proc.returncode
        if reason is None:
            if code is not None and code < 0:
                reason = f"killed:{signal.Signals(-code).name}"
            elif code == 0 and text.rstrip().endswith(token):
                reason = "passed"
            elif code == 0:
                reason = "exited-early"
            else:
                reason = "failed"
        return RunResult(reason == "passed", reason, code, text.replace(token, "").rstrip(), netns)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
