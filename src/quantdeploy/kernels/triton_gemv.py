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

int4 codes against bf16 x (the case decode runs) go two at a time (``dot8_pairs``, inline PTX): codes j
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

NF4 codes index 16 levels: with bf16 x a table in registers (``triton_codes._DOT8_NF4``: ``prmt`` lookups, 2.75
instructions a code to its bf16 level, then the same packed FMAs), 1.61x bf16 per 8B layer at one row on
an H200 (``results/nf4-fp8-kernels-h200.txt``); with fp16/fp32 x (and in the interpreter) a load per code
from a 16-entry table, exact in fp32 (a load per code was 0.54x bf16 at bf16, hence the register table).
E4M3 codes (FP8 weight-only, and W8A8 with E4M3 x) convert per byte, exactly, and sum in fp32.

History (``benchmarks/results/gemv4-row-kernel-h200.txt``): the first row kernel held many channels and a
short stretch of K, converted x per code through shared memory, and lost to bf16 on three of four 8B
layers; this long-K tile beat bf16 on all four at one row (gate/up 35.2 µs vs 55.1 on an H200).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantdeploy.kernels.triton_codes import MAGIC, decode_dot, dot8_pairs, fp8_dot, lut_dot, nf4_pairs, zero_pair
from quantdeploy.kernels.triton_split import buffers, store_or_reduce

#: Triton's CPU interpreter runs no inline PTX: there the bf16 pairs (``dot8_pairs``) give way to fp32 math
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, f_ptr, r_ptr, out_ptr, part_ptr, lock_ptr, M, N, n_groups,
                 tiles_per_split, row_words, stride_xm, stride_part, BITS: tl.constexpr, GROUP: tl.constexpr,
                 PER_CHANNEL: tl.constexpr, SYMMETRIC: tl.constexpr, EVEN: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, PAIRS: tl.constexpr,
                 SPLIT: tl.constexpr, LUT: tl.constexpr, FP8: tl.constexpr, ROW_SCALED: tl.constexpr,
                 OFFSET: tl.constexpr):
    """``ROWS`` rows of x. A program owns ``BLOCK_N`` output channels and a run of K tiles; a tile is
    ``CHUNKS`` chunks of ``CHUNK`` int32 words, a chunk never straddling a group, so the codes of a tile
    are ``[BLOCK_N, CHUNKS, CHUNK]``, their scales ``[BLOCK_N, CHUNKS]`` and x ``[ROWS, CHUNKS, CHUNK,
    codes per word]`` (converted once, shared by every channel). ``EVEN``: the splits' tiles cover the row
    exactly, so nothing along K is masked (a mask that varies along a row stops its loads from being
    vectorized). ``LUT``: 4-bit codes index a table of 16 fp32 values at ``z_ptr`` (NF4), scaled per group;
    ``FP8``: the bytes are E4M3 values (x may be E4M3 too: W8A8). ``ROW_SCALED``: each row's sum is
    multiplied by its fp32 scale at ``r_ptr`` too (W8A8's per-token scales, applied here rather than by
    two more kernels). ``OFFSET``: real zero points, split into the integer codes at ``z_ptr`` and the
    fractions at ``f_ptr``: ``sum (q - z - f) x = sum (q - z) x - f sum x``, the sums of x per word made
    once per tile and shared by every channel.
    One row keeps x three-dimensional: a leading axis of one still changes Triton's layouts
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
    if PAIRS:  # -(128 + z) as bf16 pairs for dot8_pairs; symmetric codes are centred on 2^(bits-1)
        z = zero_pair(tl.full((1, 1, 1), 1 << (BITS - 1), tl.float32))
    else:  # 2^23 + z for _code
        z = MAGIC + (1 << (BITS - 1))
    if PER_CHANNEL:  # one scale (and zero) per channel: the scale applied once, after the sum over K
        s_row = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if not SYMMETRIC:
            z = tl.load(z_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[:, None, None]
            z = zero_pair(z) if PAIRS else MAGIC + z
        if OFFSET:
            f = tl.load(f_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None, None]
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
                zt = zero_pair(zt) if PAIRS else MAGIC + zt
            if OFFSET:
                f = tl.load(f_ptr + meta, mask=mmask, other=0.0).to(tl.float32)[:, :, None]
        if ROWS == 1:
            if FP8:
                part = fp8_dot(words, x[None])
            elif LUT and PAIRS:
                part = nf4_pairs(words, x[None])
            elif LUT:
                part = lut_dot(words, x[None], z_ptr)
            elif PAIRS:
                part = dot8_pairs(words, x[None], zt)
            else:
                part = decode_dot(words, x[None], zt, BITS)
            if OFFSET:
                part -= f * tl.sum(x.to(tl.float32), axis=2)[None]
            acc += part if PER_CHANNEL else part * s[:, :, None]
        else:
            if FP8:
                part = fp8_dot(words[None], x[:, None])
            elif LUT and PAIRS:
                part = nf4_pairs(words[None], x[:, None])
            elif LUT:
                part = lut_dot(words[None], x[:, None], z_ptr)
            elif PAIRS:
                part = dot8_pairs(words[None], x[:, None], zt[None])
            else:
                part = decode_dot(words[None], x[:, None], zt, BITS)
            if OFFSET:
                part -= f[None] * tl.sum(x.to(tl.float32), axis=3)[:, None]
            acc += part if PER_CHANNEL else part * s[None, :, :, None]
        chunk += CHUNKS
    if ROWS == 1:
        total = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]  # [1, BLOCK_N]
    else:
        total = tl.sum(tl.sum(acc, axis=3), axis=2)  # [ROWS, BLOCK_N]
    if PER_CHANNEL:
        total = total * s_row[None, :]
    if ROW_SCALED:
        total = total * tl.load(r_ptr + offs_r, mask=mask_r, other=0.0)[:, None]
    store_or_reduce(total, out_ptr, part_ptr, lock_ptr, pid_n + tl.num_programs(0) * tl.program_id(2),
                    tl.num_programs(1), offs_r[:, None] * N + offs_n[None, :], mask_r[:, None] & mask_n[None, :],
                    stride_part, SPLIT)


def gemv_config(rows: int, n: int, k: int, bits: int, group: int, sms: int,
                lut: bool = False) -> tuple[int, int, int, int, int, int]:
    """``(ROWS, BLOCK_N, CHUNK, CHUNKS, warps, min_programs)``. Chunks of up to 16 words that divide the
    group; K split until the grid has four programs per SM. Channels per program, words per tile and
    warps by N and rows: the fastest of ``benchmarks/wonly_dispatch.py --sweep`` on an H200 at the 8B
    shapes, int4 g128 in bf16 pairs (``results/gemv4-bf16-pairs-h200.txt``). One row: up to 4,096 outputs
    32 channels x 32 words on 2 warps (o, down), up to 16,384 8 x 64 on 2 (qkv), wider 64 x 32 on 4
    (gate/up); two rows 16 / 8 / 16 channels; four rows 16 channels up to 4,096 outputs, else 32. ``lut``
    (NF4 through table loads, for fp16/fp32 x: a load per code, more registers per code): more warps, up to
    eight words x rows per thread (the int4 tiles spill or hold 250 registers there)."""
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
    if lut:
        warps = max(warps, min(8, block_rows * block_n * words // 256))
    return block_rows, block_n, chunk, max(1, words // chunk), warps, 4 * sms


def gemv_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              bits: int, group: int, sms: int, config: tuple[int, int, int, int, int, int] | None = None,
              locks: torch.Tensor | None = None, lut: torch.Tensor | None = None, fp8: bool = False,
              row_scales: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
              offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` for int4/int8 codes, ``K`` and ``group`` multiples of the codes per word, one pass
    over the weight per ``ROWS`` rows of x. ``config`` overrides ``gemv_config`` (the benchmarks' sweep);
    ``locks``: the layer's split-K counters (``triton_split.counters``); ``lut``: 16 fp32 values the 4-bit
    codes index (NF4; ``scales`` then per group, no zeros); ``fp8``: the codes are E4M3 bytes (x bf16/fp16/fp32,
    or E4M3 itself: then the output is fp32 unless ``out_dtype`` says otherwise); ``row_scales``: fp32 ``[M]``
    each output row is multiplied by (W8A8's per-token scales); ``offsets``: real zero points' fractions
    ``[N, groups]`` beside their integer parts in ``zeros`` (``TritonWeightOnly``)."""
    m, k = x.shape
    n = qweight.shape[0]
    pairs = bits == 4 and x.dtype == torch.bfloat16 and not INTERPRETED  # the bf16x2 decodes (int4 and NF4)
    block_rows, block_n, chunk, chunks, warps, min_programs = config or gemv_config(m, n, k, bits, group, sms,
                                                                                    lut is not None and not pairs)
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
    out, partials, locks = buffers(split, m, n, x, locks, grid[0] * grid[2], out_dtype)
    table = lut if lut is not None else zeros if zeros is not None else scales
    _gemv_kernel[grid](x, qweight.view(torch.int32), scales, table, scales if offsets is None else offsets,
                       scales if row_scales is None else row_scales, out, partials,
                       locks, m, n, scales.shape[1], per_split, row_words, x.stride(0), m * n, BITS=bits, GROUP=group,
                       PER_CHANNEL=group >= k, SYMMETRIC=zeros is None, EVEN=even, ROWS=block_rows,
                       BLOCK_N=block_n, CHUNK=chunk, CHUNKS=chunks,
                       PAIRS=pairs,
                       SPLIT=split > 1, LUT=lut is not None, FP8=fp8, ROW_SCALED=row_scales is not None,
                       OFFSET=offsets is not None, num_warps=warps, num_stages=2)
    return out
