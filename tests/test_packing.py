import pytest
import torch

from meswitch.compression.packing import SUPPORTED_BITS, pack_codes, packed_row_bytes, unpack_codes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 64), (17, 133), (2, 1000)])
def test_round_trip_every_width(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], packed_row_bytes(shape[1], bits))
    assert torch.equal(unpack_codes(packed, bits, shape[1]), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packing_really_saves_space(bits):
    codes = torch.zeros(4, 800, dtype=torch.uint8)
    assert pack_codes(codes, bits).numel() == 4 * 800 * bits // 8


def test_two_bit_layout_is_four_codes_per_byte_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    packed = pack_codes(codes, 2)
    assert packed.tolist() == [[1 | (2 << 2) | (3 << 4), 3]]


def test_three_bit_layout_is_a_little_endian_stream():
    # code j sits in bits [3j, 3j+3): 7 -> bits 0-2, 0 -> bits 3-5, 5 (0b101) -> bits 6 and 8.
    codes = torch.tensor([[7, 0, 5]], dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert packed.tolist() == [[0b01000111, 0b1]]


def test_out_of_range_and_bad_widths_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="unsupported bit width"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 2, 4)
