import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantdeploy.quant.packing import pack_bits, packed_length, unpack_bits


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 4), blocks=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip(bits, rows, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    n = 8 * blocks
    codes = torch.randint(0, 2**bits, (rows, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_length(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_int4_layout_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    packed = pack_bits(codes, 4)
    assert packed.tolist() == [[0x21, 0x43, 0x65, 0xF7]]


def test_int2_and_int3_layouts():
    assert pack_bits(torch.tensor([[1, 2, 3, 0, 0, 0, 0, 1]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0b01000000]]
    # int3: eight codes fill three bytes, code k at bits 3k..3k+2
    codes = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 7]], dtype=torch.uint8)
    word = 7 | (7 << 21)
    assert pack_bits(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]]


def test_rows_must_hold_a_multiple_of_eight_codes():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.zeros(1, 12, dtype=torch.uint8), 4)
