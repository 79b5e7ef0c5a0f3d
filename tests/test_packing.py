import numpy as np
import pytest

from common.packing import pack_bits, pack_signs, packed_length, unpack_bits, unpack_signs


def test_bit_order_is_most_significant_first():
    values = np.array([1, -1, -1, -1, -1, -1, -1, -1, -1, 1], dtype=np.float32)
    packed = pack_signs(values)
    assert packed.dtype == np.uint8
    assert packed.tolist() == [0b1000_0000, 0b0100_0000]


@pytest.mark.parametrize("n_bits", [1, 7, 8, 9, 200, 257])
def test_sign_round_trip(n_bits):
    rng = np.random.default_rng(n_bits)
    values = rng.choice([-1.0, 1.0], size=(5, n_bits)).astype(np.float32)
    packed = pack_signs(values)
    assert packed.shape == (5, packed_length(n_bits))
    np.testing.assert_array_equal(unpack_signs(packed, n_bits), values)


def test_zero_packs_as_plus_one_and_padding_is_zero():
    packed = pack_signs(np.array([0.0, -0.0, -1.0]))
    assert packed.tolist() == [0b1100_0000]
    assert unpack_bits(pack_bits(np.array([1, 0, 1])), 3).tolist() == [1, 0, 1]


def test_200_bit_code_takes_25_bytes():
    assert pack_bits(np.ones((3, 200))).shape == (3, 25)
