"""Checkpoint folder: round trip, atomic writes, and one-line errors for broken folders."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantdeploy as qd
from quantdeploy.errors import CheckpointError
from quantdeploy.formats import checkpoint as ckpt

CONFIGS = {
    "int8": qd.RTNConfig(bits=8, group_size=None),
    "int4-asym": qd.RTNConfig(bits=4, group_size=32, symmetric=False),
    "int3-head": qd.RTNConfig(bits=3, group_size=32, targets=qd.TargetConfig(lm_head=True, embeddings=True)),
    "nf4": qd.NF4Config(group_size=32),
    "fp8": qd.FP8Config(),
}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", CONFIGS)
def test_save_load_roundtrip_gives_identical_logits(tiny_bundle, tmp_path, name):
    q = qd.quantize(tiny_bundle, CONFIGS[name])
    size = qd.save(q, tmp_path / name)
    assert size == ckpt.folder_size(tmp_path / name) > 0
    loaded = qd.load(tmp_path / name)
    ids = torch.randint(0, 300, (2, 24))
    assert torch.equal(logits(q.model, ids), logits(loaded.model, ids))
    assert loaded.quant_config["modules"] == q.quant_config["modules"]
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    for key in ("quantdeploy_version", "torch_version", "transformers_version", "created_at", "seed", "source"):
        assert key in manifest
    assert manifest["source"]["sha256"] and set(manifest["files"]) >= {"model.safetensors", "quant_config.json"}
    assert (tmp_path / name / "tokenizer.json").is_file()


def test_int4_is_stored_packed(tiny_bundle, tmp_path):
    from safetensors import safe_open

    qd.save(qd.quantize(tiny_bundle, qd.RTNConfig(bits=4, group_size=32)), tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        qweight = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        scales = f.get_tensor("model.layers.0.mlp.down_proj.scales")
        assert "lm_head.weight" not in f.keys()  # tied to the embeddings: stored once
    assert qweight.dtype == torch.uint8 and tuple(qweight.shape) == (64, 64)  # in 128 -> 64 bytes
    assert scales.dtype == torch.float16 and tuple(scales.shape) == (64, 4)


def test_existing_output_is_not_overwritten_unless_asked(tiny_bundle, tmp_path):
    q = qd.quantize(tiny_bundle, CONFIGS["int8"])
    qd.save(q, tmp_path / "q")
    with pytest.raises(CheckpointError, match="already exists"):
        qd.save(q, tmp_path / "q")
    qd.save(q, tmp_path / "q", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_crash_while_writing_leaves_nothing(tiny_bundle, tmp_path):
    def explode(folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.write_checkpoint(tmp_path / "q", {"a": torch.zeros(2)}, {}, {}, explode)
    assert list(tmp_path.iterdir()) == []


def edit_json(folder, name, change):
    """Change a JSON file of a checkpoint and re-record its size and hash, as a careless hand edit would
    not: what is left to catch it are the checks of the contents themselves."""
    from quantdeploy.models.hashing import file_sha256

    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data, indent=2))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture()
def saved(tiny_bundle, tmp_path):
    path = tmp_path / "q"
    qd.save(qd.quantize(tiny_bundle, CONFIGS["int4-asym"]), path)
    return path


def test_truncated_weights_are_detected(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        qd.load(saved)


def test_corrupt_header_is_detected_even_when_the_manifest_was_rewritten_to_match(saved):
    from quantdeploy.models.hashing import file_sha256

    weights = saved / "model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"bytes": 64, "sha256": file_sha256(weights)}
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        qd.load(saved)


def test_a_manifest_that_lists_no_files_is_refused(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["files"] = {}
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not list the checkpoint's files"):
        qd.load(saved)


def test_changed_bytes_are_caught_on_every_load(saved):
    """4 MB overwritten inside model.safetensors, same size: every loader refuses it (issue 12, item 3)."""
    from quantdeploy.engine.engine import Engine

    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    span = min(4 << 20, len(data) // 4)
    data[middle:middle + span] = bytes(span)
    weights.write_bytes(bytes(data))
    ckpt.read_checkpoint(saved, verify_hashes=False)  # sizes still match
    for load in (ckpt.read_checkpoint, qd.load, lambda p: Engine.load(p, "cpu", max_batch=1, max_seq_len=64)):
        with pytest.raises(CheckpointError, match="does not match its manifest hash"):
            load(saved)


def test_overwrite_replaces_only_our_own_checkpoints(tiny_bundle, saved, tmp_path):
    """--overwrite never deletes an unrelated folder or a plain file (issue 12, item 4)."""
    q = qd.quantize(tiny_bundle, CONFIGS["int8"])
    unrelated = tmp_path / "mine"
    (unrelated / "sub").mkdir(parents=True)
    (unrelated / "notes.txt").write_text("keep me")
    (unrelated / "sub" / "data.bin").write_bytes(b"1234")
    plain = tmp_path / "file.txt"
    plain.write_text("keep me too")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="not a quantdeploy checkpoint"):
        qd.save(q, unrelated, overwrite=True)
    with pytest.raises(CheckpointError, match="is not a folder"):
        qd.save(q, plain, overwrite=True)
    assert (unrelated / "notes.txt").read_text() == "keep me" and (unrelated / "sub" / "data.bin").is_file()
    assert plain.read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no hidden .old-/.tmp- folder left behind
    qd.save(q, saved, overwrite=True)  # one of ours is replaced
    assert qd.load(saved).quant_config["modules"] == q.quant_config["modules"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    qd.save(q, empty)  # an empty folder holds nothing to lose
    assert ckpt.is_checkpoint(empty)


def test_an_unwritable_output_fails_before_any_work(tmp_path):
    """-o /proc/x (issue 12, item 8): the check runs before quantizing."""
    with pytest.raises(CheckpointError, match="cannot write under /proc"):
        ckpt.check_output(Path("/proc/x"))


def test_a_full_disk_during_save_leaves_nothing_behind(tiny_bundle, tmp_path, monkeypatch):
    """ENOSPC in the middle of writing the weights: one-line error, no folder, no temporary left."""
    import errno

    q = qd.quantize(tiny_bundle, CONFIGS["int8"])

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError, match="the disk is full"):
        qd.save(q, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_size_limited_file_system_during_save_leaves_nothing_behind(tiny_llama_dir, tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE, a file-size limit, as a small file system would): a real
    failed write, in a child process; one line, nothing left."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "import quantdeploy as qd\n"
        "from quantdeploy.errors import CheckpointError\n"
        f"q = qd.quantize(qd.load_model({str(tiny_llama_dir)!r}), qd.RTNConfig(bits=8))\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "try:\n"
        f"    qd.save(q, {str(tmp_path / 'out')!r})\n"
        "except CheckpointError as err:\n"
        "    print(err); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert f"cannot write {tmp_path / 'out'}" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_missing_file_newer_format_and_wrong_dtype(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json missing"):
        qd.load(broken)

    newer = tmp_path / "newer"
    shutil.copytree(saved, newer)
    qc = json.loads((newer / "quant_config.json").read_text())
    qc["format_version"] = 99
    (newer / "quant_config.json").write_text(json.dumps(qc))
    with pytest.raises(CheckpointError, match="format 99"):
        qd.load(newer)

    wrong = tmp_path / "wrong"
    shutil.copytree(saved, wrong)
    edit_json(wrong, "quant_config.json",
              lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"].update(dtype="int8"))  # stored: int4
    with pytest.raises(CheckpointError, match="shapes do not match"):
        qd.load(wrong)

    edit_json(wrong, "quant_config.json",
              lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"].update(dtype="int4", symmetric=True))
    with pytest.raises(CheckpointError, match="unexpected model.layers.0.mlp.up_proj.zeros"):
        qd.load(wrong)

    edited = tmp_path / "edited"
    shutil.copytree(saved, edited)
    (edited / "quant_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a quantdeploy quant config"):
        qd.load(edited)


def test_replacing_a_checkpoint_is_one_atomic_swap_here(tmp_path):
    """On Linux the new folder and the old checkpoint trade places in one step (no instant without one)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "new.txt").write_text("new")
    (b / "old.txt").write_text("old")
    if not ckpt.exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system or file system")
    assert (b / "new.txt").read_text() == "new" and (a / "old.txt").read_text() == "old"
