"""The Triton weight-only kernels against the reference path (the oracle) on CUDA: every int grid the
quantizers write, each path (row kernel, tile kernel, dequantize + cuBLAS) at odd M, a K that no tile
divides, non-contiguous inputs; and the engine's greedy tokens with them, compiled, against the reference
path."""

from __future__ import annotations

import pytest
import torch

from quantdeploy import kernels
from quantdeploy.kernels import reference
from quantdeploy.quant.primitives import QuantizedWeight, quantize_weight
from quantdeploy.quant.spec import QuantSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPECS = [QuantSpec(dtype="int4", group_size=g, symmetric=s) for g in (32, 64, 128) for s in (True, False)] + [
    QuantSpec(dtype="int4", group_size=None), QuantSpec(dtype="int8", group_size=None),
    QuantSpec(dtype="int8", group_size=128, symmetric=False), QuantSpec(dtype="fp8_e4m3", group_size=None),
    QuantSpec(dtype="fp8_e4m3", group_size=128)]


def _on_gpu(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(qw.spec, qw.shape, {k: v.cuda() for k, v in qw.tensors.items()})


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 17, 64, 600])  # every route of ROUTES
def test_kernel_matches_the_reference(spec, rows):
    torch.manual_seed(rows)
    n, k = 320, 640  # every group divides it; no tile of 256 does
    qw = _on_gpu(quantize_weight(torch.randn(n, k) * 0.05, spec))
    prepared = kernels.prepare(qw, "triton")
    assert prepared.backend == "triton"
    for dtype, tolerance in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)):
        x = torch.randn(rows, 2 * k, device="cuda", dtype=dtype)[:, ::2]  # non-contiguous
        bias = torch.randn(n, device="cuda", dtype=dtype)
        expected = reference.qlinear(x.float(), qw, bias.float())  # fp32 oracle
        got = prepared(x, bias).float()
        error = ((got - expected).norm() / expected.norm()).item()
        assert error < tolerance, (dtype, error)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 600])  # row, tile and dequantize + cuBLAS
def test_nf4_matches_the_reference(rows, double_quant):
    """NF4 codes index the 16 levels in the kernels; the scales (double-quantized or fp32) are decoded
    once to fp16 at preparation: a relative error of about 2^-12 beside the fp32 oracle."""
    torch.manual_seed(rows)
    n, k = 320, 640
    qw = _on_gpu(quantize_weight(torch.randn(n, k) * 0.05, QuantSpec(dtype="nf4", group_size=64,
                                                                     double_quant=double_quant)))
    prepared = kernels.prepare(qw, "triton")
    assert prepared.backend == "triton" and prepared.scales.dtype == torch.float16
    for dtype, tolerance in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-3)):
        x = torch.randn(rows, 2 * k, device="cuda", dtype=dtype)[:, ::2]
        expected = reference.qlinear(x.float(), qw, None)
        error = ((prepared(x, None).float() - expected).norm() / expected.norm()).item()
        assert error < tolerance, (dtype, error)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17, 600])  # the row kernel up to 4, cuBLASLt's FP8 GEMM above
def test_fp8_w8a8_matches_the_reference(rows):
    """W8A8 FP8: x quantized per token to E4M3 as the reference does; the row kernel sums the exact E4M3
    products in fp32 (fp32 x: 1e-5), ``_scaled_mm`` rounds its output to bf16 (every dtype: 1e-2)."""
    from quantdeploy.kernels.fp8_w8a8 import ROW_ROWS

    torch.manual_seed(rows)
    n, k = 320, 640
    qw = _on_gpu(quantize_weight(torch.randn(n, k) * 0.05, QuantSpec(dtype="fp8_e4m3", group_size=None,
                                                                     activations="fp8_e4m3")))
    prepared = kernels.prepare(qw, "triton")
    assert type(prepared).__name__ == "FP8W8A8"
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(rows, 2 * k, device="cuda", dtype=dtype)[:, ::2]
        bias = torch.randn(n, device="cuda", dtype=dtype)
        expected = reference.qlinear(x.float(), qw, bias.float())
        error = ((prepared(x, bias).float() - expected).norm() / expected.norm()).item()
        tolerance = 1e-5 if dtype == torch.float32 and rows <= ROW_ROWS else 1e-2
        assert error < tolerance, (dtype, error)


@pytest.mark.parametrize("shape", [(1, 4096), (7, 14336), (64, 1000)])
def test_the_fp8_row_quantizer_equals_the_reference_bit_for_bit(shape):
    from quantdeploy.kernels.fp8_w8a8 import quantize_rows
    from quantdeploy.quant.primitives import quantize_activations

    torch.manual_seed(shape[1])
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(shape, device="cuda", dtype=dtype) * 3
        if shape[0] > 1:
            x[-1] = 0  # a zero row: scale 1
        q, s = quantize_rows(x)
        q_ref, s_ref = quantize_activations(x, "fp8_e4m3")
        assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_a_named_backend_that_cannot_serve_is_an_error():
    from quantdeploy.errors import ConfigError

    qw = _on_gpu(quantize_weight(torch.randn(64, 128), QuantSpec(dtype="int3", group_size=64)))
    with pytest.raises(ConfigError, match="triton backend cannot run"):
        kernels.prepare(qw, "triton")
    held = kernels.prepare(qw, "auto", torch.bfloat16)  # auto: no kernel, so dequantized once (kernels/dense.py)
    assert held.backend == "dense" and held.weight.is_cuda and held.weight.dtype == torch.bfloat16
    x = torch.randn(3, 128, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(held(x, None), reference.qlinear(x, qw, None))


@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 600])  # row, tile and dequantize + cuBLAS
def test_real_zero_points_match_the_reference(bits, group, rows):
    """halfquad's fp16 zero points: integer parts subtracted as integer zeros are, fractions times the sums
    of x (row kernel) or times the scale (tile, dequantizer)."""
    from quantdeploy.kernels.triton_wonly import split_zeros
    from quantdeploy.quant.methods.halfquad import HalfQuadConfig, fit_and_round

    torch.manual_seed(rows)
    n, k = 320, 640
    spec = QuantSpec(dtype=f"int{bits}", group_size=group, symmetric=False, float_zeros=True)
    qw = fit_and_round(HalfQuadConfig(bits=bits), "m", torch.randn(n, k) * 0.05, spec)
    # fp16 keeps int8 zero points (about 128) to an eighth of a step, so a fit may land on whole ones:
    # move each by a fraction, so that every fraction term of the kernels runs
    qw.tensors["zeros"] = (qw.tensors["zeros"].float() + torch.rand(qw.tensors["zeros"].shape) - 0.5).half()
    qw = _on_gpu(qw)
    prepared = kernels.prepare(qw, "triton")
    assert prepared.backend == "triton" and bool((split_zeros(qw.tensors["zeros"], bits)[1] != 0).any())
    for dtype, tolerance in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)):
        x = torch.randn(rows, 2 * k, device="cuda", dtype=dtype)[:, ::2]
        expected = reference.qlinear(x.float(), qw, None)
        error = ((prepared(x, None).float() - expected).norm() / expected.norm()).item()
        assert error < tolerance, (dtype, error)


def test_engine_greedy_tokens_with_the_kernel_equal_the_reference_path(tiny_bundle):
    import quantdeploy as qd
    from quantdeploy.engine.engine import Engine
    from quantdeploy.engine.sampling import SamplingParams

    prompts = ["The history of", "In 1850 the city", "A", "Mathematics is the study of numbers and"]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    for config in (qd.RTNConfig(bits=4, group_size=32), qd.RTNConfig(bits=8),
                   qd.RTNConfig(bits=4, group_size=64, symmetric=False), qd.NF4Config(group_size=64),
                   qd.HalfQuadConfig(bits=4, group_size=64),
                   qd.FP8Config(), qd.FP8Config(activations=True)):
        q = qd.quantize(tiny_bundle, config)
        runs = {}
        for backend in ("reference", "triton"):
            engine = Engine.from_bundle(q, "cuda", max_batch=4, max_seq_len=64, backend=backend, dtype=torch.float32)
            runs[backend] = [c.token_ids for c in engine.generate(prompts, params)]
        assert runs["triton"] == runs["reference"], config


@pytest.mark.parametrize("path", ["row", "tile", "dequant"])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 33])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_path_matches_the_reference_at_any_row_count(path, rows, bits):
    """Each path, forced, at row counts the dispatch would not send it (the routes move with the card)."""
    from quantdeploy.kernels.triton_wonly import run

    torch.manual_seed(rows)
    n, k = 200, 1160  # K: a multiple of 8, not of any tile; N: not of any block
    for group, symmetric in ((8, True), (40, False), (None, False)):
        qw = _on_gpu(quantize_weight(torch.randn(n, k) * 0.05, QuantSpec(dtype=f"int{bits}", group_size=group,
                                                                         symmetric=symmetric)))
        t = qw.tensors
        for dtype, tolerance in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            expected = reference.qlinear(x.float(), qw, None)
            got = run(path, x, t["qweight"], t["scales"], t.get("zeros"), bits, qw.spec.group_for(k)).float()
            assert ((got - expected).norm() / expected.norm()).item() < tolerance, (group, symmetric, dtype)


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("symmetric", [True, False])
def test_few_row_kernel_with_k_split_matches_the_reference(rows, symmetric):
    """A layer with few outputs and a long K: the row kernel splits K and adds the partial sums."""
    from quantdeploy.kernels.triton_gemv import gemv_impl

    torch.manual_seed(rows)
    n, k = 64, 4104  # K: a multiple of 8, not of the 512-code tile
    qw = _on_gpu(quantize_weight(torch.randn(n, k) * 0.05, QuantSpec(dtype="int4", group_size=8, symmetric=symmetric)))
    t = qw.tensors
    for dtype, tolerance in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        expected = reference.qlinear(x.float(), qw, None)
        got = gemv_impl(x, t["qweight"], t["scales"], t.get("zeros"), 4, 8, 132).float()
        assert ((got - expected).norm() / expected.norm()).item() < tolerance


@pytest.mark.parametrize("path,rows", [("row", 1), ("row", 4), ("tile", 16)])
def test_split_k_sums_in_the_kernel_leave_the_counters_zeroed_and_replay_in_a_cuda_graph(path, rows):
    """The last program of each tile adds the splits' partial sums (``triton_split.py``): every launch
    equals the reference, is bit-identical to the others whichever program finished last, leaves the
    layer's counters at zero, and replays the same from a CUDA graph (the engine's decode step)."""
    from quantdeploy.kernels.triton_split import counters
    from quantdeploy.kernels.triton_wonly import run

    torch.manual_seed(rows)
    n, k = 4096, 14336  # the 8B down projection: few outputs, long K, split at a few rows
    qw = _on_gpu(quantize_weight(torch.randn(n, k) * 0.02, QuantSpec(dtype="int4", group_size=128)))
    t = qw.tensors
    locks = counters(torch.device("cuda"), torch.cuda.get_device_properties(0).multi_processor_count)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    expected = reference.qlinear(x.float(), qw, None)
    first = run(path, x, t["qweight"], t["scales"], None, 4, 128, locks)
    assert ((first.float() - expected).norm() / expected.norm()).item() < 1e-2
    for _ in range(20):
        assert torch.equal(run(path, x, t["qweight"], t["scales"], None, 4, 128, locks), first)
    assert not locks.any()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run(path, x, t["qweight"], t["scales"], None, 4, 128, locks)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = run(path, x, t["qweight"], t["scales"], None, 4, 128, locks)
    for _ in range(20):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, first)
    assert not locks.any()
