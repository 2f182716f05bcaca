"""The tile kernel: int4 or int8 codes dequantized in registers and multiplied on the tensor cores, for
the rows at which a layer stops being a pass over its weight (a batch of decode rows, a prefill chunk).

A program owns ``BLOCK_M`` rows of x and ``BLOCK_N`` output channels and walks K in ``BLOCK_K`` steps. The
codes of a ``[BLOCK_N, BLOCK_K]`` tile are read as whole int32 words (the canonical layout, viewed: no
repacking), spread to one code per element by joins (``_spread``: a thread holds a word's codes side by
side, so they convert in pairs and reach shared memory 16 bytes at a time), reshaped to ``[BLOCK_N,
BLOCK_K]`` (k = codes per word x word + j, the order the checkpoint stores), turned into ``(q - z) * s`` in
fp32, rounded to x's dtype as the reference path rounds, and accumulated as ``x_tile @ w_tile.T`` in fp32. x is read whole and contiguous per row.
``BLOCK_K`` divides the group (or the group is the row), so one scale and zero serve a row of the tile;
groups that no tile of 16 or more divides take a scale per code (a gather, for odd grids only).
At few tiles (small M on a narrow layer) K is split; the last program of a tile adds the partial sums
(``triton_split.py``).

The dequantization costs per code what the row kernel pays, but once per ``BLOCK_M`` rows. Codes become
floats by setting exponent bits, not by conversion instructions (a quarter of the float rate on Hopper).

Measured on an H200 (``benchmarks/results/wonly-dispatch-h200.txt``), per decoder layer of the 8B shape,
int4 g128 against bf16 ``F.linear``: 0.83-0.85x at 3 to 16 rows, 0.69x at 64 (with the joins 0.87-0.90x at 8-16,
0.72x at 64; int8 per channel 0.77x -> 0.96x at 16 rows: ``results/tile-joins-h200.txt``; with narrower tiles,
a K step of 128 and more programs per SM, ``gemm_config``, int4 1.03x at 16 rows, 0.82x at 64, int8 1.18x and
0.84x: ``results/tile-shapes-h200.txt``), and from 128 rows up
0.44-0.51x: there it is bound by the tensor cores fed through shared memory with a tile dequantized in
registers (about 330 TFLOP/s against cuBLAS's 650-700), and dequantize + cuBLAS takes over. Tried and
dropped: the swapped product (``W @ x.T``, the dequantized tile as wgmma's register operand), 2-6% slower
at 16 to 256 rows. Its first version loaded x's even and odd columns apart (strided, unvectorizable),
converted each code with an integer-to-float instruction and dequantized into two half tiles; it ran at
0.03-0.11x bf16 from 64 rows up (``results/kernels-gpu-llama8b-shapes-h200.txt``). Also dropped: the row
kernel's bf16-pair decode here (``q - z`` exact in bf16 to the tensor cores, K permuted to the pairs'
order): 5.2 instructions per code against 9.0 in the SASS, yet 0.56x bf16 per layer at 16 rows against
0.83x, 0.16x at 64 (``results/gemv4-bf16-pairs-h200.txt``): the instruction count is not this kernel's bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantdeploy.kernels.triton_split import buffers, store_or_reduce


MAGIC = tl.constexpr(8388608.0)  # 2^23: a code OR-ed into the mantissa of this float reads as 2^23 + q


@triton.jit
def _affine(codes, z, s):
    """``(q - z) * s`` in fp32, ``z`` given as ``2^23 + z``: the code becomes a float by setting exponent
    bits (an integer-to-float conversion runs at a quarter of the float rate: it was the kernel's bound)."""
    return ((codes | 0x4B000000).to(tl.float32, bitcast=True) - z) * s


@triton.jit
def _spread(words, BITS: tl.constexpr):
    """The codes of ``[n, w]`` int32 words as ``[n, w, 2, 2(, 2)]`` (the word's codes in order when flattened),
    made by joins: each join puts its new axis in the thread's registers, so a thread holds a word's codes
    side by side. Spreading them along a new axis by broadcast shifts instead (``[n, w, codes]``, reshaped)
    gave each code a register of its own: 64 scalar shared-memory stores and 64 conversions per thread
    and tile on the way to the tensor cores, where these layouts store 16 bytes at once and convert
    pairs (Triton's PTX for sm_90, int4 at 16 x 128 x 64). Code ``j`` of a word sits at bits ``BITS * j``;
    the last join splits even from odd codes, the one before by the next bit of ``j``, and so on."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 4:
        return tl.join(tl.join(tl.join(words & MASK, (words >> 16) & MASK), tl.join((words >> 8) & MASK, (words >> 24) & MASK)),
                       tl.join(tl.join((words >> 4) & MASK, (words >> 20) & MASK), tl.join((words >> 12) & MASK, (words >> 28) & MASK)))
    else:  # 8 bits: four codes
        return tl.join(tl.join(words & MASK, (words >> 16) & MASK), tl.join((words >> 8) & MASK, (words >> 24) & MASK))


@triton.jit
def _dequant_tile(words, s_ptr, z_ptr, f_ptr, offs_n, mask_n, k0, ks, K, n_groups, BITS: tl.constexpr,
                  GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, FINE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, LUT: tl.constexpr, FP8: tl.constexpr, OFFSET: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_K]`` fp32 weights of a tile from its int32 ``words`` (codes at k = ``ks``):
    codes spread by shifts along a new last axis, then one scale (and zero) per row of the tile, or per
    code when the group is narrower than the tile (``FINE``). ``LUT``: the codes index 16 fp32 values at
    ``z_ptr`` (NF4), times the scale; ``FP8``: the bytes are E4M3 values, times the scale; ``OFFSET``: real
    zero points, integer parts at ``z_ptr`` and fractions at ``f_ptr``."""
    if LUT or FINE:  # a code per register. NF4's table lookup is a gather, which the joined layout sent through
        # shared memory; zeros per code (groups no tile divides) gave wrong sums with it on an H200 (Triton 3.6)
        PER_WORD: tl.constexpr = 32 // BITS
        shifts = tl.arange(0, PER_WORD) * BITS
        codes = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (BLOCK_N, BLOCK_K))
    else:
        codes = tl.reshape(_spread(words, BITS), (BLOCK_N, BLOCK_K))
    if FINE:
        meta = offs_n[:, None] * n_groups + ks[None, :] // GROUP
        mmask = mask_n[:, None] & (ks < K)[None, :]
    else:  # one value per row of the tile, loaded as a vector and broadcast (a [BLOCK_N, 1] load would set
        meta = offs_n * n_groups + k0 // GROUP  # the whole tile's layout to one of its own, one code a register)
        mmask = mask_n
    s = _rows(tl.load(s_ptr + meta, mask=mmask, other=0.0).to(tl.float32), FINE)
    if LUT:
        return tl.load(z_ptr + codes) * s
    if FP8:
        return codes.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32) * s
    if SYMMETRIC:
        z = MAGIC + (1 << (BITS - 1))
    else:
        z = MAGIC + _rows(tl.load(z_ptr + meta, mask=mmask, other=0).to(tl.float32), FINE)
    if OFFSET:
        return _affine(codes, z, s) - _rows(tl.load(f_ptr + meta, mask=mmask, other=0.0).to(tl.float32), FINE) * s
    return _affine(codes, z, s)


@triton.jit
def _rows(values, FINE: tl.constexpr):
    """Per-code values as they are; per-row values as a column."""
    if FINE:
        return values
    else:
        return values[:, None]


def _fit_block_k(block_k: int, group: int, k: int) -> int:
    """``block_k`` halved until it divides the group (per channel: any), but not below 16 (``tl.dot``'s K)."""
    while group < k and group % block_k and block_k > 16:
        block_k //= 2
    return block_k


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, f_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, n_groups, row_words,
                 tiles_per_split, stride_xm, stride_part, BITS: tl.constexpr, GROUP: tl.constexpr,
                 SYMMETRIC: tl.constexpr, IEEE: tl.constexpr, EVEN: tl.constexpr, FINE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 SPLIT: tl.constexpr, LUT: tl.constexpr, FP8: tl.constexpr, OFFSET: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    # programs that share a column of weight tiles run together (L2 reuse of the codes across row tiles)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, WORDS)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    q_rows = q_ptr + offs_n[:, None] * row_words
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tiles_per_split):
        k0 = (pid_k * tiles_per_split + i) * BLOCK_K
        if EVEN:
            x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask_m[:, None], other=0.0)
            words = tl.load(q_rows + k0 // PER_WORD + offs_w[None, :], mask=mask_n[:, None], other=0)
        else:
            in_k = k0 + offs_k < K
            x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask_m[:, None] & in_k[None, :], other=0.0)
            in_w = k0 // PER_WORD + offs_w < row_words
            words = tl.load(q_rows + k0 // PER_WORD + offs_w[None, :], mask=mask_n[:, None] & in_w[None, :], other=0)
        w = _dequant_tile(words, s_ptr, z_ptr, f_ptr, offs_n, mask_n, k0, k0 + offs_k, K, n_groups, BITS, GROUP,
                          SYMMETRIC, FINE, BLOCK_N, BLOCK_K, LUT, FP8, OFFSET).to(x.dtype)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    store_or_reduce(acc, out_ptr, part_ptr, lock_ptr, pid, tl.num_programs(1), offs_m[:, None] * N + offs_n[None, :],
                    mask_m[:, None] & mask_n[None, :], stride_part, SPLIT)


def gemm_config(m: int, n: int, k: int, bits: int, group: int, sms: int,
                dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per SM)``: ``BLOCK_K`` a power of two dividing
    the group where one of 16 or more does (any, per channel); K split until the grid has that many
    programs per SM. The fastest single configuration per M bucket over the four 8B decoder shapes in one
    sweep on an H200 (``results/tile-shapes-h200.txt``): narrow tiles (64 channels, not 128) with a long K
    step (128: one scale per group of 128 and 64-byte runs of int4 codes per channel) and more programs
    per SM. The 128 x 64 tile held 3.4 programs of four warps per SM there (448 programs for gate/up: 0.7 of a
    wave), so no warp was ready to issue on 44% of cycles (Nsight Compute); the per-layer time fell
    by 8-26% at 8-128 rows. int4 at 32 rows takes 64 x 64 (32 x 128 was 2% faster there but kept an
    8-byte stack frame in Triton 3.9's sm_90 build: ``tests/kernels/test_triton_compile.py``), and so
    does int4 with fp16 x at 16 rows (K step 64 there; 0.99x against 1.03x per layer, both measured with bf16 x)."""
    if m <= 16:
        config = (16, 64, 64 if bits == 4 and dtype == torch.float16 else 128, 4, 3, 4)
    elif m <= 32:
        config = (32, 64, 64, 4, 4, 2) if bits == 4 else (32, 64, 128, 4, 3, 2)
    elif m <= 64:
        config = (64, 64, 64, 4, 4, 2)
    else:
        config = (128, 64, 64, 4, 4, 2)
    block_m, block_n, block_k, warps, stages, per_sm = config
    if dtype == torch.float32:  # twice the shared memory per stage (228 KiB per SM on Hopper)
        block_k, stages = min(block_k, 64), 2
    return block_m, block_n, _fit_block_k(block_k, group, k), warps, stages, per_sm


def gemm_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
              group: int, sms: int, config: tuple[int, int, int, int, int] | None = None,
              locks: torch.Tensor | None = None, lut: torch.Tensor | None = None, fp8: bool = False,
              offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` with ``W [N, K]`` stored as ``bits``-bit codes, ``K`` a multiple of the codes per
    int32 word (see the module docstring). ``config`` overrides ``gemm_config`` (the benchmarks' sweep);
    ``locks``: the layer's split-K counters (``triton_split.counters``); ``lut``: NF4's 16 values; ``fp8``: E4M3 codes;
    ``offsets``: real zero points' fractions beside their integer parts in ``zeros``."""
    m, k = x.shape
    n = qweight.shape[0]
    block_m, block_n, block_k, warps, stages, per_sm = config or gemm_config(m, n, k, bits, group, sms, x.dtype)
    if x.stride(1) != 1:
        x = x.contiguous()
    tiles = triton.cdiv(k, block_k)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = 1  # few tiles (a narrow layer at few rows): split K until the grid fills the card
    while programs * split < per_sm * sms and split * 2 <= tiles // 4 and tiles % (split * 2) == 0:
        split *= 2
    per_split = tiles // split
    out, partials, locks = buffers(split, m, n, x, locks, programs)
    if m == 0:
        return out
    table = lut if lut is not None else zeros if zeros is not None else scales
    _gemm_kernel[(programs, split)](x, qweight.view(torch.int32), scales, table,
                                    scales if offsets is None else offsets, out, partials, locks, m, n, k, scales.shape[1], k * bits // 32, per_split,
                                    x.stride(0), m * n,
                                    BITS=bits, GROUP=group, SYMMETRIC=zeros is None, IEEE=x.dtype == torch.float32,
                                    EVEN=k % block_k == 0, FINE=group < k and group % block_k != 0,
                                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, SPLIT=split > 1,
                                    LUT=lut is not None, FP8=fp8, OFFSET=offsets is not None, num_warps=warps,
                                    num_stages=stages)
    return out


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, f_ptr, out_ptr, N, K, n_groups, row_words, BITS: tl.constexpr,
                    GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, FINE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, LUT: tl.constexpr, FP8: tl.constexpr, OFFSET: tl.constexpr):
    """The ``[N, K]`` weight in the output's dtype, as the reference rounds it (fp32, then the dtype)."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_w = k0 // PER_WORD + tl.arange(0, WORDS)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None]
    words = tl.load(q_ptr + offs_n[:, None] * row_words + offs_w[None, :], mask=mask & (offs_w < row_words)[None, :],
                    other=0)
    w = _dequant_tile(words, s_ptr, z_ptr, f_ptr, offs_n, offs_n < N, k0, offs_k, K, n_groups, BITS, GROUP, SYMMETRIC,
                      FINE, BLOCK_N, BLOCK_K, LUT, FP8, OFFSET)
    in_k = mask & (offs_k < K)[None, :]
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=in_k)


def dequantize_impl(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group: int,
                    k: int, dtype: torch.dtype, lut: torch.Tensor | None = None, fp8: bool = False,
                    offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantized ``[N, K]`` weight in ``dtype``, for cuBLAS at many rows (where the matmul's flops,
    not the weight's bytes, are the time: the weight written once in ``dtype`` is then read as bf16 is)."""
    n = qweight.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    block_n, block_k = 16, _fit_block_k(256, group, k)
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        qweight.view(torch.int32), scales, lut if lut is not None else zeros if zeros is not None else scales,
        scales if offsets is None else offsets, out, n, k,
        scales.shape[1], k * bits // 32, BITS=bits, GROUP=group, SYMMETRIC=zeros is None,
        FINE=group < k and group % block_k != 0, BLOCK_N=block_n, BLOCK_K=block_k, LUT=lut is not None, FP8=fp8,
        OFFSET=offsets is not None, num_warps=4)
    return out
