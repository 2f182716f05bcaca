"""Every Triton launch the host code makes, compiled for a Hopper GPU (sm_90) on the CPU: CI has no GPU,
and a kernel that does not compile (a loop-carried value changing type, a layout Triton refuses) would
otherwise first fail on the card. Triton's wheel carries ptxas, so this goes all the way to a cubin.

The host functions run for real on CPU tensors with the launch intercepted: each launch's arguments are
turned into the signature, constants and the 16-divisibility hints Triton's runtime would derive, so what
compiles here is what the GPU would compile. Numbers are checked elsewhere (the interpreter test here,
the GPU tests on the device)."""

from __future__ import annotations

import importlib.util
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


def _compiles_all(launches) -> int:  # noqa: ANN001
    for kernel, args, kwargs in launches:
        binary = _compile(kernel, args, dict(kwargs))
        assert binary.asm["cubin"], kernel.fn.__name__
    return len(launches)


def _int_weight(n, k, spec):  # noqa: ANN001, ANN202
    from quantdeploy.quant.primitives import quantize_weight

    torch.manual_seed(0)
    return quantize_weight(torch.randn(n, k) * 0.05, spec)


@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_int4_row_kernel_compiles_for_every_layer_shape(group, symmetric):
    from quantdeploy.kernels.triton_wonly import gemv4_impl
    from quantdeploy.quant.spec import QuantSpec

    count = 0
    for n, k in ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (40, 264 if group is None else 256)):
        qw = _int_weight(n, k, QuantSpec(dtype="int4", group_size=group, symmetric=symmetric))
        t = qw.tensors
        x = torch.randn(1, k, dtype=torch.bfloat16)
        count += _compiles_all(_launches(gemv4_impl, x, t["qweight"], t["scales"], t.get("zeros"),
                                         qw.spec.group_for(k)))
    assert count == 5


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_tile_kernel_compiles_at_every_row_bucket(bits, symmetric):
    from quantdeploy.kernels.triton_wonly import wonly_mm_impl
    from quantdeploy.quant.spec import QuantSpec

    qw = _int_weight(512, 1024, QuantSpec(dtype=f"int{bits}", group_size=128, symmetric=symmetric))
    t = qw.tensors
    count = 0
    for m, dtype in ((2, torch.bfloat16), (16, torch.float16), (48, torch.bfloat16), (256, torch.bfloat16),
                     (16, torch.float32)):
        x = torch.randn(m, 1024, dtype=dtype)
        count += _compiles_all(_launches(wonly_mm_impl, x, t["qweight"], t["scales"], t.get("zeros"), bits, 128))
    assert count == 5


@pytest.mark.parametrize("cache_dtype", [None, torch.int8, torch.float8_e4m3fn], ids=["unquantized", "int8", "fp8"])
def test_the_decode_attention_kernels_compile(cache_dtype):
    from quantdeploy.kernels.triton_attention import decode_attention_impl

    count = 0
    for batch, max_seq_len, dtype in ((1, 4096, torch.bfloat16), (64, 256, torch.bfloat16), (2, 512, torch.float32)):
        q = torch.randn(batch, 32, 128, dtype=dtype)
        k = torch.zeros(batch, 8, max_seq_len, 128, dtype=cache_dtype or dtype)
        scale = torch.ones(8, dtype=torch.float32) if cache_dtype is not None else None
        lengths = torch.full((batch,), max_seq_len // 2, dtype=torch.int32)
        launches = _launches(decode_attention_impl, q, k, k, lengths, scale, scale)
        count += _compiles_all(launches)
    assert count >= 3  # one split kernel per call, a combine kernel where positions are split


INTERPRETED = textwrap.dedent("""
    import torch
    from quantdeploy.kernels import reference
    from quantdeploy.kernels.triton_wonly import gemv4_impl, wonly_mm_impl
    from quantdeploy.quant.primitives import quantize_weight
    from quantdeploy.quant.spec import QuantSpec

    # (n, k, group, symmetric, rows, forced row-kernel configuration or None)
    for n, k, group, symmetric, m, config in ((40, 256, 32, True, 1, (4, 4, 2, 1, 64)), (24, 640, 128, False, 2, None),
                                              (20, 200, None, False, 1, (8, 16, 1, 1, 4)), (16, 4104, 8, True, 1, None),
                                              (18, 384, 96, False, 1, (4, 4, 2, 1, 64))):
        torch.manual_seed(m)
        qw = quantize_weight(torch.randn(n, k) * 0.05, QuantSpec(dtype="int4", group_size=group, symmetric=symmetric))
        t, g = qw.tensors, qw.spec.group_for(k)
        x = torch.randn(m, 2 * k)[:, ::2]
        expected = reference.qlinear(x, qw, None)
        for name, y in (("row", gemv4_impl(x, t["qweight"], t["scales"], t.get("zeros"), g, config)),
                        ("tile", wonly_mm_impl(x.contiguous(), t["qweight"], t["scales"], t.get("zeros"), 4, g))):
            error = ((y - expected).norm() / expected.norm()).item()
            print(name, n, k, g, symmetric, m, config, error)
            assert error < 1e-5, (name, n, k, g, symmetric, m, error)
""")


def test_the_int4_kernels_match_the_reference_in_the_interpreter():
    """The row kernel's indexing (groups of 8 to 128 and 96, per channel, split K, tails of K, zeros,
    several rows, a non-contiguous x) and the tile kernel's, run by Triton's interpreter on the CPU
    (``TRITON_INTERPRET=1`` must be set before triton is imported: a child process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("\n") == 10, done.stdout
