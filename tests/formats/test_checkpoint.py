"""Checkpoint folder: round trip, atomic writes, and one-line errors for broken folders."""

import json
import shutil

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
    """Change a JSON file of a checkpoint and re-record its size, as a careless hand edit would not."""
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data, indent=2))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name]["bytes"] = (folder / name).stat().st_size
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


def test_corrupt_header_is_detected_even_without_manifest_sizes(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["files"] = {}
    (saved / "manifest.json").write_text(json.dumps(manifest))
    (saved / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        qd.load(saved)


def test_changed_bytes_are_caught_by_hash_verification(saved):
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    ckpt.read_checkpoint(saved)  # sizes still match
    with pytest.raises(CheckpointError, match="does not match its manifest hash"):
        ckpt.read_checkpoint(saved, verify_hashes=True)


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
