"""The NF4 register table (``triton_codes._DOT8_NF4``) checked on the CPU: its PTX, run instruction by
instruction by a small emulator of the integer instructions it uses (``mov``, ``and``, ``shl``, ``shr``,
``prmt`` with its sign-replicate mode, ``lop3``), must turn every word of eight codes into the bf16 pairs of
their NF4 levels. The interpreter runs no inline PTX and CI has no GPU: without this, a wrong selector or
truth table would first show on the card."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte i of the result is byte ``c[4i:4i+3] & 7`` of ``{b, a}``, or that
    byte's sign bit replicated when bit 3 of the selector is set."""
    source = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> 4 * i) & 0xF
        byte = source[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    return sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i
               for i in range(32))


def _run_table(asm: str, word: int) -> list[int]:
    """The four bf16 pairs (``p0``..``p3``) the PTX builds from ``word``, up to its first FMA."""
    regs = {"$1": word}

    def value(token: str) -> int:
        token = token.strip()
        return regs[token] if token in regs else int(token, 0)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, rest = line.split(None, 1)
        d, *args = [t.strip() for t in rest.split(",")]
        if op.startswith("fma"):
            break
        regs[d] = {"mov.b32": lambda: value(args[0]),
                   "and.b32": lambda: value(args[0]) & value(args[1]),
                   "shl.b32": lambda: (value(args[0]) << value(args[1])) & MASK,
                   "shr.u32": lambda: value(args[0]) >> value(args[1]),
                   "prmt.b32": lambda: _prmt(value(args[0]), value(args[1]), value(args[2])),
                   "lop3.b32": lambda: _lop3(value(args[0]), value(args[1]), value(args[2]), value(args[3]))}[op]()
    return [regs[f"p{i}"] for i in range(4)]


def _levels_bf16_bits() -> list[int]:
    from quantdeploy.quant.nf4 import nf4_levels

    return [int(b) & 0xFFFF for b in nf4_levels().to(torch.bfloat16).view(torch.int16).tolist()]


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=MASK))
def test_the_nf4_register_table_gives_each_code_its_bf16_level(word):
    from quantdeploy.kernels.triton_codes import _DOT8_NF4

    asm = getattr(_DOT8_NF4, "value", _DOT8_NF4)
    levels = _levels_bf16_bits()
    pairs = _run_table(asm, word)
    for j in range(8):  # pair j // 2 holds codes 2i (low half) and 2i + 1 (high half)
        assert (pairs[j // 2] >> 16 * (j % 2)) & 0xFFFF == levels[(word >> 4 * j) & 0xF], (hex(word), j)


def test_every_code_in_every_position():
    from quantdeploy.kernels.triton_codes import _DOT8_NF4

    asm = getattr(_DOT8_NF4, "value", _DOT8_NF4)
    levels = _levels_bf16_bits()
    for code in range(16):
        for j in range(8):
            word = (code << 4 * j) | (((code + 7) % 16) << 4 * ((j + 1) % 8))
            pairs = _run_table(asm, word)
            assert (pairs[j // 2] >> 16 * (j % 2)) & 0xFFFF == levels[code], (code, j)
