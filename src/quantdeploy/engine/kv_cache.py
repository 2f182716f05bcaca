"""The engine's KV cache: a pool of fixed-size blocks, and a block table saying which blocks hold each
row's positions (paged attention, as vLLM does it).

Why blocks. With one preallocated row of ``max_seq_len`` positions per sequence, memory is reserved for
the longest sequence a request could become, whatever it is: on the Llama-3.1-8B shape (131 KB per
token in bf16) 64 rows of 8,192 positions took 69 GB up front while 64 chats of ~200 tokens use 1.7 GB.
Here a row takes a block of ``BLOCK_TOKENS`` positions when its sequence reaches it, and gives every
block back when it ends, so the number of concurrent sequences is bounded by the tokens they hold, and
``max_seq_len`` costs nothing until a sequence uses it. A block is as long as the decode kernel's
tile (``kernels/triton_attention.py``), so each tile is one contiguous read; a sequence wastes at most
one partly filled block (63 positions).

Shapes stay static for ``torch.compile`` and CUDA graphs: the pool is ``[blocks, Hkv, BLOCK_TOKENS, D]``
per layer and the table ``[rows, max_seq_len / BLOCK_TOKENS]`` (int32) one device tensor shared by
every layer, changed in place between steps. Block 0 is the scratch block: every table entry that
no block backs points at it, so the writes that belong to nobody (padding rows and positions of a
prefill, parked rows of a decode step) land there, and nothing reads it as part of a sequence.

Reading: a decode step reads through the table with ``attend``, a registered op a compiled step keeps
whole: on CUDA the split-KV kernel reads each row's own positions, on the CPU our C++ kernel does the
same in place (fp32 and bf16 caches; for a quantized cache, or without the build, the longest row's
blocks are gathered); otherwise ``read`` gathers a row's blocks into ``[rows, Hkv, length, D]``. Either way a
step costs what the sequences hold, not ``max_seq_len``.

When the checkpoint quantizes the KV cache (``self_attn.k_scale`` / ``v_scale``, see
``quant/kv_cache.py``), blocks hold int8 or FP8 E4M3 codes with the static per-head scales: half the
bytes of bf16 (a quarter of fp32), dequantized as they are read.

Who gets memory (the engine applies these, ``engine/engine.py``): a request is admitted when a row is
free and the free blocks cover its prompt plus one token, with one block to spare for each running
sequence; a running sequence takes its next block when its next position needs one; if none is free,
the most recently admitted running sequence is preempted: its blocks are freed and it is prefilled
again later from its prompt and the tokens it produced (recomputed, not swapped), before any new request.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from quantdeploy.errors import ConfigError
from quantdeploy.kernels import cpu_native
from quantdeploy.kernels.paged_attention_cpu import gather_blocks
from quantdeploy.quant.kv_cache import quantize_kv

log = logging.getLogger(__name__)

CODE_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
DECODE_ATTENTION = ("split_kv", "reduce", "sdpa")  # see models.llama.Attention and PagedKVCache.attend
BLOCK_TOKENS = 64  # positions per block: the decode kernel's tile (kernels.triton_attention.BLOCK_N)
# Without our CPU kernel (not built here, or a quantized cache), a compiled CPU decode step up to this many
# reserved positions per row attends inside the graph ("reduce":
# every reserved position, fused C++), past it through the cache's op (the rows' own blocks, plus the op's
# fixed cost of ~100 µs a layer). Bundled SmolLM2 int4, 2 cores (AMD EPYC), ms per step op / reduce:
# 256 positions 11.0 / 8.2 at one row, 27.8 / 25.2 at eight; 1,024 positions 10.6 / 10.2 and 29.0 / 36.3.
CPU_REDUCE_MAX_POSITIONS = 512
SCRATCH = 0  # the block that table entries without a block of their own point at
# The share of the free device memory the pool may take by default; the rest is for activations (a
# 32k-token prefill of the 8B shape needs ~29 GB of them) and the CUDA graphs.
KV_MEMORY_FRACTION = 0.6


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


def pool_blocks(tokens: int | None, max_batch: int, max_seq_len: int, per_token: int, device: torch.device) -> int:
    """Blocks of the pool: for ``tokens`` positions, or by default every row at ``max_seq_len`` plus a block
    each (the admission rule's spare), on CUDA capped to ``KV_MEMORY_FRACTION`` of the free memory."""
    if tokens is not None:
        return blocks_for(tokens)
    blocks = max_batch * (blocks_for(max_seq_len) + 1)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fits = int(KV_MEMORY_FRACTION * free) // (BLOCK_TOKENS * per_token)
        if fits < blocks:
            log.info("KV cache: %d blocks fit in %.0f%% of the free memory (every row at max_seq_len needs %d)",
                     fits, 100 * KV_MEMORY_FRACTION, blocks)
        blocks = max(min(blocks, fits), blocks_for(max_seq_len))
    return blocks


class BlockTable:
    """Which blocks hold each row's positions: a host copy the engine edits and a device copy the
    kernels read (``sync`` sends the rows that changed), plus the free blocks."""

    def __init__(self, rows: int, max_seq_len: int, n_blocks: int, device: torch.device | str) -> None:
        if n_blocks < blocks_for(max_seq_len) + 1:
            raise ConfigError(f"a KV cache of {n_blocks - 1} blocks ({(n_blocks - 1) * BLOCK_TOKENS} tokens) cannot "
                              f"hold one sequence of max_seq_len {max_seq_len}; give it more memory or lower max_seq_len")
        self.n_blocks = n_blocks
        self.host = torch.full((rows, blocks_for(max_seq_len)), SCRATCH, dtype=torch.int32)
        self.tensor = self.host.to(device)  # what the kernels read
        self.owned: list[list[int]] = [[] for _ in range(rows)]
        self._free = list(range(n_blocks - 1, SCRATCH, -1))  # popped from the end: low ids first
        self._dirty: set[int] = set()

    @classmethod
    def contiguous(cls, rows: int, max_seq_len: int, device: torch.device | str) -> "BlockTable":
        """Every row owns the blocks of ``max_seq_len`` positions up front (a static cache: tests, tools)."""
        table = cls(rows, max_seq_len, rows * blocks_for(max_seq_len) + 1, device)
        for row in range(rows):
            table.grow(row, max_seq_len)
        table.sync()
        return table

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - 1 - len(self._free)

    def grow(self, row: int, tokens: int) -> bool:
        """Give ``row`` blocks for its first ``tokens`` positions; False (and nothing taken) if too few are free."""
        need = blocks_for(tokens) - len(self.owned[row])
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        for _ in range(need):
            block = self._free.pop()
            self.host[row, len(self.owned[row])] = block
            self.owned[row].append(block)
        self._dirty.add(row)
        return True

    def release(self, row: int) -> list[int]:
        """Free every block of ``row``; returns them."""
        blocks, self.owned[row] = self.owned[row], []
        self._free.extend(reversed(blocks))
        self.host[row] = SCRATCH
        self._dirty.add(row)
        return blocks

    def sync(self) -> None:
        """Send the changed rows to the device copy: one copy from pinned memory, queued on the stream."""
        if not self._dirty:
            return
        rows = sorted(self._dirty)
        self._dirty.clear()
        index = torch.tensor(rows, dtype=torch.long)
        values = self.host[index]
        device = self.tensor.device
        if device.type == "cuda":
            index, values = index.pin_memory(), values.pin_memory()
        self.tensor.index_copy_(0, index.to(device, non_blocking=True), values.to(device, non_blocking=True))


class PagedKVCache(nn.Module):
    """One layer's keys and values: ``[blocks, n_kv_heads, BLOCK_TOKENS, head_dim]`` each, addressed
    through the shared ``table`` (a ``BlockTable``)."""

    def __init__(self, table: BlockTable, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, quant: str | None = None,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.quant = quant
        self.table = table
        store = CODE_DTYPES[quant] if quant else dtype
        shape = (table.n_blocks, n_kv_heads, BLOCK_TOKENS, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=store, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=store, device=device), persistent=False)
        self.register_buffer("block_table", table.tensor, persistent=False)  # the same tensor in every layer
        self.native = torch.device(device).type == "cpu" and cpu_native.attends(dtype, quant, head_dim)
        if quant:
            self.register_buffer("k_scale", k_scale.float().to(device), persistent=False)
            self.register_buffer("v_scale", v_scale.float().to(device), persistent=False)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached position takes in this layer (keys and values)."""
        _, heads, _, dim = self.k_cache.shape
        return 2 * heads * dim * self.k_cache.element_size()

    def write(self, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[B, Hkv, T, D]`` at ``positions [B, T]`` of cache ``rows [B]``."""
        if self.quant:
            k, v = quantize_kv(k, self.k_scale, self.quant), quantize_kv(v, self.v_scale, self.quant)
        blocks = self.block_table[rows[:, None], positions // BLOCK_TOKENS]  # [B, T]
        offsets = positions % BLOCK_TOKENS
        self.k_cache[blocks, :, offsets] = k.transpose(1, 2).to(self.k_cache.dtype)  # the view is [B, T, Hkv, D]
        self.v_cache[blocks, :, offsets] = v.transpose(1, 2).to(self.v_cache.dtype)

    def attend(self, q: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Decode attention of ``q [B, H, D]`` (one query per row, rows ``0..B-1``) over each row's first
        ``lengths [B]`` cached positions, a registered op torch.compile keeps whole: on CUDA the split-KV
        kernel reads each row's own positions (``kernels/triton_attention.py``), on the CPU rows in buckets
        of similar lengths each gather their longest row's blocks (``kernels/paged_attention_cpu.py``), or,
        where our CPU kernels are built and the cache holds fp32 or bf16, each row reads its own blocks in
        place (``kernels/cpu_attention.cpp``)."""
        if self.native:
            return torch.ops.quantdeploy_cpu.decode_attention(q, self.k_cache, self.v_cache, self.block_table, lengths)
        scales = (self.k_scale, self.v_scale) if self.quant else (None, None)
        op = torch.ops.quantdeploy.decode_attention if q.is_cuda else torch.ops.quantdeploy.decode_attention_cpu
        return op(q, self.k_cache, self.v_cache, self.block_table, lengths, *scales)

    def read(self, rows: slice | torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[rows, Hkv, length, D]`` in ``dtype``, gathered through the table."""
        blocks = self.block_table[rows, :blocks_for(length)]  # [B, nb]
        return (gather_blocks(self.k_cache, blocks, length, dtype, self.k_scale if self.quant else None),
                gather_blocks(self.v_cache, blocks, length, dtype, self.v_scale if self.quant else None))

    def zero_blocks(self, blocks: list[int]) -> None:
        """Clear ``blocks`` (a failed sequence's non-finite values must not reach the next owner: 0 × NaN)."""
        index = torch.tensor(blocks, dtype=torch.long).to(self.k_cache.device, non_blocking=True)
        for pool in (self.k_cache, self.v_cache):  # as bytes: every cache dtype's zero is all-zero bytes
            pool.view(torch.uint8).index_fill_(0, index, 0)


def choose_decode_attention(name: str | None, device: torch.device, compiled: bool, max_seq_len: int,
                            native_cpu: bool = False) -> str:
    """The decode attention to run: ``name``, checked, or the default for ``device``:
    - ``split_kv`` (the cache's ``attend``) on CUDA and, where ``native_cpu`` (``PagedKVCache.native``: our
      kernel serves the cache), on the CPU: each row's own positions;
    - without our kernel, on the CPU: compiled, ``split_kv`` (the longest row's blocks per bucket) past
      ``CPU_REDUCE_MAX_POSITIONS`` reserved positions a row and ``reduce`` (fused into the step, every
      reserved position) up to it; eager, ``sdpa`` (over the longest row's positions, gathered)."""
    if name is None and native_cpu:  # 25 µs a layer at one row of 170 positions against 90 for "reduce"
        name = "split_kv"
    elif name is None and compiled and device.type == "cpu":
        name = "reduce" if max_seq_len <= CPU_REDUCE_MAX_POSITIONS else "split_kv"
    elif name is None:
        name = "split_kv" if compiled or device.type == "cuda" else "sdpa"
    if name not in DECODE_ATTENTION:
        raise ConfigError(f"unknown decode attention '{name}'; available: {', '.join(DECODE_ATTENTION)}")
    if name == "split_kv" and device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("split_kv decode attention on CUDA needs the triton package; use 'sdpa' or 'reduce'")
        import quantdeploy.kernels.triton_attention  # noqa: F401 - registers quantdeploy::decode_attention
    elif name == "split_kv" and device.type not in ("cpu", "meta"):
        raise ConfigError(f"split_kv decode attention runs on CUDA and the CPU, not on {device}; use 'sdpa'")
    return name
