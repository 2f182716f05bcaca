"""Decode attention over the paged KV cache on the CPU, as one registered op (``quantdeploy::
decode_attention_cpu``), so that a compiled decode step reads only the positions the rows hold.

Why an op. A compiled step has static shapes, so attention written in torch ops inside it has to span
every position the cache reserves for a row (``max_seq_len``), whatever the sequences hold: the cost
of a step grew with the context a server was started with. torch.compile keeps a registered op whole
and calls it with real tensors, so the op can read the rows' lengths (a host read costs nothing on the
CPU) and gather only the blocks that hold positions: the work follows the sequences, as the split-KV
kernel's does on CUDA (``kernels/triton_attention.py``). Rows are attended in buckets of similar lengths
(block counts within a power of two), each bucket over its own longest row with a per-row mask, so a row
reads less than twice the positions it holds whatever the longest running row holds (a short request
beside an 8k one does not read 8k positions), for one batched call per bucket. The math is the eager path's
(``scaled_dot_product_attention`` over the gathered keys and values, codes dequantized with the
per-head scales as ``PagedKVCache.read`` does), so compiled and eager decode agree.

The op runs once per layer per step, so its fixed cost is the step's: on 2 CPU cores (AMD EPYC), one
row of the bundled SmolLM2 at 150 positions, a call took 232 µs when blocks were gathered and then
transposed into place (two copies) and the rows' lengths were reduced on tensors; 104 µs now (one
index per row, head and block, shared by keys and values; lengths read once to the host; no mask where
every row is as long as the longest). The compiled int8 decode step of that model at one row went
from 17.1 ms to 14.7-15.8 ms (three runs); the packed int8 matmuls are 9.2 ms of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantdeploy.quant.kv_cache import dequantize_kv


def block_rows(blocks: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a pool seen as ``[blocks * heads, block, D]`` that hold ``blocks [B, nb]``, in
    ``[B, heads, nb]`` order (flat): index_select by them lands the positions in ``[B, heads, nb * block, D]``
    order with one copy, no transpose after (and is 7x faster than advanced indexing on the CPU)."""
    heads_ = torch.arange(heads, dtype=blocks.dtype, device=blocks.device)
    return (blocks[:, None, :] * heads + heads_[None, :, None]).reshape(-1)


def _gather(pool: torch.Tensor, rows: torch.Tensor, b: int, length: int, dtype: torch.dtype,
            scale: torch.Tensor | None) -> torch.Tensor:
    n, heads, block, dim = pool.shape
    x = pool.view(n * heads, block, dim).index_select(0, rows).view(b, heads, -1, dim)[:, :, :length]
    return dequantize_kv(x, scale, dtype) if scale is not None else x


def gather_blocks(pool: torch.Tensor, blocks: torch.Tensor, length: int, dtype: torch.dtype,
                  scale: torch.Tensor | None) -> torch.Tensor:
    """Positions ``0..length-1`` of each row, ``[B, Hkv, length, D]`` in ``dtype``, from the pool's
    ``blocks [B, nb]`` (codes times the per-head ``scale`` when the cache is quantized)."""
    return _gather(pool, block_rows(blocks, pool.shape[1]), blocks.shape[0], length, dtype, scale)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
            lengths: torch.Tensor, held: list[int], k_scale: torch.Tensor | None,
            v_scale: torch.Tensor | None) -> torch.Tensor:
    """``q [b, H, D]`` against the first ``lengths`` positions (``held``: the same, on the host) held in
    ``blocks [b, nb]``: the blocks of the longest of these rows gathered (one index for keys and values),
    the others masked."""
    b, heads, dim = q.shape
    kv_heads, block = k_cache.shape[1], k_cache.shape[2]
    longest = max(held)
    rows = block_rows(blocks[:, :-(-longest // block)], kv_heads)
    k = _gather(k_cache, rows, b, longest, q.dtype, k_scale)
    v = _gather(v_cache, rows, b, longest, q.dtype, v_scale)
    rep = heads // kv_heads
    mask = None  # rows as long as the longest (one row always) need none
    if min(held) < longest:
        mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :].expand(b, 1, rep, longest)
    y = F.scaled_dot_product_attention(q.reshape(b, kv_heads, rep, dim), k, v, attn_mask=mask)
    return y.reshape(b, heads, dim)


@torch.library.custom_op("quantdeploy::decode_attention_cpu", mutates_args=(), device_types="cpu")
def decode_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                         lengths: torch.Tensor, k_scale: torch.Tensor | None,
                         v_scale: torch.Tensor | None) -> torch.Tensor:
    """``q [B, H, D]`` of rows ``0..B-1`` against their first ``lengths [B]`` positions, held in the blocks
    ``block_table [rows >= B, nb]`` names of ``k_cache``/``v_cache`` ``[blocks, Hkv, block, D]``. Rows go
    in buckets by the power of two at or above their block count, each bucket attending over its own
    longest row: a row reads less than twice the blocks it holds (a row without positions gives zeros)."""
    b, block = q.shape[0], k_cache.shape[2]
    held = lengths[:b].tolist()  # one host read (free on the CPU); the bucketing is Python on these ints
    buckets: dict[int, list[int]] = {}
    for row, n in enumerate(held):
        if n:
            buckets.setdefault(1 << ((n + block - 1) // block - 1).bit_length(), []).append(row)
    if len(buckets) == 1 and len(next(iter(buckets.values()))) == b:  # every row in one bucket: no gather of rows
        return _attend(q, k_cache, v_cache, block_table[:b], lengths[:b], held, k_scale, v_scale)
    out = torch.zeros_like(q)
    for rows in buckets.values():
        idx = torch.tensor(rows)
        out[idx] = _attend(q[idx], k_cache, v_cache, block_table[idx], lengths[idx], [held[r] for r in rows],
                           k_scale, v_scale)
    return out


@decode_attention_cpu.register_fake
def _(q, k_cache, v_cache, block_table, lengths, k_scale, v_scale):  # noqa: ANN001, ANN202 - shapes for torch.compile
    return q.new_empty(q.shape)
