"""Bit packing of unsigned integer codes: the canonical on-disk layout of ``qweight``.

Layout (little-endian bit stream along the last dimension): code ``k`` of a row occupies bits
``[bits*k, bits*k + bits)`` of the row's byte string, lowest bit first. For int4 this is two codes per
byte with the even index in the low nibble; for int2 four codes per byte, lowest pair first; for int3
eight codes fill three bytes; int8 codes are stored as they are. Rows must hold a multiple of 8 codes.

Kernels that want another layout repack after loading; the checkpoint never stores a kernel's layout.
"""

from __future__ import annotations

import torch


def packed_length(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits (``n`` must be a multiple of 8)."""
    if n % 8:
        raise ValueError(f"packing needs a multiple of 8 codes per row, got {n}")
    return n * bits // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., n]`` (values < 2**bits) into uint8 ``[..., n*bits/8]``."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    n = codes.shape[-1]
    length = packed_length(n, bits)
    # Eight codes of `bits` bits make one word of `bits` bytes (at most 24 bits here).
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], n // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(dim=-1)  # [..., n/8]
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    packed = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [..., n/8, bits]
    return packed.reshape(*codes.shape[:-1], length).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., n*bits/8]`` to uint8 codes ``[..., n]``."""
    if bits == 8:
        return packed
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"packed row of {packed.shape[-1]} bytes does not hold {n} codes of {bits} bits")
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], n // 8, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (b << byte_shifts).sum(dim=-1, keepdim=True)  # [..., n/8, 1]
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)  # [..., n/8, 8]
    return codes.reshape(*packed.shape[:-1], n).to(torch.uint8)
