"""KV-cache quantization: the per-head code math, and the option end to end on a tiny Llama (scales
calibrated on the weight-quantized model, evaluated through attention, saved and loaded back)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantdeploy as qd
from quantdeploy.errors import ConfigError
from quantdeploy.quant.kv_cache import dequantize_kv, fake_quantize_kv, kv_scale, quantize_kv


def _kv(seed: int, heads: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, heads, 10, 16, generator=g)
    return x * torch.tensor([0.1, 1.0, 30.0][:heads]).reshape(1, -1, 1, 1)  # heads of very different range


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(["int8", "fp8_e4m3"]))
def test_per_head_codes_bound_the_error_and_are_idempotent(seed, dtype):
    x = _kv(seed)
    scale = kv_scale(x.abs().amax(dim=(0, 2, 3)), dtype)
    codes = quantize_kv(x, scale, dtype)
    assert codes.dtype == (torch.int8 if dtype == "int8" else torch.float8_e4m3fn)
    deq = dequantize_kv(codes, scale, torch.float32)
    s = scale.reshape(1, -1, 1, 1)
    bound = s / 2 if dtype == "int8" else x.abs() * 2**-4 + s * 2**-9
    assert ((x - deq).abs() <= bound + 1e-6).all()
    # A static scale makes re-quantizing cached entries a no-op: the simulated cache is the real one.
    assert torch.equal(fake_quantize_kv(deq, scale, dtype), deq)


def test_per_head_scales_beat_one_scale_for_the_layer():
    x = _kv(0)
    per_head = fake_quantize_kv(x, kv_scale(x.abs().amax(dim=(0, 2, 3)), "int8"), "int8")
    one = fake_quantize_kv(x, kv_scale(x.abs().amax().repeat(3), "int8"), "int8")
    small = x[:, 0]
    assert (per_head[:, 0] - small).abs().max() < 0.1 * (one[:, 0] - small).abs().max()


def test_bad_dtype_is_one_clear_error():
    with pytest.raises(ConfigError, match="kv cache dtype must be one of int8, fp8_e4m3"):
        qd.KVCacheConfig(dtype="int4")


@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3"])
def test_kv_cache_option_on_tiny_llama(tiny_bundle, data, tmp_path, dtype):
    calib = qd.CalibrationConfig(source=str(data / "text" / "wiki_en.train.txt"), num_samples=4, seq_len=64)
    weights_only = qd.quantize(tiny_bundle, qd.RTNConfig(bits=8, group_size=None))
    q = qd.quantize(tiny_bundle, qd.RTNConfig(bits=8, group_size=None), kv_cache=qd.KVCacheConfig(dtype, calib))
    attn = q.model.model.layers[1].self_attn
    heads = tiny_bundle.model.config.num_key_value_heads
    assert attn.k_scale.shape == attn.v_scale.shape == (heads,) and (attn.k_scale > 0).all()
    assert q.quant_config["kv_cache"]["dtype"] == dtype
    assert q.quant_config["kv_cache"]["calibration_data"]["num_samples"] == 4
    assert qd.describe(q)["kv_cache"] == dtype
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, w_only, both = (m.model(ids).logits for m in (tiny_bundle, weights_only, q))
    assert not torch.equal(both, w_only)  # the cache really is quantized ...
    p = torch.log_softmax(ref, -1)
    kld = lambda out: float((p.exp() * (p - torch.log_softmax(out, -1))).sum(-1).mean())  # noqa: E731
    assert kld(both) < 0.01  # ... and costs little at 8 bits
    qd.save(q, tmp_path / "kv")
    loaded = qd.load(tmp_path / "kv")
    torch.testing.assert_close(loaded.model.model.layers[1].self_attn.k_scale, attn.k_scale)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, both)
    greedy = qd.generate(loaded, "the", max_new_tokens=5)  # runs through transformers' KV cache
    assert greedy == qd.generate(q, "the", max_new_tokens=5)

    later = qd.quantize_kv_cache(weights_only, qd.KVCacheConfig(dtype, calib))  # same as in one go
    assert torch.equal(later.model.model.layers[1].self_attn.k_scale, attn.k_scale)
    assert not hasattr(weights_only.model.model.layers[1].self_attn, "k_scale")  # the input is untouched
    with pytest.raises(ConfigError, match="already quantized"):
        qd.quantize_kv_cache(later, qd.KVCacheConfig(dtype, calib))
    with pytest.raises(ConfigError, match="quantize the weights first"):
        qd.quantize_kv_cache(tiny_bundle, qd.KVCacheConfig(dtype, calib))
