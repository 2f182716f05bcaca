"""Weight-only quantized matmul on CUDA in Triton: int4 and int8 codes (symmetric or with zero points,
in groups or per channel) dequantized in registers and multiplied on the tensor cores.

Why this shape. A decode step reads every weight once and does two flops per weight and row, so at
small M its time is the bytes of the weights: int4 codes are a quarter of bf16's, and the kernel is
only worth having if it streams them at close to the copy bandwidth. The reference path instead
dequantizes the whole weight to fp32 (4 bytes written and read again per weight) before a dense
matmul, which is why a quantized model decoded slower than bf16 on a GPU.

One kernel covers every M: a program owns ``BLOCK_M`` rows of ``x`` and ``BLOCK_N`` output channels,
walks K in ``BLOCK_K`` steps, loads the packed codes of a ``[BLOCK_N, BLOCK_K]`` tile (int4: each byte
holds two neighbours along K, the even index in the low nibble, as the checkpoint stores them), turns
them into ``(q - z) * s`` in fp32, rounds that to the compute dtype exactly as the reference does, and
accumulates ``x_tile @ w_tile.T`` on the tensor cores in fp32. At M <= 16 the rows are padded to 16 for
``tl.dot`` (the weight tile, not x, is what costs). The canonical layout is read as stored: no repacking,
so the checkpoint and the kernel share one copy of the weight.

The tile sizes come from a fixed rule of (M, N, K), not from autotuning: autotuning benchmarks at its
first call, which must not happen inside a CUDA-graph capture. ``benchmarks/kernels_gpu.py`` measures
the kernel against bf16 ``F.linear``; ``kernels.prepare`` uses it up to the M where it stops paying.

The op is registered (``quantdeploy::wonly_mm``) so torch.compile keeps it whole (a fake implementation
gives the output shape) and CUDA graphs replay it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _wonly_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, n_groups, stride_xm, stride_om,
                  BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
                  SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    row_bytes = K * BITS // 8
    PACK: tl.constexpr = 8 // BITS  # codes per byte: 2 for int4, 1 for int8
    WIDTH: tl.constexpr = BLOCK_K // PACK  # bytes of one row in a tile
    offs_b = tl.arange(0, WIDTH)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, K_TILES // SPLIT_K):  # constant bounds: one compiled kernel per layer width
        k0 = (pid_k * (K_TILES // SPLIT_K) + i) * BLOCK_K  # SPLIT_K divides K_TILES: each split a run of tiles
        # one scale (and zero) per row for the whole tile: BLOCK_K divides the group, or the group is the row
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n * n_groups + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        if SYMMETRIC:
            z = 2.0 ** (BITS - 1)
        else:
            z = tl.load(z_ptr + offs_n * n_groups + g, mask=mask_n, other=0).to(tl.float32)[:, None]
        bmask = mask_n[:, None] & (k0 // PACK + offs_b < row_bytes)[None, :]
        packed = tl.load(q_ptr + offs_n[:, None] * row_bytes + k0 // PACK + offs_b[None, :], mask=bmask, other=0)
        if BITS == 4:  # the even code in the low nibble: multiply the low nibbles by x's even columns
            k_even = k0 + 2 * offs_b
            xmask = mask_m[:, None] & (k_even < K)[None, :]
            x_even = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_even[None, :], mask=xmask, other=0.0)
            x_odd = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_even[None, :] + 1, mask=xmask, other=0.0)
            w_even = (((packed & 0xF).to(tl.float32) - z) * s).to(x_even.dtype)
            w_odd = (((packed >> 4).to(tl.float32) - z) * s).to(x_even.dtype)
            if IEEE:
                acc += tl.dot(x_even, tl.trans(w_even), input_precision="ieee")
                acc += tl.dot(x_odd, tl.trans(w_odd), input_precision="ieee")
            else:
                acc += tl.dot(x_even, tl.trans(w_even))
                acc += tl.dot(x_odd, tl.trans(w_odd))
        else:
            offs_k = k0 + offs_b
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            w = ((packed.to(tl.float32) - z) * s).to(x.dtype)  # the reference's rounding: fp32, then x's dtype
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    omask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(out, acc, mask=omask)


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def tiles(m: int, n: int, k: int, group: int, bits: int, sms: int, wide: bool = False) -> tuple[int, int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)``. ``BLOCK_K`` divides the group so
    one scale serves a row of a tile. Small M streams the weight: enough programs to keep every SM busy
    (a layer with few output tiles splits K, partial sums added atomically); large M is a GEMM tile."""
    block_k = 256 if bits == 4 else 128  # per channel (group == k): any tile; the tail is masked
    while group < k and group % block_k:  # in groups: a power of two that divides the group
        block_k //= 2
    if m <= 16:  # int4 moves half the bytes of int8 per tile row: twice the rows keep as many in flight
        block_m, block_n, warps, stages = 16, 128 if bits == 4 else 64, 4, 4
    elif m <= 64:
        block_m, block_n, warps, stages = (32 if m <= 32 else 64), 64, 4, 4
    else:
        block_m, block_n, warps, stages = 128, 128, 8, 3
    if wide:  # fp32 inputs take twice the shared memory per stage (228 KiB per SM on Hopper)
        block_k, stages = min(block_k, 64), 2
    tiles_n = -(-n // block_n) * -(-m // block_m)
    k_tiles = -(-k // block_k)
    split = 1
    while m <= 64 and tiles_n * split < 2 * sms and split * 2 <= k_tiles // 4 and k_tiles % (split * 2) == 0:
        split *= 2
    return block_m, block_n, block_k, split, warps, stages


def wonly_mm_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int, group: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` with ``W [N, K]`` stored as ``bits``-bit codes (see the module docstring)."""
    m, k = x.shape
    n = qweight.shape[0]
    block_m, block_n, block_k, split, warps, stages = tiles(m, n, k, group, bits, _sms(x.device),
                                                             x.dtype == torch.float32)
    out = (torch.zeros if split > 1 else torch.empty)((m, n), dtype=torch.float32 if split > 1 else x.dtype,
                                                        device=x.device)
    if m == 0:
        return out.to(x.dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    _wonly_kernel[grid](x, qweight, scales, zeros if zeros is not None else scales, out, m, n, k, scales.shape[1],
                        x.stride(0), out.stride(0), BITS=bits, GROUP=group, SYMMETRIC=zeros is None,
                        IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                        K_TILES=triton.cdiv(k, block_k), SPLIT_K=split, num_warps=warps, num_stages=stages)
    return out if split == 1 else out.to(x.dtype)


@torch.library.custom_op("quantdeploy::wonly_mm", mutates_args=())
def wonly_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             bits: int, group: int) -> torch.Tensor:
    return wonly_mm_impl(x.contiguous(), qweight, scales, zeros, bits, group)


@wonly_mm.register_fake
def _(x, qweight, scales, zeros, bits, group):  # noqa: ANN001, ANN202 - the shapes torch.compile needs
    return x.new_empty((x.shape[0], qweight.shape[0]))


#: Up to this many rows the kernel runs; above, the reference path (dequantize, then cuBLAS). From
#: ``benchmarks/kernels_gpu.py`` on an H200 (``benchmarks/results/kernels-gpu-llama8b-shapes-h200.txt``):
#: int4 g128 beat the reference on every 8B layer up to M = 128 and lost at 1024 on three of five; int8
#: beat it everywhere measured (up to 1024).
MAX_ROWS = {4: 128, 8: 1024}


def supports(qw) -> bool:  # noqa: ANN001 - a QuantizedWeight
    spec = qw.spec
    return (spec.dtype in ("int4", "int8") and spec.activations is None
            and qw.tensors["qweight"].device.type == "cuda")


class TritonWeightOnly:
    """A prepared int4/int8 weight-only layer: the Triton kernel up to ``max_rows`` rows, the reference
    path above (the canonical tensors are used as stored, so nothing is copied)."""

    backend = "triton"

    def __init__(self, qw, max_rows: int | None = None) -> None:  # noqa: ANN001
        self.qw = qw
        self.max_rows = MAX_ROWS[qw.spec.bits] if max_rows is None else max_rows
        self.bits = qw.spec.bits
        self.group = qw.spec.group_for(qw.shape[1])
        self.zeros = None if qw.spec.symmetric else qw.tensors["zeros"]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > self.max_rows:
            from quantdeploy.kernels import reference

            return reference.qlinear(x, self.qw, bias)
        t = self.qw.tensors
        y = torch.ops.quantdeploy.wonly_mm(rows, t["qweight"], t["scales"], self.zeros, self.bits, self.group)
        y = y.reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
