"""How a word of codes becomes values inside the row kernel (``triton_gemv.py``): one helper per code kind.

The row kernel reads the codes as int32 words and hands each word, with the x values its codes multiply,
to one of these: int4/int8 ``q - z`` by setting exponent bits (``decode_dot``, fp32, exact); int4 in bf16
pairs (``dot8_pairs``, inline PTX, two codes an instruction); NF4 through its 16 levels, in bf16 pairs
with the table in registers (``nf4_pairs``) or through a table in memory (``lut_dot``, fp32, exact);
E4M3 bytes converted one by one (``fp8_dot``, exact). Why each is shaped so, with the measurements: the
row kernel's docstring and ``benchmarks/results/gemv4-bf16-pairs-h200.txt``, ``nf4-fp8-kernels-h200.txt``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def decode_dot(words, x, z, BITS: tl.constexpr):
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


def _packed_dot_tail(pairs: tuple[str, str, str, str], acc: str) -> str:
    """The PTX both bf16-pair decoders end with: four packed FMAs of the code pairs by x's pairs ($2..$5),
    from -0 (register ``nz``), then the two halves of ``acc`` added in fp32 into $0."""
    fmas = [f"fma.rn.bf16x2 {acc}, {pairs[0]}, $2, nz;"] + [f"fma.rn.bf16x2 {acc}, {p}, ${i + 3}, {acc};"
                                                           for i, p in enumerate(pairs[1:])]
    return "\n".join(fmas + [f"shl.b32 t1, {acc}, 16;", f"and.b32 t2, {acc}, 0xFFFF0000;", "add.f32 $0, t1, t2;", "}"])


def _nf4_asm() -> str:
    """``_DOT8_NF4``'s PTX with NF4's 16 levels as bf16 in byte tables: ``lo``/``hi`` bytes of levels 0-7
    and 8-15, four to a register, as immediates (the levels are a fixed table)."""
    from quantdeploy.quant.nf4 import nf4_levels

    bits = nf4_levels().to(torch.bfloat16).view(torch.int16).int() & 0xFFFF
    lo, hi = [int(b) & 0xFF for b in bits], [int(b) >> 8 for b in bits]
    word = lambda b, i: sum(b[i + j] << (8 * j) for j in range(4))  # noqa: E731
    tables = {"l0": word(lo, 0), "l1": word(lo, 4), "l2": word(lo, 8), "l3": word(lo, 12),
              "h0": word(hi, 0), "h1": word(hi, 4), "h2": word(hi, 8), "h3": word(hi, 12)}
    movs = "".join(f"mov.b32 {name}, 0x{value:08X};\n" for name, value in tables.items())
    half = """and.b32 q, s, 0x7777;
shl.b32 t, s, 4;
prmt.b32 m, t, s, 0xD9C8;
prmt.b32 a, l0, l1, q;
prmt.b32 b, l2, l3, q;
lop3.b32 lo, a, b, m, 0xD8;
prmt.b32 a, h0, h1, q;
prmt.b32 b, h2, h3, q;
lop3.b32 hi, a, b, m, 0xD8;
prmt.b32 pA, lo, hi, 0x5140;
prmt.b32 pB, lo, hi, 0x7362;
"""
    return ("{\n.reg .b32 l0, l1, l2, l3, h0, h1, h2, h3, s, q, t, m, a, b, lo, hi, p0, p1, p2, p3, acc, nz, t1, t2;\n"
            + movs + "mov.b32 nz, 0x80008000;\nmov.b32 s, $1;\n" + half.replace("pA", "p0").replace("pB", "p1")
            + "shr.u32 s, $1, 16;\n" + half.replace("pA", "p2").replace("pB", "p3")
            + _packed_dot_tail(("p0", "p1", "p2", "p3"), "acc"))


#: ``sum_j level[q_j] * x_j`` over the eight NF4 codes of a word in bf16x2 arithmetic, added up in fp32.
#: Operands: $1 the word, $2..$5 x as bf16 pairs (x_2i low half, x_2i+1 high). A table lookup in registers:
#: for four codes at once (a word's half: four nibbles, the selector format of ``prmt``), ``prmt`` picks each
#: level's low byte from the table of levels 0-7 and from that of 8-15 (index ``q & 7``), a third ``prmt``
#: in its sign-replicate mode turns each code's top bit into a byte mask, ``lop3`` keeps the right table's
#: byte; the same for the high bytes, and two ``prmt`` interleave them into bf16 pairs (codes 2i, 2i + 1).
#: 2.75 instructions a code to its bf16 level, then the packed FMAs of ``_DOT8_BF16``.
_DOT8_NF4 = tl.constexpr(_nf4_asm())


@triton.jit
def nf4_pairs(words, x):
    """``lut_dot`` with NF4's levels for bf16 x (last axis the word's eight x values), in bf16x2."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _eight(x)
    return tl.inline_asm_elementwise(_DOT8_NF4, "=f,r,r,r,r,r",
                                     [words, _pair(x0, x1), _pair(x2, x3), _pair(x4, x5), _pair(x6, x7)],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _fp8(words, shift: tl.constexpr):
    """The E4M3 code at byte ``shift // 8`` of each word, in fp32 (exact: E4M3 values are fp32 values)."""
    return ((words >> shift) & 255).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def fp8_dot(words, x):
    """``sum_j w_j * x[..., j]`` over the four E4M3 codes of each word (x fp32)."""
    x0, x1, x2, x3 = _four(x)
    return _fp8(words, 0) * x0 + _fp8(words, 8) * x1 + _fp8(words, 16) * x2 + _fp8(words, 24) * x3


@triton.jit
def _level(lut_ptr, words, shift: tl.constexpr):
    """The table entry (fp32) of the 4-bit code at ``shift``: a load the L1 cache serves (16 entries)."""
    return tl.load(lut_ptr + ((words >> shift) & 15))


@triton.jit
def lut_dot(words, x, lut_ptr):
    """``sum_j lut[q_j] * x[..., j]`` over the eight 4-bit codes of each word (NF4: the codes index a table)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _eight(x)
    part = _level(lut_ptr, words, 0) * x0
    part += _level(lut_ptr, words, 4) * x1
    part += _level(lut_ptr, words, 8) * x2
    part += _level(lut_ptr, words, 12) * x3
    part += _level(lut_ptr, words, 16) * x4
    part += _level(lut_ptr, words, 20) * x5
    part += _level(lut_ptr, words, 24) * x6
    part += _level(lut_ptr, words, 28) * x7
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
""" + _packed_dot_tail(("c0", "c1", "c2", "c3"), "a"))


@triton.jit
def _pair(lo, hi):
    """Two bf16 tensors as one int32 tensor of bf16 pairs (``lo`` in the low half)."""
    return lo.to(tl.uint16, bitcast=True).to(tl.uint32) | (hi.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)


@triton.jit
def dot8_pairs(words, x, zp):
    """``decode_dot`` for int4 codes and bf16 x (last axis the word's eight x values), in bf16x2."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _eight(x)
    return tl.inline_asm_elementwise(_DOT8_BF16, "=f,r,r,r,r,r,r",
                                     [words, _pair(x0, x4), _pair(x1, x5), _pair(x2, x6), _pair(x3, x7), zp],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def zero_pair(z):
    """``-(128 + z)`` as a bf16 pair, int32 (``z`` the zero point, float)."""
    h = (-(128.0 + z)).to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return (h | (h << 16)).to(tl.int32, bitcast=True)
