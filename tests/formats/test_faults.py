"""Fault injection on the checkpoint folder: a writer killed at any moment, and every file corrupted in
every way. Nothing half-written or altered ever loads, every refusal is one line, and nothing outside
the output folder is touched. (A full disk and a size-limited file system: test_checkpoint.py.)"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import quantdeploy as qd
from quantdeploy.engine.engine import Engine
from quantdeploy.errors import QuantDeployError
from quantdeploy.formats import checkpoint as ckpt

SAVER = """
import sys, quantdeploy as qd
q = qd.quantize(qd.load_model(sys.argv[1]), qd.RTNConfig(bits=4, group_size=32))
print("ready", flush=True)
while True:
    qd.save(q, sys.argv[2], overwrite=True)
"""


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_a_writer_killed_at_any_moment_never_leaves_a_checkpoint_that_loads_wrong(tiny_llama_dir, tmp_path):
    """SIGKILL a process that saves the same checkpoint over and over, at random moments: the output
    is then absent or a complete checkpoint that verifies and loads; only hidden temporaries remain."""
    (tmp_path / "neighbour.txt").write_text("untouched")
    out = tmp_path / "out"
    rng = random.Random(0)
    outcomes = {"absent": 0, "complete": 0}
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tiny_llama_dir), str(out)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if out.exists():
            ckpt.read_checkpoint(out)  # every hash verified
            assert qd.load(out).quant_config["modules"]
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
        assert visible(tmp_path) in (["neighbour.txt"], ["neighbour.txt", "out"])
        assert (tmp_path / "neighbour.txt").read_text() == "untouched"
        for leftover in tmp_path.glob(".out.*"):  # a killed writer's temporary is never mistaken for the output
            assert leftover.name.startswith((".out.tmp-", ".out.old-"))
    assert outcomes["complete"] >= 1, outcomes


def _flip(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _hash_changed(folder, name):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_json(path):
    data = json.loads(path.read_text())
    key = next(k for k, v in data.items() if isinstance(v, (int, str)) and not isinstance(v, bool))
    data[key] = data[key] + 1 if isinstance(data[key], int) else data[key] + "x"
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def good(tiny_bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "q"
    qd.save(qd.quantize(tiny_bundle, qd.RTNConfig(bits=4, group_size=32, symmetric=False)), path)
    return path


FILES = ["model.safetensors", "config.json", "quant_config.json", "manifest.json", "tokenizer.json",
         "tokenizer_config.json", "generation_config.json"]
CORRUPTIONS = ["truncated", "bytes-flipped", "hash-changed", "edited", "deleted"]


# The manifest holds the hashes and is not listed in itself: "hash changed" applies to the other files.
@pytest.mark.parametrize(("name", "corruption"), [(n, c) for n in FILES for c in CORRUPTIONS
                                                  if (n, c) != ("manifest.json", "hash-changed")])
def test_every_file_corrupted_every_way_is_refused_in_one_line(good, tmp_path, name, corruption):
    folder = tmp_path / "q"
    shutil.copytree(good, folder)
    path = folder / name
    if corruption == "truncated":
        _truncate(path)
    elif corruption == "bytes-flipped":
        if name == "manifest.json":  # inside a recorded hash: a flip elsewhere (the creation time) changes nothing loaded
            text = path.read_text()
            _flip(path, text.index('"sha256": "', text.index('"files"')) + 20)
        else:
            _flip(path)
    elif corruption == "hash-changed":
        _hash_changed(folder, name)
    elif corruption == "edited":
        if name == "model.safetensors":
            _flip(path, 10)  # inside the JSON header
        else:
            _edit_json(path)
    else:
        path.unlink()
    for load in (qd.load, lambda p: Engine.load(p, "cpu", max_batch=1, max_seq_len=64)):
        with pytest.raises(QuantDeployError) as err:
            load(folder)
        assert "\n" not in str(err.value) and str(folder) in str(err.value), str(err.value)


def test_the_cli_refuses_a_corrupt_checkpoint_in_one_line(good, tmp_path):
    folder = tmp_path / "q"
    shutil.copytree(good, folder)
    _flip(folder / "model.safetensors")
    (tmp_path / "text.txt").write_text("some text to score " * 50)
    for command in (["generate", str(folder), "hi"], ["eval", str(folder), "--text", str(tmp_path / "text.txt")],
                    ["inspect", str(folder)]):
        proc = subprocess.run([sys.executable, "-m", "quantdeploy", *command], capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "does not match its manifest hash" in lines[0], proc.stderr
