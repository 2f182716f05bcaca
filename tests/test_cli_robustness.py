"""Every subcommand with hypothesis-drawn bad arguments and bad files: exit code 2, one line on stderr
(``error: ...``), no traceback, and no file written anywhere (the working folder, the GGUF cache).

Each invocation starts from a valid command line for its subcommand and adds one to three ingredients
that are each wrong on their own (a bad value, a bad file, a bad path), so every example must be refused,
whatever the combination and order. The CLI runs in a forked child of a worker process that imported it once,
with its file descriptors 1 and 2 sent to files, so what a user would see is what is checked,
log lines included; the child has 60 s, so a refusal that comes only after long work fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantdeploy as qd
from quantdeploy.models.gguf import cache_root

BAD_MODELS = ["nope", "junk.gguf", "junkdir", "emptydir", "nul.txt"]
CHECKPOINT_BAD_MODELS = BAD_MODELS + ["corrupt"]
DEAD_URL = "http://127.0.0.1:9"

COMMANDS: dict[str, tuple[list[str], list[list[str]], list[str]]] = {
    # subcommand: (a valid command line, ingredients each wrong on its own, models that are wrong for it)
    "quantize": (["quantize", "tiny", "--method", "rtn", "-o", "out"], [
        ["--bits", "5"], ["--bits", "four"], ["--group-size", "-3"], ["--method", "magic"], ["--method", "awq+nf4"],
        ["--calib", "nul.txt"], ["--calib", "missing.txt"], ["--device", "tpu"], ["--device", "cuda:7"],
        ["-o", "/proc/x/y"], ["-o", "afile", "--overwrite"], ["-o", "unrelated", "--overwrite"], ["-o", "unrelated"],
        ["--recipe", "bad.yaml"], ["--recipe", "missing.yaml"], ["--calib-samples", "0"], ["--alpha", "2"],
        ["--kv-cache", "int4"], ["--dtype", "int3"], ["--w8a8"], ["--include", "re:("], ["--seed", "-1"],
        ["--calib-seq-len", "3"], ["--unknown-flag"],
    ], BAD_MODELS + ["good"]),  # good: one of our checkpoints, which is not re-quantized
    "eval": (["eval", "good", "--text", "good.txt", "--tokens", "64", "--window", "32"], [
        ["--text", "nul.txt"], ["--text", "missing.txt"], ["--text", "emptydir"], ["--tokens", "-5"],
        ["--window", "1"], ["--bos", "sometimes"], ["--stride", "0"],
    ], CHECKPOINT_BAD_MODELS),
    "generate": (["generate", "good", "hi", "--max-new-tokens", "2"], [
        ["--device", "tpu"], ["--temperature", "-1"], ["--temperature", "nan"], ["--top-p", "2"],
        ["--max-new-tokens", "0"], ["--max-seq-len", "1"], ["--seed", "-1"], ["--top-k", "x"],
    ], CHECKPOINT_BAD_MODELS),
    "bench": (["bench", "good", "--no-original", "--batches", "1", "--steps", "1", "--prompt-len", "4"], [
        ["--batches", "0"], ["--threads", "0"], ["--device", "tpu"], ["--steps", "-1"], ["--prompt-len", "0"],
    ], CHECKPOINT_BAD_MODELS),
    "serve": (["serve", "good", "--port", "0"], [
        ["--port", "99999"], ["--port", "-1"], ["--max-batch", "0"], ["--device", "tpu"], ["--host", "999.999.0.1"],
        ["--shutdown-deadline", "nan"], ["--max-queue", "-1"], ["--engine", "fork"], ["--max-body-bytes", "1"],
    ], BAD_MODELS),
    "loadtest": (["loadtest", DEAD_URL, "--requests", "2"], [
        ["--requests", "0"], ["--prompt-len", "0:3"], ["--output-len", "5:2"], ["--rate", "-1"],
        ["--concurrency", "0"], ["--timeout", "0"],
    ], []),
    "inspect": (["inspect", "good"], [["--verify", "extra-argument"]], CHECKPOINT_BAD_MODELS + ["tiny"]),
    "demo": (["demo", "--tokens", "64", "--window", "32"], [
        ["--text", "nul.txt"], ["--text", "missing.txt"], ["--out", "/proc/x"], ["--tokens", "-1"], ["--window", "0"],
    ], []),
}


@pytest.fixture(scope="module")
def workdir(tiny_llama_dir, tmp_path_factory):
    """A folder of bad (and a few good) inputs; the CLI runs with it as its working folder."""
    root = tmp_path_factory.mktemp("cli-robustness")
    os.symlink(tiny_llama_dir, root / "tiny")
    qd.save(qd.quantize(qd.load_model(tiny_llama_dir), qd.RTNConfig(bits=8)), root / "good")
    shutil.copytree(root / "good", root / "corrupt")
    data = bytearray((root / "corrupt" / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "corrupt" / "model.safetensors").write_bytes(bytes(data))
    (root / "nul.txt").write_bytes(b"\x00" * 3000)
    (root / "good.txt").write_text("The river runs through the old city and past the market. " * 40)
    (root / "junk.gguf").write_bytes(os.urandom(5000))
    (root / "junkdir").mkdir()
    (root / "junkdir" / "config.json").write_text("{not json")
    (root / "emptydir").mkdir()
    (root / "afile").write_text("keep")
    (root / "unrelated").mkdir()
    (root / "unrelated" / "notes.txt").write_text("keep")
    (root / "bad.yaml").write_text("method: rtn\nbitz: 4\n")
    return root


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        if root.exists():
            for path in root.rglob("*"):
                if not path.is_symlink():
                    stat = path.stat()
                    out[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return out


WORKER = r"""
import json, os, signal, sys, tempfile, traceback
from quantdeploy import cli  # imported once; this process runs no torch kernel, so forking it is safe

for request in sys.stdin:
    argv = json.loads(request)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                signal.alarm(60)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                code = cli.main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        print(json.dumps([os.waitstatus_to_exitcode(status), out.read(), err.read()]), flush=True)
"""


@pytest.fixture(scope="module")
def cli_worker(workdir):
    """A process that imports the CLI once and forks a child per command line (a fresh interpreter per
    example would cost ~4 s of imports; forking pytest itself could deadlock in OpenMP)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    worker = subprocess.Popen([sys.executable, "-c", WORKER], cwd=workdir, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    yield worker
    worker.stdin.close()
    worker.wait(30)


def run_cli(worker, argv: list[str]) -> tuple[int, str, str]:
    """``quantdeploy ARGV`` in a forked child of the worker: exit code, stdout, stderr (fds 1 and 2)."""
    worker.stdin.write(json.dumps(argv) + "\n")
    worker.stdin.flush()
    code, out, err = json.loads(worker.stdout.readline())
    return code, out, err


@st.composite
def bad_command_lines(draw):
    name = draw(st.sampled_from(sorted(COMMANDS)))
    base, ingredients, models = COMMANDS[name]
    argv = list(base)
    chosen = draw(st.lists(st.sampled_from(ingredients), min_size=0 if models else 1, max_size=3))
    if models and (not chosen or draw(st.booleans())):
        argv[1] = draw(st.sampled_from(models))
    for ingredient in chosen:
        argv += ingredient
    return argv


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(argv=bad_command_lines())
def test_bad_arguments_and_files_exit_2_with_one_line_and_write_nothing(workdir, cli_worker, argv):
    before = snapshot(workdir, cache_root())
    code, out, err = run_cli(cli_worker, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, code, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), (argv, err)
    assert "Traceback" not in err + out
    assert snapshot(workdir, cache_root()) == before, argv


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["quantize"], ["--no-such-flag"]])
def test_no_or_unknown_subcommand(cli_worker, argv):
    code, _, err = run_cli(cli_worker, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
