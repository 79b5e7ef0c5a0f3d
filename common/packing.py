"""Bit packing of +-1 (or boolean) arrays into bytes.

Convention, used everywhere (features on disk, the wire codec, the C export):
a ``+1`` (or ``True``) is bit 1, a ``-1`` is bit 0; bits are packed along the last
axis with ``np.packbits(..., bitorder="big")``, so element ``i`` of a row lands in
byte ``i // 8`` at bit ``7 - i % 8`` (the most significant bit first). A row of
``n`` elements takes ``ceil(n / 8)`` bytes; the padding bits of the last byte are 0.
"""

from __future__ import annotations

import numpy as np

BIT_ORDER = "big"


def packed_length(n_bits: int) -> int:
    """Bytes needed for ``n_bits`` bits."""
    return (n_bits + 7) // 8


def pack_signs(values: np.ndarray) -> np.ndarray:
    """Pack the signs of ``values`` along the last axis: ``>= 0`` is bit 1 (sign(0)=+1)."""
    bits = np.asarray(values) >= 0
    return np.packbits(bits, axis=-1, bitorder=BIT_ORDER)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean (or 0/1) array along the last axis."""
    return np.packbits(np.asarray(bits).astype(bool), axis=-1, bitorder=BIT_ORDER)


def unpack_bits(packed: np.ndarray, n_bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: a ``uint8`` array of 0/1 with last axis ``n_bits``."""
    packed = np.asarray(packed, dtype=np.uint8)
    return np.unpackbits(packed, axis=-1, count=n_bits, bitorder=BIT_ORDER)


def unpack_signs(packed: np.ndarray, n_bits: int, dtype: type = np.float32) -> np.ndarray:
    """Inverse of :func:`pack_signs`: +-1 values of ``dtype`` with last axis ``n_bits``."""
    bits = unpack_bits(packed, n_bits)
    return (bits.astype(dtype) * 2 - 1).astype(dtype)
