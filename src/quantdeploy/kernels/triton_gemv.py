"""The row kernel: int4 or int8 codes times a few rows of x, in registers, without tensor cores.

Why a kernel without tensor cores. At a few rows a layer's time is the bytes of its weight, and a
tensor-core tile kernel spends its time on per-code work instead (a conversion per code, each dequantized
tile's trip through shared memory to the tensor cores). This kernel reads the codes as int32 words (eight
int4 or four int8 codes per word: the canonical layout viewed whole), makes ``q - z`` of each code by
setting the exponent bits of a float (``2^23 + q``, minus ``2^23 + z``: no conversion instruction), and
multiplies in fp32. A program holds few output channels and a long stretch of K (a tile of words as
``[channels, chunks, words of a chunk]``, a chunk never straddling a group), so x is loaded and converted
once per tile and shared by every channel the program holds, and the scale is applied once per chunk.

``ROWS`` rows of x share one decode of the codes: the decode (shift, mask, or, subtract per code) is paid
once and each extra row costs a fused multiply-add per code (a pass over the weight per row would cost
the whole layer again), so the dispatch sends it up to four rows.

int4 codes against bf16 x (the case decode runs) go two at a time (``_dot8_pairs``, inline PTX): codes j
and j + 4 of a word land in the mantissas of a bf16 pair under an exponent of 128 (one LOP3 for two codes,
``128 + q`` exact), one packed FMA subtracts ``128 + z`` (exact), and four packed FMAs multiply by x and add;
each word's pair is summed in fp32 and scaled in fp32 per chunk. Compiled for sm_90, that is 3.2
instructions per code in the main loop against 7.1 for the fp32 decode (``benchmarks/results/gemv4-bf16-
pairs-h200.txt``): on an H200 at one row, per 8B decoder layer, 55 µs against bf16 ``F.linear``'s 115
(2.09x), gate/up 58% of the copy bandwidth (the fp32 decode: 1.56x, 40%); with the split-K sums inside
the kernel (``triton_split.py``) 48.8 µs against 118.8 (2.43x), gate/up 65%. The products are rounded to
bf16 (8 bits) and four of them added in bf16 before the fp32 sum: an error of the order of x's own bf16
rounding, which the reference (weights rounded to bf16, fp32 accumulation) does not have. fp16 and fp32 x,
int8 codes, and Triton's interpreter (which runs no PTX) take the fp32 decode, exact in the weights.

History (``benchmarks/results/gemv4-row-kernel-h200.txt``): the first row kernel held many channels and a
short stretch of K, converted x per code through shared memory, and lost to bf16 on three of four 8B
layers; this long-K tile beat bf16 on all four at one row (gate/up 35.2 µs vs 55.1 on an H200).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantdeploy.kernels.triton_split import buffers, store_or_reduce

#: Triton's CPU interpreter runs no inline PTX: there the bf16 pairs (``_dot8_pairs``) give way to fp32 math
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

#: 2^23 as a float: a code ``q`` OR-ed into its mantissa reads as ``2^23 + q``
MAGIC = tl.constexpr(8388608.0)


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
def _four(x):
    """``x [..., 4]`` as its four slices ``x[..., j]``."""
    a, b = tl.split(tl.reshape(x, x.shape[:-1] + [2, 2]))  # j even, j odd
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, b0, a1, b1


@triton.jit
def _code(words, shift: tl.constexpr, mask: tl.constexpr, z):
    """``q - z`` in fp32 for the code at ``shift``: the code under a float exponent of 2^23, exactly."""
    return ((words >> shift) & mask | 0x4B000000).to(tl.float32, bitcast=True) - z


@triton.jit
def _decode_dot(words, x, z, BITS: tl.constexpr):
    """``sum_j (q_j - z) * x[..., j]`` over the codes of each word; ``words`` and ``x`` (with a last axis of
    the codes per word) broadcast against each other: the rows' axis, where there are several, is x's."""
    CODE: tl.constexpr = (1 << BITS) - 1
    if BITS == 4:
        x0, x1, x2, x3, x4, x5, x6, x7 = _eight(x)  # x at k = 8 * word + j
        part = _code(words, 0, CODE, z) * x0
        part += _code(words, 4, CODE, z) * x1
        part += _code(words, 8, CODE, z) * x2
        part += _code(words, 12, CODE, z) * x3
        part += _code(words, 16, CODE, z) * x4
        part += _code(words, 20, CODE, z) * x5
        part += _code(words, 24, CODE, z) * x6
        part += _code(words, 28, CODE, z) * x7
    else:
        x0, x1, x2, x3 = _four(x)  # x at k = 4 * word + j
        part = _code(words, 0, CODE, z) * x0
        part += _code(words, 8, CODE, z) * x1
        part += _code(words, 16, CODE, z) * x2
        part += _code(words, 24, CODE, z) * x3
    return part


#: ``sum_j (q_j - z) x_j`` over the eight int4 codes of a word in bf16x2 arithmetic, added up in fp32.
#: Operands: $1 the word, $2..$5 x as bf16 pairs (x_j low half, x_{j+4} high half), $6 ``-(128 + z)`` as a
#: bf16 pair. Codes j and j + 4 (bits 4j and 4j + 16) land in the mantissas of a bf16 pair under an exponent
#: of 128 (one LOP3: ``128 + q`` each, exact), then one packed FMA per pair subtracts ``128 + z`` (exact) and
#: four more multiply by x and add, two codes an instruction; the pair's halves are summed in fp32.
_DOT8_BF16 = tl.constexpr("""{
.reg .b32 t1, t2, t3, c0, c1, c2, c3, a, m, g, one, nz;
mov.b32 m, 0x000F000F;
mov.b32 g, 0x43004300;
mov.b32 one, 0x3F803F80;
mov.b32 nz, 0x80008000;
shr.u32 t1, $1, 4;
shr.u32 t2, $1, 8;
shr.u32 t3, $1, 12;
lop3.b32 c0, $1, m, g, 0xEA;
lop3.b32 c1, t1, m, g, 0xEA;
lop3.b32 c2, t2, m, g, 0xEA;
lop3.b32 c3, t3, m, g, 0xEA;
fma.rn.bf16x2 c0, c0, one, $6;
fma.rn.bf16x2 c1, c1, one, $6;
fma.rn.bf16x2 c2, c2, one, $6;
fma.rn.bf16x2 c3, c3, one, $6;
fma.rn.bf16x2 a, c0, $2, nz;
fma.rn.bf16x2 a, c1, $3, a;
fma.rn.bf16x2 a, c2, $4, a;
fma.rn.bf16x2 a, c3, $5, a;
shl.b32 t1, a, 16;
and.b32 t2, a, 0xFFFF0000;
add.f32 $0, t1, t2;
}""")


@triton.jit
def _pair(lo, hi):
    """Two bf16 tensors as one int32 tensor of bf16 pairs (``lo`` in the low half)."""
    return lo.to(tl.uint16, bitcast=True).to(tl.uint32) | (hi.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)


@triton.jit
def _dot8_pairs(words, x, zp):
    """``_decode_dot`` for int4 codes and bf16 x (last axis the word's eight x values), in bf16x2."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _eight(x)
    return tl.inline_asm_elementwise(_DOT8_BF16, "=f,r,r,r,r,r,r",
                                     [words, _pair(x0, x4), _pair(x1, x5), _pair(x2, x6), _pair(x3, x7), zp],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _zero_pair(z):
    """``-(128 + z)`` as a bf16 pair, int32 (``z`` the zero point, float)."""
    h = (-(128.0 + z)).to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return (h | (h << 16)).to(tl.int32, bitcast=True)


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, part_ptr, lock_ptr, M, N, n_groups, tiles_per_split, row_words,
                 stride_xm, stride_part, BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
                 SYMMETRIC: tl.constexpr, EVEN: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                 CHUNK: tl.constexpr, CHUNKS: tl.constexpr, PAIRS: tl.constexpr, SPLIT: tl.constexpr):
    """``ROWS`` rows of x. A program owns ``BLOCK_N`` output channels and a run of K tiles; a tile is
    ``CHUNKS`` chunks of ``CHUNK`` int32 words, a chunk never straddling a group, so the codes of a tile
    are ``[BLOCK_N, CHUNKS, CHUNK]``, their scales ``[BLOCK_N, CHUNKS]`` and x ``[ROWS, CHUNKS, CHUNK,
    codes per word]`` (converted once, shared by every channel). ``EVEN``: the splits' tiles cover the row
    exactly, so nothing along K is masked (a mask that varies along a row stops its loads from being
    vectorized). One row keeps x three-dimensional: a leading axis of one still changes Triton's layouts
    (a fifth more instructions per tile, measured in the compiled SASS)."""
    PER_WORD: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, CHUNK)
    mask_n = offs_n < N
    mask_r = offs_r < M
    chunk = pid_k * tiles_per_split * CHUNKS + tl.arange(0, CHUNKS)
    last = tl.minimum((pid_k + 1) * tiles_per_split * CHUNKS, tl.cdiv(row_words, CHUNK))  # past this split
    if PAIRS:  # -(128 + z) as bf16 pairs for _dot8_pairs; symmetric codes are centred on 2^(bits-1)
        z = _zero_pair(tl.full((1, 1, 1), 1 << (BITS - 1), tl.float32))
    else:  # 2^23 + z for _code
        z = MAGIC + (1 << (BITS - 1))
    if PER_CHANNEL:  # one scale (and zero) per channel: the scale applied once, after the sum over K
        s_row = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if not SYMMETRIC:
            z = tl.load(z_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[:, None, None]
            z = _zero_pair(z) if PAIRS else MAGIC + z
    if ROWS == 1:
        acc = tl.zeros((BLOCK_N, CHUNKS, CHUNK), dtype=tl.float32)  # summed over K once, at the end
        x_row = x_ptr + tl.program_id(2) * stride_xm
    else:
        acc = tl.zeros((ROWS, BLOCK_N, CHUNKS, CHUNK), dtype=tl.float32)
        x_row = x_ptr + offs_r[:, None, None, None] * stride_xm
    for _ in range(0, tiles_per_split):
        word = chunk[:, None] * CHUNK + offs_w[None, :]
        kk = word[:, :, None] * PER_WORD + tl.arange(0, PER_WORD)[None, None, :]
        rows = q_ptr + offs_n[:, None, None] * row_words + word[None]
        in_k = (chunk[:, None] < last) & (word < row_words)
        words = tl.load(rows, mask=mask_n[:, None, None] if EVEN else mask_n[:, None, None] & in_k[None], other=0)
        if ROWS == 1:
            if EVEN:
                x = tl.load(x_row + kk)
            else:
                x = tl.load(x_row + kk, mask=in_k[:, :, None], other=0.0)
        else:
            xmask = mask_r[:, None, None, None] if EVEN else mask_r[:, None, None, None] & in_k[None, :, :, None]
            x = tl.load(x_row + kk[None], mask=xmask, other=0.0)
        if not PAIRS:
            x = x.to(tl.float32)
        zt = z
        if not PER_CHANNEL:
            meta = offs_n[:, None] * n_groups + (chunk * (CHUNK * PER_WORD) // GROUP)[None, :]
            mmask = mask_n[:, None] if EVEN else mask_n[:, None] & (chunk < last)[None, :]
            s = tl.load(s_ptr + meta, mask=mmask, other=0.0).to(tl.float32)
            if not SYMMETRIC:
                zt = tl.load(z_ptr + meta, mask=mmask, other=0).to(tl.float32)[:, :, None]
                zt = _zero_pair(zt) if PAIRS else MAGIC + zt
        if ROWS == 1:
            part = _dot8_pairs(words, x[None], zt) if PAIRS else _decode_dot(words, x[None], zt, BITS)
            acc += part if PER_CHANNEL else part * s[:, :, None]
        else:
            part = (_dot8_pairs(words[None], x[:, None], zt[None]) if PAIRS
                    else _decode_dot(words[None], x[:, None], zt, BITS))
            acc += part if PER_CHANNEL else part * s[None, :, :, None]
        chunk += CHUNKS
    if ROWS == 1:
        total = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]  # [1, BLOCK_N]
    else:
        total = tl.sum(tl.sum(acc, axis=3), axis=2)  # [ROWS, BLOCK_N]
    if PER_CHANNEL:
        total = total * s_row[None, :]
    store_or_reduce(total, out_ptr, part_ptr, lock_ptr, pid_n + tl.num_programs(0) * tl.program_id(2),
                    tl.num_programs(1), offs_r[:, None] * N + offs_n[None, :], mask_r[:, None] & mask_n[None, :],
                    stride_part, SPLIT)


def gemv_config(rows: int, n: int, k: int, bits: int, group: int, sms: int) -> tuple[int, int, int, int, int, int]:
    """``(ROWS, BLOCK_N, CHUNK, CHUNKS, warps, min_programs)``. Chunks of up to 16 words that divide the
    group; K split until the grid has four programs per SM. Channels per program, words per tile and
    warps by N and rows: the fastest of ``benchmarks/wonly_dispatch.py --sweep`` on an H200 at the 8B
    shapes, int4 g128 in bf16 pairs (``results/gemv4-bf16-pairs-h200.txt``). One row: up to 4,096 outputs
    32 channels x 32 words on 2 warps (o, down), up to 16,384 8 x 64 on 2 (qkv), wider 64 x 32 on 4
    (gate/up); two rows 16 / 8 / 16 channels; four rows 16 channels up to 4,096 outputs, else 32."""
    per_word = 32 // bits
    if group >= k:  # per channel: any chunk, the tail masked
        chunk = 16
    else:
        chunk = 1
        while chunk < 16 and (group // per_word) % (2 * chunk) == 0:
            chunk *= 2
    block_rows = min(triton.next_power_of_2(max(rows, 1)), 8)
    if block_rows == 1:
        block_n, words, warps = (32, 32, 2) if n <= 4096 else (8, 64, 2) if n <= 16384 else (64, 32, 4)
    elif block_rows == 2:
        block_n, words, warps = (16, 32, 2) if n <= 4096 else (8, 32, 2) if n <= 16384 else (16, 64, 4)
    else:
        block_n, words, warps = (16, 32, 2) if n <= 4096 else (32, 32, 4)
    return block_rows, block_n, chunk, max(1, words // chunk), warps, 4 * sms


def gemv_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              bits: int, group: int, sms: int, config: tuple[int, int, int, int, int, int] | None = None,
              locks: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` for int4/int8 codes, ``K`` and ``group`` multiples of the codes per word, one pass
    over the weight per ``ROWS`` rows of x. ``config`` overrides ``gemv_config`` (the benchmarks' sweep);
    ``locks``: the layer's split-K counters (``triton_split.counters``)."""
    m, k = x.shape
    n = qweight.shape[0]
    block_rows, block_n, chunk, chunks, warps, min_programs = config or gemv_config(m, n, k, bits, group, sms)
    if x.stride(1) != 1:
        x = x.contiguous()
    row_words = k * bits // 32
    tiles = triton.cdiv(triton.cdiv(row_words, chunk), chunks)
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_rows)
    split = 1  # a layer with few outputs splits K until the grid fills the card; partial sums added after
    while programs * split < min_programs and split * 2 <= tiles // 2:
        split *= 2
    per_split = triton.cdiv(tiles, split)
    even = row_words == per_split * split * chunks * chunk  # every split's tiles inside the row, whole
    grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, block_rows))
    out, partials, locks = buffers(split, m, n, x, locks, grid[0] * grid[2])
    _gemv_kernel[grid](x, qweight.view(torch.int32), scales, zeros if zeros is not None else scales, out, partials,
                       locks, m, n, scales.shape[1], per_split, row_words, x.stride(0), m * n, BITS=bits, GROUP=group,
                       PER_CHANNEL=group >= k, SYMMETRIC=zeros is None, EVEN=even, ROWS=block_rows,
                       BLOCK_N=block_n, CHUNK=chunk, CHUNKS=chunks,
                       PAIRS=bits == 4 and x.dtype == torch.bfloat16 and not INTERPRETED, SPLIT=split > 1,
                       num_warps=warps, num_stages=2)
    return out
