"""Decode attention on CUDA in Triton: each row reads only the cached positions it holds (split-KV,
"flash-decoding"), with grouped-query heads sharing every load and int8/FP8 cache codes dequantized
in the kernel.

Why. A compiled decode step has static shapes (CUDA graphs), so attention written in torch ops has to
span the whole static cache under a mask: its cost grew with ``max_seq_len`` rather than with the
sequences (an 8B-shape batch of 64 ~160-token rows decoded at a third of its speed at a 2,048-token
cache and a tenth at 8,192). Here the per-row lengths are a device tensor and the loop bounds are read
from it inside the kernel: the grid is static, the work is not.

Shape of the work. The grid is ``(rows, kv_heads, splits)``. A program takes one row, one KV head and
one contiguous slice of that row's positions (the row's length divided into ``splits`` slices of whole
``BLOCK_N`` tiles, so a short row leaves its late splits empty and they return at once). It loads the
``rep`` query heads that share the KV head as one ``[REP_P, D]`` tile (padded to 16 rows for
``tl.dot``), streams ``[BLOCK_N, D]`` tiles of keys and values once for all of them (a tile is one block
of the paged cache, ``engine/kv_cache.py``, looked up in the row's block table), and keeps an
online softmax (running max and sum, fp32). With one split it writes the output; with several it
writes each slice's normalized output and log-sum-exp, and a second kernel weighs them together.
``splits`` depends only on the batch bucket, the head count and ``max_seq_len`` (static): as many as
still run in one wave on the card (``splits_for``).

Rounding follows the reference (``models.llama.reduce_attention`` over ``StaticKVCache.read``):
codes become ``code * scale`` in fp32, then the compute dtype; scores ``q . k`` are exact products
summed in fp32 (tensor cores), times ``head_dim ** -0.5``; the probabilities multiply ``v`` in tf32
(fp32 inputs: full fp32); the output is rounded to the compute dtype once.

The op is registered (``quantdeploy::decode_attention``) so torch.compile keeps it whole and CUDA graphs
replay it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantdeploy.kernels.triton_split import sm_count

BLOCK_N = 64
MAX_SPLITS = 64
PROGRAMS_PER_SM = 3  # split programs resident at once on an SM (64 KB of shared memory each at two stages)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, ks_ptr, vs_ptr, out_ptr, part_ptr, lse_ptr, n_heads,
                  sm_scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  stride_tb, stride_ob, stride_oh,
                  REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                  BLOCK: tl.constexpr, SPLITS: tl.constexpr, QUANT: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(len_ptr + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK  # whole tiles per split
    start = s * chunk
    end = tl.minimum(start + chunk, length)
    offs_r = tl.arange(0, REP_P)
    offs_d = tl.arange(0, D_P)
    offs_n = tl.arange(0, BLOCK)
    heads = hk * REP + offs_r
    rmask = offs_r < REP
    dmask = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full((REP_P,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((REP_P,), dtype=tl.float32)
    acc = tl.zeros((REP_P, D_P), dtype=tl.float32)
    if QUANT:
        k_scale = tl.load(ks_ptr + hk)
        v_scale = tl.load(vs_ptr + hk)
    for n0 in range(start, end, BLOCK):  # a tile is one cache block, found through the row's table
        block = tl.load(table_ptr + b * stride_tb + n0 // BLOCK).to(tl.int64)  # block offsets pass 2**31 elements
        pos = n0 + offs_n
        pmask = pos < end
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + block * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + block * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if QUANT:  # the reference's rounding: code * scale in fp32, then the compute dtype
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(pmask[None, :], scores * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="tf32")
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty split (past the row's end) writes zeros
    omask = rmask[:, None] & dmask[None, :]
    if SPLITS == 1:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        row = (b * n_heads + heads) * SPLITS + s  # part [B, H, SPLITS, D], lse [B, H, SPLITS]
        tl.store(part_ptr + row[:, None] * D + offs_d[None, :], o, mask=omask)
        tl.store(lse_ptr + row, m_i + tl.log(l_i), mask=rmask)  # -inf for an empty split


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, out_ptr, n_heads, stride_ob, stride_oh,
                    D: tl.constexpr, D_P: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P)
    smask = offs_s < SPLITS
    offs_d = tl.arange(0, D_P)
    base = (b * n_heads + h) * SPLITS
    lse = tl.load(lse_ptr + base + offs_s, mask=smask, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, 0))  # split 0 always holds the row's first position: the max is finite
    part = tl.load(part_ptr + (base + offs_s)[:, None] * D + offs_d[None, :],
                   mask=smask[:, None] & (offs_d < D)[None, :], other=0.0)
    o = tl.sum(weights[:, None] * part, 0) / tl.sum(weights, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def splits_for(batch: int, kv_heads: int, max_seq_len: int, sms: int) -> int:
    """How many slices each row's positions are cut into: the largest power of two whose programs still
    run in one wave (``PROGRAMS_PER_SM`` per SM), while a full row gives every slice four tiles.

    One wave, measured on an H200 (``benchmarks/attention_gpu.py``, 8B heads, bf16): at 16 rows of 8,192
    positions 2 splits (256 programs) read at 94% of the copy bandwidth, 4 splits (512 programs: 1.3
    waves) at 80%, 8 at 95%; at one row of 32,768 positions 32 splits 78%, 64 splits 69%."""
    most = max(1, min(MAX_SPLITS, max_seq_len // (4 * BLOCK_N)))
    splits = 1
    while splits * 2 <= most and batch * kv_heads * splits * 2 <= PROGRAMS_PER_SM * sms:
        splits *= 2
    return splits


def decode_attention_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                          lengths: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                          splits: int | None = None, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """``q [B, H, D]`` of rows ``0..B-1`` against their first ``lengths [B]`` cached positions, held in the
    blocks ``block_table [rows >= B, S / BLOCK_N]`` names of ``k_cache``/``v_cache`` ``[blocks, Hkv, BLOCK_N, D]``
    → ``[B, H, D]`` in ``q``'s dtype. ``splits`` overrides ``splits_for``; it and the launch settings are for benchmarks."""
    batch, n_heads, dim = q.shape
    _, kv_heads, block, _ = k_cache.shape
    if block != BLOCK_N:
        raise ValueError(f"cache blocks of {block} positions; this kernel reads blocks of {BLOCK_N}")
    max_seq_len = block_table.shape[1] * BLOCK_N
    rep = n_heads // kv_heads
    splits = splits or splits_for(batch, kv_heads, max_seq_len, sm_count(q.device))
    out = q.new_empty(q.shape)
    if batch == 0:
        return out
    if splits > 1:
        part = torch.empty((batch, n_heads, splits, dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, n_heads, splits), dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused
    quant = k_scale is not None
    d_p = triton.next_power_of_2(dim)
    _split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_table, lengths, k_scale if quant else q, v_scale if quant else q, out, part, lse,
        n_heads, dim ** -0.5, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0), out.stride(0), out.stride(1),
        REP=rep, REP_P=max(16, triton.next_power_of_2(rep)), D=dim, D_P=d_p, BLOCK=BLOCK_N, SPLITS=splits,
        QUANT=quant, IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _combine_kernel[(batch, n_heads)](part, lse, out, n_heads, out.stride(0), out.stride(1),
                                          D=dim, D_P=d_p, SPLITS=splits, SPLITS_P=triton.next_power_of_2(splits),
                                          num_warps=4)
    return out


@torch.library.custom_op("quantdeploy::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     lengths: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    return decode_attention_impl(q.contiguous(), k_cache, v_cache, block_table, lengths, k_scale, v_scale)


@decode_attention.register_fake
def _(q, k_cache, v_cache, block_table, lengths, k_scale, v_scale):  # noqa: ANN001, ANN202 - shapes for torch.compile
    return q.new_empty(q.shape)
