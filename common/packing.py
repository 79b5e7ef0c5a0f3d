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


def pack_uint(values: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned integers at ``width`` bits each (1..64), most significant bit first, element
    after element; ``ceil(len * width / 8)`` bytes, the padding bits 0. Every value must be
    below ``2**width``."""
    if not 1 <= width <= 64:
        raise ValueError(f"width must lie in 1..64, got {width}")
    values = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    if width < 64 and values.size and int(values.max()) >> width:
        raise ValueError(f"a value does not fit {width} bits")
    bits = np.unpackbits(values.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder=BIT_ORDER)
    return np.packbits(bits[:, 64 - width:].reshape(-1), bitorder=BIT_ORDER)


def unpack_uint(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_uint`: ``count`` uint64 values. The packed bytes must be exactly
    ``ceil(count * width / 8)`` long."""
    if not 1 <= width <= 64:
        raise ValueError(f"width must lie in 1..64, got {width}")
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != packed_length(count * width):
        raise ValueError(f"{count} values of {width} bits take {packed_length(count * width)} bytes, "
                         f"not {packed.size}")
    bits = np.unpackbits(packed, count=count * width, bitorder=BIT_ORDER).reshape(count, width)
    full = np.zeros((count, 64), dtype=np.uint8)
    full[:, 64 - width:] = bits
    return np.packbits(full, axis=1, bitorder=BIT_ORDER).view(">u8").reshape(-1).astype(np.uint64)
