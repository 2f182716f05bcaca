"""Split-K without a second kernel: the last program to finish a tile adds the partial sums.

A narrow layer at a few rows has too few output tiles to fill the card, so the row and tile kernels split
K and each split writes a partial sum. Adding those up afterwards with PyTorch (a sum, then a cast to the
output's dtype) costs two more kernels per layer: on an H200, in the compiled batch-1 decode step of the
Llama-3.1-8B shape in int4, 192 extra kernels per step took 0.39 ms of kernel time plus their gaps, of a
3.23 ms step (``benchmarks/profile_decode.py --quant w4g128``).

Here each split stores its fp32 partial, then takes a ticket from the tile's counter (an atomic add with
acquire-release order at GPU scope, after a barrier so the whole program's stores come before it). The
program that draws the last ticket reads every partial, in split order (so the result does not depend on
which program finished last), writes the output in its dtype and puts the counter back to zero, so the
counters are all zero between launches and a CUDA graph replays the kernel as captured.

The counters belong to the caller (one small buffer per prepared layer, zeroed once): the kernels only
split when the grid has fewer tiles than ``MAX_TILES_PER_SM`` per SM, so a buffer of that many counters
per SM always has one for every tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: the row kernel splits below four programs per SM, the tile kernel below two or four: never more tiles than this
MAX_TILES_PER_SM = 4


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (8 elsewhere: Triton's interpreter on the CPU), which the
    kernels size their grids by."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def counters(device: torch.device, sms: int) -> torch.Tensor:
    """A zeroed counter per possible tile of a split launch on ``device`` (the kernels leave them zeroed)."""
    return torch.zeros(MAX_TILES_PER_SM * sms, dtype=torch.int32, device=device)


def buffers(split: int, m: int, n: int, x: torch.Tensor, locks: torch.Tensor | None, tiles: int,
            dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, partials, locks)`` for a launch of ``tiles`` output tiles split ``split`` ways: the output in
    ``dtype``, by default x's (fp32 for an E4M3 x); fp32 partials (the output itself, unused, when nothing
    is split); counters for every tile (``locks`` when given and large enough, else a fresh zeroed buffer)."""
    if dtype is None:
        dtype = torch.float32 if x.dtype == torch.float8_e4m3fn else x.dtype
    out = torch.empty((m, n), dtype=dtype, device=x.device)
    if split == 1:
        return out, out, out
    if locks is None or locks.numel() < tiles:
        locks = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    return out, torch.empty((split, m, n), dtype=torch.float32, device=x.device), locks


@triton.jit
def store_or_reduce(total, out_ptr, part_ptr, lock_ptr, tile, split, offs, mask, stride_part,
                    SPLIT: tl.constexpr):
    """Store a tile's fp32 ``total`` at ``offs`` of the output, or, split (``SPLIT``: ``split`` programs
    per tile), as partial ``program_id(1)``; the last of them adds the partials into the output."""
    if SPLIT:
        tl.store(part_ptr + tl.program_id(1) * stride_part + offs, total, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == split - 1:
            acc = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in range(1, split):
                acc += tl.load(part_ptr + s * stride_part + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
