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

int4 at one row (a batch-1 decode step) takes a second kernel (``_gemv4_kernel``) without tensor cores:
there the tile kernel's time is its per-code arithmetic (an int-to-float conversion per code, and every
dequantized tile's trip through shared memory to the tensor cores), not the bytes it reads. The row
kernel reads the codes as int32 words (eight per word: the canonical layout viewed whole), makes
``q - z`` of each nibble by setting the exponent bits of a float (``2^23 + q``, minus ``2^23 + z``: no
conversion instruction) and multiplies in fp32. A program holds few output channels and a long stretch
of K (a tile of 64 words as ``[channels, chunks, words of a chunk]``, a chunk never straddling a group),
so x is loaded and converted once per tile and shared by every channel the program holds, and the scale
is applied once per chunk. Its weights are exact, not first rounded to x's dtype as the reference's are:
its error against the fp32 oracle is smaller, and it is not bitwise the reference's. On an H200,
replayed from a CUDA graph at one row, it beats bf16 ``F.linear`` on every 8B layer: gate/up 35.2 µs
(bf16 55.1: 1.57x; 42% of the copy bandwidth), down 20.7 (1.53x), qkv 9.8 (1.53x), o 9.8 (1.08x),
asymmetric 3-12% slower (``benchmarks/results/gemv4-row-kernel-h200.txt``). Its first version held many
channels and a short stretch of K, converted x per code through shared memory, and lost to bf16 on
three of the four layers. At two rows the tile kernel takes over (each row would be a pass over the
weight).

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


@triton.jit
def _eight(x):
    """``x [..., 8]`` as its eight slices ``x[..., j]`` (splits of the last axis, inside each thread)."""
    a, b = tl.split(tl.reshape(x, x.shape[:-1] + [4, 2]))  # j even, j odd
    a0, a1 = tl.split(tl.reshape(a, a.shape[:-1] + [2, 2]))
    b0, b1 = tl.split(tl.reshape(b, b.shape[:-1] + [2, 2]))
    a00, a01 = tl.split(a0)
    a10, a11 = tl.split(a1)
    b00, b01 = tl.split(b0)
    b10, b11 = tl.split(b1)
    return a00, b00, a10, b10, a01, b01, a11, b11


@triton.jit
def _nibble(words, shift: tl.constexpr, z):
    """``q - z`` in fp32 for the nibble at ``shift``: the code under a float exponent of 2^23, exactly."""
    return ((words >> shift) & 0xF | 0x4B000000).to(tl.float32, bitcast=True) - z


@triton.jit
def _gemv4_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, N, n_groups, tiles_per_split, row_words, stride_os,
                  GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, SYMMETRIC: tl.constexpr, EVEN: tl.constexpr,
                  BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    """One row of x. A program owns ``BLOCK_N`` output channels and a run of K tiles; a tile is ``CHUNKS``
    chunks of ``CHUNK`` int32 words (8 codes each), a chunk never straddling a group, so the codes of a
    tile are ``[BLOCK_N, CHUNKS, CHUNK]``, their scales ``[BLOCK_N, CHUNKS]`` and x ``[CHUNKS, CHUNK, 8]``
    (converted once, shared by every channel). ``EVEN``: the splits' tiles cover the row exactly, so
    nothing along K is masked (a mask that varies along a row stops its loads from being vectorized)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, CHUNK)
    mask_n = offs_n < N
    chunk = pid_k * tiles_per_split * CHUNKS + tl.arange(0, CHUNKS)
    last = tl.minimum((pid_k + 1) * tiles_per_split * CHUNKS, tl.cdiv(row_words, CHUNK))  # past this split
    z = 8388608.0 + 8.0  # 2^23 + z for _nibble; symmetric codes are centred on 8
    if PER_CHANNEL:  # one scale (and zero) per channel: the scale applied once, after the sum over K
        s_row = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if not SYMMETRIC:
            z = 8388608.0 + tl.load(z_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[:, None, None]
    acc = tl.zeros((BLOCK_N, CHUNKS, CHUNK), dtype=tl.float32)  # summed over K once, at the end
    for _ in range(0, tiles_per_split):
        word = chunk[:, None] * CHUNK + offs_w[None, :]
        k8 = word[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        rows = q_ptr + offs_n[:, None, None] * row_words + word[None]
        if EVEN:
            words = tl.load(rows, mask=mask_n[:, None, None], other=0)
            x = tl.load(x_ptr + k8).to(tl.float32)
        else:
            in_k = (chunk[:, None] < last) & (word < row_words)
            words = tl.load(rows, mask=mask_n[:, None, None] & in_k[None], other=0)
            x = tl.load(x_ptr + k8, mask=in_k[:, :, None], other=0.0).to(tl.float32)
        zt = z
        if not PER_CHANNEL:
            meta = offs_n[:, None] * n_groups + (chunk * (CHUNK * 8) // GROUP)[None, :]
            mmask = mask_n[:, None] if EVEN else mask_n[:, None] & (chunk < last)[None, :]
            s = tl.load(s_ptr + meta, mask=mmask, other=0.0).to(tl.float32)
            if not SYMMETRIC:
                zt = 8388608.0 + tl.load(z_ptr + meta, mask=mmask, other=0).to(tl.float32)[:, :, None]
        x0, x1, x2, x3, x4, x5, x6, x7 = _eight(x)  # [CHUNKS, CHUNK] each: x at k = 8 * word + j
        part = _nibble(words, 0, zt) * x0[None]
        part += _nibble(words, 4, zt) * x1[None]
        part += _nibble(words, 8, zt) * x2[None]
        part += _nibble(words, 12, zt) * x3[None]
        part += _nibble(words, 16, zt) * x4[None]
        part += _nibble(words, 20, zt) * x5[None]
        part += _nibble(words, 24, zt) * x6[None]
        part += _nibble(words, 28, zt) * x7[None]
        if PER_CHANNEL:
            acc += part
        else:
            acc += part * s[:, :, None]
        chunk += CHUNKS
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    if PER_CHANNEL:
        total = total * s_row
    tl.store(out_ptr + pid_k * stride_os + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)


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


#: int4 layers at one row run ``_gemv4_kernel``; at more, the tile kernel on the tensor cores.
GEMV_ROWS = 1


def gemv4_config(n: int, k: int, group: int, sms: int) -> tuple[int, int, int, int, int]:
    """``(BLOCK_N, CHUNK, CHUNKS, warps, min_programs)`` for the row kernel. Chunks of up to 16 words that
    divide the group; K split until the grid has four programs per SM. Channels per program, words per
    tile and warps by N, the fastest of ``benchmarks/gemv4_layouts.py`` on an H200 at the 8B shapes
    (``results/gemv4-row-kernel-h200.txt``): up to 4,096 outputs 32 channels x 32 words on 2 warps (o,
    down), up to 16,384 8 x 64 on 2 (qkv), wider 16 x 64 on 4 (gate/up)."""
    if group >= k:  # per channel: any chunk, the tail masked
        chunk = 16
    else:
        chunk = 1
        while chunk < 16 and (group // 8) % (2 * chunk) == 0:
            chunk *= 2
    block_n, words, warps = (32, 32, 2) if n <= 4096 else (8, 64, 2) if n <= 16384 else (16, 64, 4)
    return block_n, chunk, max(1, words // chunk), warps, 4 * sms


def gemv4_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               group: int, config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` for int4 codes, ``K`` and ``group`` multiples of 8, one pass over the weight per
    row of x (see the module docstring). ``config`` overrides ``gemv4_config`` (the benchmarks' sweep)."""
    m, k = x.shape
    n = qweight.shape[0]
    block_n, chunk, chunks, warps, min_programs = config or gemv4_config(n, k, group, _sms(x.device))
    row_words = k // 8
    tiles = triton.cdiv(triton.cdiv(row_words, chunk), chunks)
    programs = triton.cdiv(n, block_n)
    split = 1  # a layer with few outputs splits K until the grid fills the card; partial sums added after
    while programs * split < min_programs and split * 2 <= tiles // 2:
        split *= 2
    per_split = triton.cdiv(tiles, split)
    even = row_words == per_split * split * chunks * chunk  # every split's tiles inside the row, whole
    out = torch.empty((split, m, n), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    for row in range(m):
        _gemv4_kernel[(programs, split)](x[row].contiguous(), qweight.view(torch.int32), scales,
                                         zeros if zeros is not None else scales, out[:, row], n, scales.shape[1],
                                         per_split, row_words, m * n, GROUP=group, PER_CHANNEL=group >= k,
                                         SYMMETRIC=zeros is None, EVEN=even, BLOCK_N=block_n, CHUNK=chunk,
                                         CHUNKS=chunks, num_warps=warps, num_stages=2)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)


@torch.library.custom_op("quantdeploy::wonly_mm", mutates_args=())
def wonly_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             bits: int, group: int) -> torch.Tensor:
    if bits == 4 and 0 < x.shape[0] <= GEMV_ROWS and group % 8 == 0:
        return gemv4_impl(x, qweight, scales, zeros, group)
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
    q = qw.tensors["qweight"]
    # the few-row int4 kernel reads the codes as whole int32 words
    return (spec.dtype in ("int4", "int8") and spec.activations is None and q.device.type == "cuda"
            and (spec.bits == 8 or (qw.shape[1] % 8 == 0 and q.data_ptr() % 4 == 0)))


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
