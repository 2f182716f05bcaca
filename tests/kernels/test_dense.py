"""The dense backend: weight-only specs (and FP8 W8A8) with no kernel on their device, dequantized once."""

from __future__ import annotations

import logging

import pytest
import torch

import quantdeploy as qd
from quantdeploy import kernels
from quantdeploy.bench.decode import weight_bytes
from quantdeploy.engine import Engine, QuantLinear, SamplingParams
from quantdeploy.kernels import reference
from quantdeploy.quant.primitives import quantize_weight
from quantdeploy.quant.spec import QuantSpec

NO_CPU_KERNEL = [QuantSpec("nf4", 64), QuantSpec("fp8_e4m3", None), QuantSpec("int8", 64, symmetric=False),
                 QuantSpec("int3", 64), QuantSpec("int4", 48)]


@pytest.mark.parametrize("spec", NO_CPU_KERNEL, ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_dense_weight_gives_the_reference_paths_numbers_exactly(spec, dtype):
    g = torch.Generator().manual_seed(0)
    qw = quantize_weight(torch.randn(48, 192, generator=g), spec)
    prepared = kernels.prepare(qw, "auto", dtype)
    assert prepared.backend == "dense" and prepared.weight.dtype == dtype
    assert prepared.read_bytes == 48 * 192 * torch.finfo(dtype).bits // 8
    x, b = torch.randn(5, 192, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    # the same dequantization as the reference, kept instead of rebuilt: the same bits
    assert torch.equal(prepared(x, b), reference.qlinear(x, qw, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_w8a8_is_held_in_fp32_and_still_rounds_each_token(dtype):
    """FP8 W8A8 has no CPU kernel: its weight is kept dequantized in fp32 (the reference's), and each call
    still rounds the tokens to E4M3, so the numbers are the reference path's bit for bit."""
    g = torch.Generator().manual_seed(1)
    qw = quantize_weight(torch.randn(48, 192, generator=g), QuantSpec("fp8_e4m3", None, activations="fp8_e4m3"))
    prepared = kernels.prepare(qw, "auto", dtype)
    assert prepared.backend == "dense" and prepared.weight.dtype == torch.float32
    x, b = (torch.randn(5, 192, generator=g) * 4).to(dtype), torch.randn(48, generator=g).to(dtype)
    y = prepared(x, b)
    assert y.dtype == dtype and torch.equal(y, reference.qlinear(x, qw, b))
    unrounded = torch.nn.functional.linear(x.float(), prepared.weight, b.float()).to(dtype)
    assert not torch.equal(y, unrounded)  # the activations were quantized


def test_the_engine_holds_a_model_without_cpu_kernels_dense_says_so_and_counts_the_dense_bytes(tiny_bundle, caplog):
    q = qd.quantize(tiny_bundle, qd.NF4Config(group_size=32))
    with caplog.at_level(logging.WARNING, logger="quantdeploy.engine.loading"):
        engine = Engine.from_bundle(q, "cpu", max_batch=2, max_seq_len=64)
    layers = [m for m in engine.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.prepared.backend == "dense" for m in layers)
    assert any("has no kernel on cpu" in r.getMessage() and "float32" in r.getMessage() for r in caplog.records)
    dense = sum(m.prepared.read_bytes for m in layers)
    codes = sum(getattr(m, n).numel() * getattr(m, n).element_size() for m in layers for n in m._names)
    others = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in engine.model.parameters()}.values())
    assert weight_bytes(engine.model)[0] == dense + others and dense > 4 * codes
    reference_engine = Engine.from_bundle(q, "cpu", backend="reference", max_batch=2, max_seq_len=64)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    tokens = [[c.token_ids for c in e.generate(prompts, params)] for e in (engine, reference_engine)]
    assert tokens[0] == tokens[1]
