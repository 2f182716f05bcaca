"""Every Triton launch the host code makes, compiled for a Hopper GPU (sm_90) on the CPU: CI has no GPU,
and a kernel that does not compile (a loop-carried value changing type, a layout Triton refuses) would
otherwise first fail on the card. Triton's wheel carries ptxas, so this goes all the way to a cubin.

The host functions run for real on CPU tensors with the launch intercepted: each launch's arguments are
turned into the signature, constants and the 16-divisibility hints Triton's runtime would derive, so what
compiles here is what the GPU would compile. Numbers are checked elsewhere (the interpreter test here,
the GPU tests on the device)."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.uint8: "u8",
          torch.int8: "i8", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv"}


def _launches(fn, *args):  # noqa: ANN001, ANN202
    """``fn(*args)`` with every Triton kernel launch recorded instead of run: [(kernel, args, options)]."""
    from triton.runtime.jit import JITFunction

    seen = []

    def getitem(kernel, grid):  # noqa: ANN001, ANN202
        def launch(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            seen.append((kernel, a, kw))
        return launch

    original = JITFunction.__getitem__
    JITFunction.__getitem__ = getitem
    try:
        fn(*args)
    finally:
        JITFunction.__getitem__ = original
    return seen


def _compile(kernel, args, kwargs):  # noqa: ANN001, ANN202
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        name, value = param.name, values[param.name]
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        elif isinstance(value, bool) or value is None:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, int):
            if value == 1:  # Triton's runtime makes a 1 a constant
                signature[name], constants[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def _compiles_all(launches, spills: bool = False) -> int:  # noqa: ANN001
    """Compile each launch to a cubin; unless ``spills``, no register may spill to local memory (a spill
    in a kernel whose time is its loads is a silent 2x)."""
    for kernel, args, kwargs in launches:
        binary = _compile(kernel, args, dict(kwargs))
        assert binary.asm["cubin"], kernel.fn.__name__
        if not spills:
            usage = _resource_usage(binary.asm["cubin"])
            assert "STACK:0 " in usage and "LOCAL:0 " in usage, (kernel.fn.__name__, kwargs, usage)
    return len(launches)


def _resource_usage(cubin: bytes) -> str:
    """``cuobjdump -res-usage`` of a cubin (Triton's wheel carries cuobjdump): registers, and LOCAL bytes
    per thread, which are spills."""
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout


def _int_weight(n, k, spec):  # noqa: ANN001, ANN202
    from quantdeploy.quant.primitives import quantize_weight

    torch.manual_seed(0)
    return quantize_weight(torch.randn(n, k) * 0.05, spec)


@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_the_row_kernel_compiles_for_every_layer_shape_and_row_count(bits, group, symmetric):
    from quantdeploy.kernels.triton_gemv import gemv_impl
    from quantdeploy.quant.spec import QuantSpec

    count = 0
    for (n, k), m in itertools.product(((6144, 4096), (28672, 4096), (4096, 14336),
                                        (40, 264 if group is None else 256)), (1, 3)):
        qw = _int_weight(n, k, QuantSpec(dtype=f"int{bits}", group_size=group, symmetric=symmetric))
        t = qw.tensors
        x = torch.randn(m, k, dtype=torch.bfloat16)
        count += _compiles_all(_launches(gemv_impl, x, t["qweight"], t["scales"], t.get("zeros"), bits,
                                         qw.spec.group_for(k), 132), spills=False)
    assert count == 8


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_tile_kernel_and_the_dequantizer_compile_at_every_row_bucket(bits, symmetric):
    from quantdeploy.kernels.triton_gemm import dequantize_impl, gemm_impl
    from quantdeploy.quant.spec import QuantSpec

    qw = _int_weight(512, 1024, QuantSpec(dtype=f"int{bits}", group_size=128, symmetric=symmetric))
    t = qw.tensors
    count = 0
    for m, dtype in ((2, torch.bfloat16), (16, torch.float16), (48, torch.bfloat16), (256, torch.bfloat16),
                     (1024, torch.bfloat16), (16, torch.float32)):
        x = torch.randn(m, 1024, dtype=dtype)
        count += _compiles_all(_launches(gemm_impl, x, t["qweight"], t["scales"], t.get("zeros"), bits, 128, 132),
                               spills=dtype == torch.float32)  # fp32: a correctness path
    count += _compiles_all(_launches(dequantize_impl, t["qweight"], t["scales"], t.get("zeros"), bits, 128, 1024,
                                     torch.bfloat16))
    assert count == 7


def test_real_zero_points_compile_without_spills_at_the_8b_shapes():
    """halfquad's layers: the row kernel with the fractions' term (``OFFSET``) at one and three rows, the
    tile kernel and the dequantizer."""
    from quantdeploy.kernels.triton_gemm import dequantize_impl, gemm_impl
    from quantdeploy.kernels.triton_gemv import gemv_impl
    from quantdeploy.kernels.triton_wonly import split_zeros

    count = 0
    for n, k in ((6144, 4096), (28672, 4096), (4096, 14336)):
        q = torch.randint(0, 255, (n, k // 2), dtype=torch.uint8)
        s = torch.rand(n, k // 64, dtype=torch.float16)
        zi, f = split_zeros(torch.rand(n, k // 64) * 15, 4)
        for m in (1, 3):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            count += _compiles_all(_launches(lambda: gemv_impl(x, q, s, zi, 4, 64, 132, offsets=f)))
    x = torch.randn(48, k, dtype=torch.bfloat16)
    count += _compiles_all(_launches(lambda: gemm_impl(x, q, s, zi, 4, 64, 132, offsets=f)))
    count += _compiles_all(_launches(lambda: dequantize_impl(q, s, zi, 4, 64, k, torch.bfloat16, offsets=f)))
    assert count == 8


@pytest.mark.parametrize("dtype", ["nf4", "fp8_e4m3", "fp8_e4m3-w8a8"])
def test_the_nf4_and_fp8_kernels_compile_without_spills_at_the_8b_shapes(dtype):
    from quantdeploy.kernels.fp8_w8a8 import fp8_w8a8_mm
    from quantdeploy.kernels.triton_wonly import TritonWeightOnly, run
    from quantdeploy.quant.primitives import quantize_weight
    from quantdeploy.quant.spec import QuantSpec

    count = 0
    for (n, k), m in itertools.product(((6144, 4096), (28672, 4096), (4096, 14336)), (1, 3, 16, 256)):
        torch.manual_seed(0)
        w = torch.randn(n, k) * 0.05
        x = torch.randn(m, k, dtype=torch.bfloat16)
        path = "row" if m <= 4 else "tile" if m <= 128 else "dequant"
        if dtype == "fp8_e4m3-w8a8":  # the row quantizer, the row kernel on E4M3 x; more rows: cuBLASLt
            if m <= 4:
                qw = quantize_weight(w, QuantSpec(dtype="fp8_e4m3", group_size=None, activations="fp8_e4m3"))
                count += _compiles_all(_launches(fp8_w8a8_mm, x, qw.tensors["qweight"], qw.tensors["scales"].reshape(-1)))
            continue
        prepared = TritonWeightOnly(quantize_weight(w, QuantSpec(dtype=dtype, group_size=64 if dtype == "nf4" else None)))
        count += _compiles_all(_launches(run, path, x, prepared.qw.tensors["qweight"], prepared.scales, None,
                                         prepared.bits, prepared.group, None, prepared.lut, prepared.fp8))
    assert count == 12  # W8A8: the row quantizer and the row kernel at two row counts


@pytest.mark.parametrize("cache_dtype", [None, torch.int8, torch.float8_e4m3fn], ids=["unquantized", "int8", "fp8"])
def test_the_decode_attention_kernels_compile(cache_dtype):
    from quantdeploy.kernels.triton_attention import decode_attention_impl

    count = 0
    for batch, max_seq_len, dtype in ((1, 4096, torch.bfloat16), (64, 256, torch.bfloat16), (2, 512, torch.float32)):
        q = torch.randn(batch, 32, 128, dtype=dtype)
        k = torch.zeros(batch * max_seq_len // 64 + 1, 8, 64, 128, dtype=cache_dtype or dtype)  # a paged pool
        table = torch.arange(1, batch * max_seq_len // 64 + 1, dtype=torch.int32).view(batch, -1)
        scale = torch.ones(8, dtype=torch.float32) if cache_dtype is not None else None
        lengths = torch.full((batch,), max_seq_len // 2, dtype=torch.int32)
        launches = _launches(decode_attention_impl, q, k, k, table, lengths, scale, scale)
        count += _compiles_all(launches, spills=dtype == torch.float32)  # fp32: a correctness path
    assert count >= 3  # one split kernel per call, a combine kernel where positions are split


INTERPRETED = textwrap.dedent("""
    import torch
    from quantdeploy.kernels import reference
    from quantdeploy.kernels.triton_gemm import dequantize_impl, gemm_impl
    from quantdeploy.kernels.triton_gemv import gemv_impl
    from quantdeploy.quant.primitives import dequantize_weight, quantize_weight
    from quantdeploy.quant.spec import QuantSpec

    # (bits, n, k, group, symmetric, rows, forced row-kernel configuration or None)
    for bits, n, k, group, symmetric, m, config in (
            (4, 40, 256, 32, True, 1, (1, 4, 4, 2, 1, 64)), (4, 24, 640, 128, False, 3, None),
            (4, 20, 200, None, False, 1, (2, 8, 16, 1, 1, 4)), (4, 16, 4104, 8, True, 5, None),
            (4, 18, 384, 96, False, 11, (4, 4, 4, 2, 1, 64)), (8, 24, 640, 128, False, 2, None),
            (8, 20, 200, None, True, 9, None), (8, 18, 384, 96, False, 1, (1, 4, 4, 2, 1, 64))):
        torch.manual_seed(m)
        qw = quantize_weight(torch.randn(n, k) * 0.05, QuantSpec(dtype=f"int{bits}", group_size=group,
                                                                 symmetric=symmetric))
        t, g = qw.tensors, qw.spec.group_for(k)
        x = torch.randn(m, 2 * k)[:, ::2]
        expected = reference.qlinear(x, qw, None)
        for name, y in (("row", gemv_impl(x, t["qweight"], t["scales"], t.get("zeros"), bits, g, 8, config)),
                        ("tile", gemm_impl(x, t["qweight"], t["scales"], t.get("zeros"), bits, g, 8))):
            error = ((y - expected).norm() / expected.norm()).item()
            print(name, bits, n, k, g, symmetric, m, config, error)
            assert error < 1e-5, (name, bits, n, k, g, symmetric, m, error)
        w = dequantize_impl(t["qweight"], t["scales"], t.get("zeros"), bits, g, k, torch.float32)
        assert torch.equal(w, dequantize_weight(qw)), (bits, n, k, g)

    # real zero points (halfquad): integer parts as zeros, fractions as offsets
    from quantdeploy.kernels.triton_wonly import split_zeros
    from quantdeploy.quant.methods.halfquad import HalfQuadConfig, fit_and_round
    for bits, n, k, group, m, config in ((4, 40, 256, 32, 1, (1, 4, 4, 2, 1, 64)), (4, 24, 640, 64, 3, None),
                                         (4, 20, 200, None, 2, (2, 8, 16, 1, 1, 4)), (8, 18, 384, 96, 5, None)):
        torch.manual_seed(m)
        spec = QuantSpec(dtype=f"int{bits}", group_size=group, symmetric=False, float_zeros=True)
        qw = fit_and_round(HalfQuadConfig(bits=bits), "m", torch.randn(n, k) * 0.05, spec)
        t, g = qw.tensors, qw.spec.group_for(k)
        zi, f = split_zeros(t["zeros"], bits)
        assert bool((f != 0).any())
        x = torch.randn(m, 2 * k)[:, ::2]
        expected = reference.qlinear(x, qw, None)
        for name, y in (("row", gemv_impl(x, t["qweight"], t["scales"], zi, bits, g, 8, config, offsets=f)),
                        ("tile", gemm_impl(x, t["qweight"], t["scales"], zi, bits, g, 8, offsets=f))):
            error = ((y - expected).norm() / expected.norm()).item()
            print(name, bits, n, k, g, "float zeros", m, config, error)
            assert error < 1e-5, (name, bits, n, k, g, m, error)
        w = dequantize_impl(t["qweight"], t["scales"], zi, bits, g, k, torch.float32, offsets=f)
        assert torch.allclose(w, dequantize_weight(qw), rtol=1e-6, atol=1e-7), (bits, n, k, g)
""")


def test_the_weight_only_kernels_match_the_reference_in_the_interpreter():
    """The row kernel's indexing (int4 and int8; groups of 8 to 128 and 96, per channel, split K, tails of
    K, zeros integer and real, one to eleven rows, a non-contiguous x), the tile kernel's and the dequantizer's, run by
    Triton's interpreter on the CPU (``TRITON_INTERPRET=1`` must be set before triton is imported: a child
    process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("\n") == 24, done.stdout


NF4_INTERPRETED = textwrap.dedent("""
    import torch
    from quantdeploy.kernels import reference
    from quantdeploy.kernels.triton_wonly import TritonWeightOnly, nf4_scales, run
    from quantdeploy.quant.primitives import quantize_weight
    from quantdeploy.quant.spec import QuantSpec

    # (n, k, group, double_quant, rows): split K, tails of K and N, one to nine rows
    for n, k, group, dq, m in ((40, 256, 64, True, 1), (24, 640, 128, False, 3), (16, 4104, 8, True, 2),
                               (18, 384, 64, False, 9)):
        torch.manual_seed(m)
        qw = quantize_weight(torch.randn(n, k) * 0.05, QuantSpec(dtype="nf4", group_size=group, double_quant=dq))
        prepared = TritonWeightOnly(qw)
        assert prepared.scales.dtype == torch.float16 and prepared.lut.shape == (16,)
        x = torch.randn(m, 2 * k)[:, ::2]
        expected = reference.qlinear(x, qw, None)
        for path in ("row", "tile", "dequant"):
            y = run(path, x.contiguous(), qw.tensors["qweight"], prepared.scales, None, 4, group, None, prepared.lut)
            error = ((y - expected).norm() / expected.norm()).item()
            print(path, n, k, group, dq, m, error)
            assert error < 1e-3, (path, n, k, group, dq, m, error)  # the fp16 scales: 2^-12 on average
        y = prepared(x, None)
        assert ((y - expected).norm() / expected.norm()).item() < 1e-3
""")


FP8_INTERPRETED = textwrap.dedent("""
    import torch
    from quantdeploy.kernels import reference
    from quantdeploy.kernels.fp8_w8a8 import quantize_rows
    from quantdeploy.kernels.triton_gemv import gemv_impl
    from quantdeploy.kernels.triton_wonly import run
    from quantdeploy.quant.primitives import quantize_activations, quantize_weight
    from quantdeploy.quant.spec import QuantSpec

    # weight-only E4M3 (n, k, group, rows) through every path, then W8A8 through the row kernel
    for n, k, group, m in ((40, 256, None, 1), (24, 640, 128, 3), (16, 4104, None, 2), (18, 384, 64, 9)):
        torch.manual_seed(m)
        qw = quantize_weight(torch.randn(n, k) * 0.05, QuantSpec(dtype="fp8_e4m3", group_size=group))
        t, g = qw.tensors, qw.spec.group_for(k)
        x = torch.randn(m, 2 * k)[:, ::2]
        expected = reference.qlinear(x, qw, None)
        for path in ("row", "tile", "dequant"):
            y = run(path, x.contiguous(), t["qweight"], t["scales"], None, 8, g, None, None, True)
            error = ((y - expected).norm() / expected.norm()).item()
            print(path, n, k, g, m, error)
            assert error < 1e-5, (path, n, k, g, m, error)
    for n, k, m in ((48, 256, 1), (32, 4112, 3)):
        torch.manual_seed(m)
        qw = quantize_weight(torch.randn(n, k) * 0.05, QuantSpec(dtype="fp8_e4m3", group_size=None,
                                                                 activations="fp8_e4m3"))
        x = torch.randn(m, k)
        expected = reference.qlinear(x, qw, None)
        xq, xs = quantize_activations(x, "fp8_e4m3")  # the op's own quantizer: bit for bit on the GPU (below)
        y = gemv_impl(xq, qw.tensors["qweight"], qw.tensors["scales"], None, 8, k, 8, fp8=True) * xs
        error = ((y - expected).norm() / expected.norm()).item()
        print("w8a8", n, k, m, error)
        assert error < 1e-5, (n, k, m, error)
        # the row scales applied in the kernel, the output written in x's dtype there (what fp8_w8a8_mm runs);
        # the interpreter casts fp32 to bf16 by truncation (a GPU rounds to nearest): bf16 within one step
        for dtype, rtol in ((torch.float32, 1e-6), (torch.bfloat16, 2 ** -7)):
            yr = gemv_impl(xq, qw.tensors["qweight"], qw.tensors["scales"], None, 8, k, 8, fp8=True,
                           row_scales=xs.reshape(-1), out_dtype=dtype)
            assert yr.dtype == dtype and torch.allclose(yr.float(), y, rtol=rtol, atol=1e-6), (n, k, m, dtype)
    for m, k in ((1, 256), (5, 4104), (3, 9000), (2, 20000)):  # the scales, read in one pass and in blocks
                                                                # (past 16,384); the interpreter's own fp32 -> E4M3 cast
        torch.manual_seed(k)                        # rounds some values wrongly (127.24 -> 64): codes on the GPU
        x = torch.randn(m, k, dtype=torch.bfloat16) * 3
        x[-1] = 0  # a zero row: scale 1
        assert torch.equal(quantize_rows(x)[1], quantize_activations(x, "fp8_e4m3")[1]), (m, k)
        print("quantize", m, k)
""")


def test_the_fp8_kernels_match_the_reference_in_the_interpreter():
    """E4M3 weights through the row and tile kernels and the dequantizer, W8A8 (E4M3 x quantized per
    token, E4M3 products accumulated in fp32) through the row kernel, and the per-token quantizer bit for
    bit against the reference's, in Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", FP8_INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("\n") == 18, done.stdout


def test_the_nf4_kernels_match_the_reference_in_the_interpreter():
    """NF4 through the row and tile kernels and the dequantizer (codes indexing the 16 levels, scales
    decoded from double quantization once), and through the prepared layer, in Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", NF4_INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("\n") == 12, done.stdout


ATTENTION_INTERPRETED = textwrap.dedent("""
    import torch
    from quantdeploy.kernels.triton_attention import decode_attention_impl
    from tests.kernels.test_triton_attention_gpu import _case, _paged, _reference

    g = torch.Generator().manual_seed(0)
    # (rows, heads, kv heads, head dim, positions, cache codes): one split and two, grouped heads, int8 codes
    for case in ((2, 8, 2, 64, 300, None), (3, 9, 3, 64, 200, "int8"), (1, 4, 4, 32, 700, None)):
        batch, _, _, _, positions, kv = case
        q, k, v, scale, lengths = _case(*case, g)
        expected = _reference(q, k, v, lengths, scale, scale)
        got = decode_attention_impl(q, *_paged(k, v, g), lengths, scale, scale)
        error = ((got - expected).norm() / expected.norm()).item()
        print(batch, positions, kv, error)
        assert error < 1e-5, error
""")


def test_the_decode_attention_kernel_reads_a_scattered_paged_cache_in_the_interpreter():
    """The split-KV kernel's block-table addressing (blocks in a shuffled order, one split and two, int8
    codes) against the masked attention over the contiguous cache, in Triton's interpreter on the CPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", ATTENTION_INTERPRETED], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("\n") == 3, done.stdout
