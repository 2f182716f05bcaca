"""The code sandbox: generated code that loops, allocates, writes outside its folder, opens sockets or
starts processes is stopped or contained, and the evaluator carries on."""

from pathlib import Path

import pytest

from quantdeploy.eval.tasks.sandbox import SandboxLimits, network_namespace_available, run_program

LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=256)


def test_a_correct_program_passes_and_sees_only_its_own_folder():
    r = run_program("import os\nopen('scratch.txt', 'w').write('x')\nprint(sorted(os.listdir('.')))", LIMITS)
    assert r.passed and r.reason == "passed" and "scratch.txt" in r.output and "program.py" in r.output


def test_a_failing_assertion_fails_with_its_traceback():
    r = run_program("def f():\n    return 1\nassert f() == 2", LIMITS)
    assert not r.passed and r.reason == "failed" and "AssertionError" in r.output


def test_an_endless_loop_is_killed_at_the_timeout_and_the_evaluator_goes_on():
    r = run_program("while True:\n    pass", SandboxLimits(timeout_s=1.0, memory_mb=256))
    assert not r.passed and r.reason == "timeout"
    assert run_program("assert 1 + 1 == 2", LIMITS).passed


def test_forking_is_refused():
    r = run_program("import os\nos.fork()\nwhile True: pass", SandboxLimits(timeout_s=1.0, memory_mb=256))
    assert not r.passed and "os.fork is refused" in r.output


def test_unbounded_allocation_hits_the_memory_limit():
    r = run_program("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))", LIMITS)
    assert not r.passed and r.reason in ("failed", "killed:SIGKILL") and "MemoryError" in r.output + r.reason


@pytest.mark.parametrize("code", [
    "open({path!r}, 'w').write('escaped')",
    "import pathlib\npathlib.Path({path!r}).write_text('escaped')",
    "import os\nfd = os.open({path!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'escaped')",
    "import os\nos.rename('program.py', {path!r})",
    "open('../' + {name!r}, 'w').write('escaped')",
])
def test_writes_outside_the_folder_are_refused(tmp_path, code):
    target = tmp_path / "escaped.txt"
    r = run_program(code.format(path=str(target), name=target.name), LIMITS)
    assert not r.passed and "PermissionError" in r.output
    assert not target.exists()


def test_removing_a_file_outside_the_folder_is_refused(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    r = run_program(f"import os\nos.remove({str(keep)!r})", LIMITS)
    assert not r.passed and keep.read_text() == "mine"


@pytest.mark.parametrize("code", [
    "import socket\nsocket.socket().connect(('127.0.0.1', 9))",
    "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)",
    "import socket\nsocket.create_connection(('localhost', 80), timeout=2)",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.system('true')",
    "import os\nos.execv('/bin/true', ['true'])",
    "import ctypes\nctypes.CDLL(None)",
])
def test_sockets_new_processes_and_native_code_are_refused(code):
    r = run_program(code, LIMITS)
    assert not r.passed and "refused" in r.output


@pytest.mark.parametrize("code", ["import os\nos._exit(0)\nassert False", "import sys\nsys.exit(0)\nassert False"])
def test_exiting_before_the_checks_is_not_a_pass(code):
    r = run_program(code, LIMITS)
    assert not r.passed and r.reason == "exited-early"


def test_the_network_namespace_is_used_where_the_kernel_allows_it():
    r = run_program("print('hi')", LIMITS)
    assert r.network_namespace == network_namespace_available()
    assert not run_program("print('hi')", SandboxLimits(network_namespace=False)).network_namespace


def test_the_working_folder_is_removed_afterwards():
    r = run_program("import os\nprint(os.getcwd())", LIMITS)
    assert r.passed and not Path(r.output.strip().splitlines()[-1]).exists()
