"""Sign-flip uplink: send only the binary weights whose sign changed this round.

A client starts every round from the global model it received. Once training
settles, few of its signs differ from that starting point, so the positions of the
flipped signs carry the update in far fewer bits than the 1-bit sign codec of
:mod:`common.federated.codec`. The reference is the sign of what the client received
(``sign(0) = +1``): the vote itself in ``vote`` mode, the sign of the quantized mean in
``mean`` mode. The server knows that reference because it sent it: the current
round's global model.

Flip blocks (``flip-blocks``, default 1: none): from round 2 on, the clients train only one
contiguous block of the binary weights per round, block ``round mod flip-blocks``
(:func:`flip_block`), so every flip they send lies in it. A client's flips are mostly weights
with a weak gradient that wander across zero, nearly independent from one client to the
next; the vote keeps a weight's flip only where most clients made it. Cutting each
client's flips to its strongest few (a flip budget) left the clients' flips too few to
agree on, and the global model barely moved; with blocks all clients train the same
weights in a round, so the vote works as it does without blocks, on a quarter of the
weights at a time (docs/federated.md, "Sign-flip uplink"). ``flip-block-rounds`` ends the
blocks after a given round; ``flip-margin`` makes a client put back the flips whose latent
weight ended barely past zero (:func:`undo_weak_flips`). Both only change what the client
trains and sends; the payload is the same.

Numpy in, numpy out, no Flower import, like :mod:`common.federated.codec`; the block
helpers take the torch model.

Payload
-------
One array ``"flips"``, ``uint8``, so a record carries one ``Array`` header as the
sign codec does (``"flipt"`` when the batch norm is a threshold block,
``bn-encoding = "thresholds"``). All integers little-endian.

====== ====== ============================================================
offset bytes  field
====== ====== ============================================================
0      1      flip format version (:data:`FLIP_FORMAT_VERSION`)
1      1      method: 0 Rice-coded gaps, 1 raw flip bitmap, 2 zlib of the bitmap
2      8      reference digest: first 8 bytes of sha256(uint32 B, packed reference signs)
10     4      ``B``, the number of binary weights
14     4      ``F``, the number of flipped signs
18     4      ``L``, the length of the body in bytes
22     ``L``  body (see the methods below)
22+L   ...    the batch norm as in the sign codec: ``K`` float16 or float32 numbers
              (``"flips"``), or a threshold block (``"flipt"``)
====== ====== ============================================================

Methods, the encoder picks whichever body is smallest for each message:

* ``0`` Rice: the flipped positions sorted, as gaps ``g_i = p_i - p_{i-1} - 1``
  (``p_{-1} = -1``). The body's first byte is the Rice parameter ``k``; then each gap
  as ``g >> k`` zero bits, a one bit, and the low ``k`` bits of ``g`` (most significant
  first), packed most significant bit first, padding bits zero. For flips scattered
  at random (geometric gaps) this is within a few percent of the entropy.
* ``1`` bitmap: ``XOR(reference, new)`` packed like the sign codec, ``ceil(B/8)`` bytes;
  the worst case, so a flip payload never exceeds the sign payload by more than the
  22-byte header.
* ``2`` zlib: that bitmap deflated (level 9); wins when the flips cluster.

The receiver checks the version, the method, the digest (a client and a server that
disagree on the reference get an error, never a silently wrong model), ``B``, ``F``,
``L``, every position in range and strictly increasing, that the body is consumed
exactly (no trailing bits or bytes), and then turns the payload into the equivalent
sign payload, which goes through the full codec's validation (batch-norm length,
finiteness, non-negative running variance).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
import zlib

import numpy as np
import torch

from common.federated import codec
from common.packing import pack_bits, packed_length, unpack_bits

UPLINK_CODECS = ("signs", "flips")
"""How a client's update carries its signs: all of them, or those changed against the global."""
FLIPS_KEY = "flips"
FLIPT_KEY = "flipt"
"""A flip payload whose batch norm is a threshold block (:mod:`common.federated.thresholds`)."""
FLIP_FORMAT_VERSION = 1
METHOD_RICE = 0
METHOD_BITMAP = 1
METHOD_ZLIB = 2
METHOD_NAMES = {METHOD_RICE: "rice", METHOD_BITMAP: "bitmap", METHOD_ZLIB: "zlib"}
DIGEST_BYTES = 8
_HEADER = struct.Struct("<BB8sIII")
HEADER_BYTES = _HEADER.size  # 22
MAX_RICE_K = 24


class FlipCodecError(codec.CodecError):
    """A flip payload that does not decode against the given reference; the message says why."""


# ------------------------------------------------------------------ reference
def reference_bits(reference: np.ndarray) -> np.ndarray:
    """The reference signs as booleans (``>= 0`` is ``+1``, the project's ``sign(0) = +1``)."""
    return np.asarray(reference).reshape(-1) >= 0


def reference_digest(reference: np.ndarray) -> bytes:
    """8 bytes that name a reference: sha256 of its length and packed signs.

    Eight bytes make an accidental match between two different references a 2^-64 event,
    and cost 0.0025 bits per weight of this BNN.
    """
    return _digest_bits(reference_bits(reference))


def _digest_bits(bits: np.ndarray) -> bytes:
    h = hashlib.sha256(struct.pack("<I", bits.size))
    h.update(pack_bits(bits).tobytes())
    return h.digest()[:DIGEST_BYTES]


# ------------------------------------------------------------------ Rice coding of gaps
def _gaps(positions: np.ndarray) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.int64)
    return np.diff(positions, prepend=-1) - 1


def rice_k(gaps: np.ndarray) -> int:
    """The Rice parameter that minimizes the coded length of ``gaps`` (0 if there are none)."""
    if gaps.size == 0:
        return 0
    sizes = [int(np.sum(gaps >> k)) + gaps.size * (k + 1) for k in range(MAX_RICE_K + 1)]
    return int(np.argmin(sizes))


def rice_encode(positions: np.ndarray) -> bytes:
    """Sorted distinct positions -> Rice-coded gaps (first byte ``k``); see the module docstring."""
    gaps = _gaps(positions)
    k = rice_k(gaps)
    if gaps.size == 0:
        return bytes([k])
    q = gaps >> k
    lengths = q + 1 + k
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    bits = np.zeros(total, dtype=bool)
    bits[starts + q] = True  # the unary terminator
    for j in range(k):
        bits[starts + q + 1 + j] = ((gaps >> (k - 1 - j)) & 1).astype(bool)
    return bytes([k]) + pack_bits(bits).tobytes()


def rice_decode(body: bytes, n_flips: int, n_binary: int) -> np.ndarray:
    """Inverse of :func:`rice_encode`, refusing anything that is not exactly ``n_flips`` positions
    in ``[0, n_binary)`` with zero padding and no trailing bytes."""
    if len(body) < 1:
        raise FlipCodecError("the Rice body is empty; it must start with the Rice parameter byte")
    k = body[0]
    if k > MAX_RICE_K:
        raise FlipCodecError(f"Rice parameter {k} is larger than {MAX_RICE_K}")
    bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8, offset=1), bitorder="big")
    ones = np.flatnonzero(bits)
    positions = np.empty(n_flips, dtype=np.int64)
    cursor = 0  # next bit to read
    previous = -1
    weights = 1 << np.arange(k - 1, -1, -1, dtype=np.int64) if k else None
    for i in range(n_flips):
        one_at = int(np.searchsorted(ones, cursor))  # the next one bit ends this gap's unary part
        if one_at >= ones.size:
            raise FlipCodecError(f"the Rice body ends after {i} of {n_flips} flips (truncated)")
        terminator = int(ones[one_at])
        q = terminator - cursor
        cursor = terminator + 1
        if cursor + k > bits.size:
            raise FlipCodecError(f"the Rice body ends inside flip {i} of {n_flips} (truncated)")
        r = int(bits[cursor : cursor + k].astype(np.int64) @ weights) if k else 0
        cursor += k
        position = previous + 1 + ((q << k) | r)
        if position >= n_binary:
            raise FlipCodecError(f"flip {i} is at position {position}, outside the {n_binary} binary weights")
        positions[i] = position
        previous = position
    used_bytes = packed_length(cursor)
    if used_bytes != len(body) - 1:
        raise FlipCodecError(
            f"the Rice body has {len(body) - 1 - used_bytes} byte(s) after its {n_flips} flips (trailing garbage)"
        )
    if np.any(bits[cursor:]):
        raise FlipCodecError("the padding bits after the last flip are not zero")
    return positions


# ------------------------------------------------------------------ encode
def flip_positions(reference: np.ndarray, latent: np.ndarray) -> np.ndarray:
    """Sorted indices where ``sign(latent)`` differs from ``sign(reference)``."""
    ref = reference_bits(reference)
    new = np.asarray(latent).reshape(-1) >= 0
    if ref.shape != new.shape:
        raise FlipCodecError(f"the reference has {ref.size} binary weights, the model {new.size}")
    return np.flatnonzero(ref != new)


def flip_block(server_round: int, blocks: int, n_binary: int, last_block_round: int = 0) -> tuple[int, int]:
    """The binary weights ``[start, stop)`` the clients train, and may flip, in ``server_round``.

    Round 1 starts from the random initial model: every weight. From round 2 on the ``n_binary``
    weights are cut into ``blocks`` contiguous blocks of (nearly) equal size, and round ``r``
    trains block ``r mod blocks``; ``blocks = 1``: every weight in every round. Blocks end after
    round ``last_block_round`` (``flip-block-rounds``; 0: they never end): every weight again
    from the round after. Every client computes the same block from the round number alone;
    nothing about it travels.
    """
    checks = (("server round", server_round, 0), ("flip-blocks", blocks, 1), ("binary weights", n_binary, 1),
              ("flip-block-rounds", last_block_round, 0))
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise FlipCodecError(f"the {name} must be a whole number >= {low}, got {value!r}")
    if blocks > n_binary:
        raise FlipCodecError(f"flip-blocks {blocks} is more than the {n_binary} binary weights")
    if server_round < 2 or blocks == 1 or (last_block_round and server_round > last_block_round):
        return 0, int(n_binary)
    index = server_round % blocks
    return int(index * n_binary // blocks), int((index + 1) * n_binary // blocks)


def block_mask(start: int, stop: int, n_binary: int) -> np.ndarray:
    """``True`` on the binary weights in ``[start, stop)``."""
    if not 0 <= start <= stop <= n_binary:
        raise FlipCodecError(f"the block [{start}, {stop}) does not lie within the {n_binary} binary weights")
    mask = np.zeros(n_binary, dtype=bool)
    mask[start:stop] = True
    return mask


def freeze_outside(model, mask: np.ndarray) -> list:
    """Let training move only the binary latent weights where ``mask`` (layout order) is ``True``:
    a gradient hook on each binary layer zeroes the others' gradients (Adam then leaves them as
    they are). Returns the hooks' handles; call ``.remove()`` on each when training is done."""
    layers = model.binary_layers()
    sizes = [layer.weight.numel() for layer in layers]
    if mask.shape != (sum(sizes),):
        raise FlipCodecError(f"the block mask has {mask.size} entries, the model {sum(sizes)} binary weights")
    handles, offset = [], 0
    for layer, size in zip(layers, sizes):
        keep = torch.from_numpy(mask[offset : offset + size].reshape(layer.weight.shape).astype(np.float32))
        handles.append(layer.weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype)))
        offset += size
    return handles


@contextmanager
def training_only_block(model, server_round: int, blocks: int, last_block_round: int = 0) -> Iterator[None]:
    """Within the ``with``, training moves only ``server_round``'s block of ``model``'s binary
    weights (:func:`flip_block`); on leaving, the hooks go and the weights outside the block
    are put back to where they started (:func:`restore_outside`). Every weight when the
    block is all of them (round 1, ``blocks = 1``, after ``last_block_round``)."""
    n_binary = codec.layout_for(model.config).n_binary
    start, stop = flip_block(server_round, blocks, n_binary, last_block_round)
    if stop - start == n_binary:
        yield
        return
    mask, start_latent = block_mask(start, stop, n_binary), codec.binary_latents(model)
    hooks = freeze_outside(model, mask)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
    restore_outside(model, start_latent, mask)


def restore_outside(model, start_latent: np.ndarray, mask: np.ndarray) -> int:
    """Put the binary latent weights outside ``mask`` back to ``start_latent`` (what training
    started from), whatever the optimizer did to them; returns how many signs that changed back.
    The flips a client sends then lie in its round's block, whatever the training loop."""
    layout = codec.layout_for(model.config)
    latent = codec.binary_latents(model)
    start_latent = np.asarray(start_latent, dtype=np.float32).reshape(-1)
    if start_latent.shape != latent.shape or mask.shape != latent.shape:
        raise FlipCodecError(f"expected {latent.size} starting latents and mask entries, got "
                             f"{start_latent.size} and {mask.size}")
    restored = np.where(mask, latent, start_latent)
    changed = int(np.count_nonzero((restored >= 0) != (latent >= 0)))
    if not np.array_equal(restored, latent):
        codec.load_into_model(model, layout, restored, codec.bn_vector(model, layout))
    return changed


def undo_weak_flips(model, reference: np.ndarray, start_latent: np.ndarray, margin: float) -> int:
    """Put back every binary weight whose sign training flipped against ``reference`` but whose
    latent ended less than ``margin`` past zero (to ``start_latent``, where training started):
    a flip that small is mostly noise of a weak gradient. Returns how many flips that undid."""
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise FlipCodecError(f"the flip margin must be a finite number >= 0, got {margin!r}")
    layout = codec.layout_for(model.config)
    latent = codec.binary_latents(model)
    ref = reference_bits(reference)
    start_latent = np.asarray(start_latent, dtype=np.float32).reshape(-1)
    if ref.shape != latent.shape or start_latent.shape != latent.shape:
        raise FlipCodecError(f"expected {latent.size} reference signs and starting latents, got {ref.size} and "
                             f"{start_latent.size}")
    weak = ((latent >= 0) != ref) & (np.abs(latent) < np.float32(margin))
    if weak.any():
        codec.load_into_model(model, layout, np.where(weak, start_latent, latent), codec.bn_vector(model, layout))
    return int(np.count_nonzero(weak))


def encode_body(positions: np.ndarray, n_binary: int) -> tuple[int, bytes]:
    """The smallest of the three bodies for these flip positions: ``(method, body)``."""
    mask = np.zeros(n_binary, dtype=bool)
    mask[positions] = True
    bitmap = pack_bits(mask).tobytes()
    candidates = [
        (METHOD_RICE, rice_encode(positions)),
        (METHOD_BITMAP, bitmap),
        (METHOD_ZLIB, zlib.compress(bitmap, 9)),
    ]
    return min(candidates, key=lambda c: (len(c[1]), c[0]))


def encode_flips(
    reference: np.ndarray, latent: np.ndarray, bn: np.ndarray, bn_dtype: str = "float16",
    bn_encoding: str = "floats", reference_bn: np.ndarray | None = None, layout: codec.Layout | None = None,
) -> dict[str, np.ndarray]:
    """A ``flips`` payload: where ``sign(latent)`` differs from ``sign(reference)``, then ``bn``.

    ``reference`` is what the client started from (any real array; only its signs count),
    ``latent`` its trained latent weights, ``bn`` its batch-norm numbers in layout order,
    written as the sign codec writes them (``bn_encoding``, ``reference_bn``: see
    :func:`common.federated.codec.encode_signs`).
    """
    positions = flip_positions(reference, latent)
    n_binary = int(np.asarray(latent).size)
    method, body = encode_body(positions, n_binary)
    header = _HEADER.pack(FLIP_FORMAT_VERSION, method, reference_digest(reference), n_binary,
                          int(positions.size), len(body))
    if codec.check_bn_encoding(bn_encoding) == "floats":
        bn_bytes, key = codec.bn_wire_bytes(bn, bn_dtype).tobytes(), FLIPS_KEY
    else:
        bn_bytes, key = codec.threshold_block(bn, layout, bn_dtype, reference_bn).tobytes(), FLIPT_KEY
    blob = np.frombuffer(header + body + bn_bytes, dtype=np.uint8).copy()
    return {key: blob}


def encode_model_flips(model, reference: np.ndarray, bn_dtype: str = "float16", bn_encoding: str = "floats",
                       reference_bn: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The flip uplink of a trained :class:`common.bnn.model.BNN` against ``reference``."""
    layout = codec.layout_for(model.config)
    return encode_flips(reference, codec.binary_latents(model), codec.bn_vector(model, layout), bn_dtype,
                        bn_encoding, reference_bn, layout)


# ------------------------------------------------------------------ decode and validate
def is_flips(payload: dict[str, np.ndarray]) -> bool:
    """Whether ``payload`` is a flip payload (by its keys), as opposed to a full codec payload."""
    return set(payload) in ({FLIPS_KEY}, {FLIPT_KEY})


def parse(payload: dict[str, np.ndarray], layout: codec.Layout, reference: np.ndarray) -> tuple[np.ndarray, bytes, dict]:
    """Check a flip payload against ``reference``; return ``(positions, bn bytes, info)``.

    ``info`` holds ``method``, ``flips``, ``body_bytes`` and ``sign_bytes`` (header plus body:
    what the binary weights cost on the wire, batch norm excluded).
    """
    if not is_flips(payload):
        raise FlipCodecError(f"payload keys are {sorted(payload)}; a flip payload holds only [{FLIPS_KEY!r}] "
                             f"or [{FLIPT_KEY!r}]")
    key = next(iter(payload))
    blob = payload[key]
    if not isinstance(blob, np.ndarray) or blob.dtype != np.uint8 or blob.ndim != 1:
        raise FlipCodecError(f"'{key}' must be a 1-D uint8 array, got {codec._describe(blob)}")
    data = blob.tobytes()
    if len(data) < HEADER_BYTES:
        raise FlipCodecError(f"'{key}' has {len(data)} bytes, less than its {HEADER_BYTES}-byte header (truncated)")
    version, method, digest, n_binary, n_flips, body_len = _HEADER.unpack_from(data)
    if version != FLIP_FORMAT_VERSION:
        raise FlipCodecError(
            f"flip format version {version} is not supported (this side speaks version {FLIP_FORMAT_VERSION}); "
            "run the same HyBNN release on the server and every client"
        )
    if method not in METHOD_NAMES:
        raise FlipCodecError(f"unknown flip coding method {method}; known: {METHOD_NAMES}")
    if n_binary != layout.n_binary:
        raise FlipCodecError(f"the flip payload is for {n_binary} binary weights, this BNN has {layout.n_binary}")
    ref = reference_bits(reference)
    if ref.size != layout.n_binary:
        raise FlipCodecError(f"the reference has {ref.size} binary weights, this BNN has {layout.n_binary}")
    expected_digest = _digest_bits(ref)
    if digest != expected_digest:
        raise FlipCodecError(
            "the flips were taken against a different reference model than this side holds "
            f"(digest {digest.hex()}, expected {expected_digest.hex()}); "
            "the client must encode against the global model of the round it answers"
        )
    if n_flips > n_binary:
        raise FlipCodecError(f"{n_flips} flips claimed, but there are only {n_binary} binary weights")
    bn_len = len(data) - HEADER_BYTES - body_len
    # a threshold block has a length of its own; the sign codec checks it
    allowed = {layout.n_bn * 2: "float16", layout.n_bn * 4: "float32"} if key == FLIPS_KEY else None
    if body_len > len(data) - HEADER_BYTES or (allowed is not None and bn_len not in allowed) or bn_len <= 0:
        takes = " or ".join(str(n) for n in allowed) if allowed is not None else "a threshold block"
        raise FlipCodecError(
            f"'{key}' has {len(data)} bytes: a {HEADER_BYTES}-byte header, a {body_len}-byte body and "
            f"{bn_len} bytes left for batch norm, which takes {takes} (truncated, or trailing garbage)"
        )
    body = data[HEADER_BYTES : HEADER_BYTES + body_len]
    if method == METHOD_RICE:
        positions = rice_decode(body, n_flips, n_binary)
    else:
        if method == METHOD_ZLIB:
            body = _inflate(body, packed_length(n_binary))
        mask = _bitmap(body, n_binary)
        positions = np.flatnonzero(mask)
        if positions.size != n_flips:
            raise FlipCodecError(f"the flip bitmap holds {positions.size} flips, the header says {n_flips}")
    info = {"method": METHOD_NAMES[method], "flips": int(n_flips), "body_bytes": int(body_len),
            "sign_bytes": HEADER_BYTES + int(body_len)}
    return positions, data[HEADER_BYTES + body_len :], info


def _inflate(body: bytes, expected: int) -> bytes:
    """zlib-decompress at most ``expected + 1`` bytes, so a hostile body cannot balloon."""
    try:
        inflater = zlib.decompressobj()
        out = inflater.decompress(body, expected + 1)
    except zlib.error as exc:
        raise FlipCodecError(f"the zlib flip bitmap does not decompress ({exc})") from exc
    if len(out) != expected or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise FlipCodecError(
            f"the zlib flip bitmap must inflate to exactly {expected} bytes and end there "
            f"(got {len(out)} bytes, stream {'complete' if inflater.eof else 'truncated'}, "
            f"{len(inflater.unused_data) + len(inflater.unconsumed_tail)} trailing bytes)"
        )
    return out


def _bitmap(body: bytes, n_binary: int) -> np.ndarray:
    if len(body) != packed_length(n_binary):
        raise FlipCodecError(f"the flip bitmap has {len(body)} bytes, {packed_length(n_binary)} expected")
    packed = np.frombuffer(body, dtype=np.uint8)
    pad = packed_length(n_binary) * 8 - n_binary
    if pad and int(packed[-1]) & ((1 << pad) - 1):
        raise FlipCodecError(f"the {pad} padding bits of the flip bitmap are not zero")
    return unpack_bits(packed, n_binary).astype(bool)


def to_signs_payload(
    payload: dict[str, np.ndarray], layout: codec.Layout, reference: np.ndarray
) -> tuple[dict[str, np.ndarray], dict]:
    """The full sign payload a flip payload stands for, and ``info`` (see :func:`parse`).

    Returning a sign payload lets the receiver run it through :func:`common.federated.codec.decode`,
    so batch norm gets the very same checks as in the full codec.
    """
    positions, bn_bytes, info = parse(payload, layout, reference)
    bits = reference_bits(reference).copy()
    bits[positions] = ~bits[positions]
    blob = np.concatenate([pack_bits(bits), np.frombuffer(bn_bytes, dtype=np.uint8)])
    return {codec.BNT_KEY if FLIPT_KEY in payload else codec.BNN_KEY: blob}, info


def decode_flips(
    payload: dict[str, np.ndarray], layout: codec.Layout, reference: np.ndarray,
    reference_bn: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate against ``reference`` (and a threshold update against ``reference_bn``); return
    ``(weights (B,) of +-1, bn (K,))`` as float32."""
    signs, _ = to_signs_payload(payload, layout, reference)
    return codec.decode(signs, layout, kind="signs", reference_bn=reference_bn)


def sign_bits_per_weight(payload: dict[str, np.ndarray], layout: codec.Layout) -> float:
    """Bits the binary weights cost in ``payload`` (flip header + body, or the packed signs),
    per binary weight; batch norm and record headers excluded."""
    if is_flips(payload):
        data = next(iter(payload.values()))
        if data.size < HEADER_BYTES:
            raise FlipCodecError("truncated flip payload")
        body_len = _HEADER.unpack_from(data.tobytes())[5]
        return 8.0 * (HEADER_BYTES + body_len) / layout.n_binary
    return 8.0 * layout.n_bits_bytes / layout.n_binary


__all__ = [
    "FLIPS_KEY", "FLIPT_KEY", "FLIP_FORMAT_VERSION", "FlipCodecError", "HEADER_BYTES", "block_mask", "decode_flips",
    "encode_flips", "encode_model_flips", "flip_block", "flip_positions", "freeze_outside", "is_flips", "parse",
    "reference_digest", "restore_outside", "rice_decode", "rice_encode", "sign_bits_per_weight", "to_signs_payload",
    "training_only_block", "undo_weak_flips",
]
