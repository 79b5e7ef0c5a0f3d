"""The wire codec of FedHyBNN: what a BNN looks like while it travels.

Shared by the ClientApp and the ServerApp; numpy in, numpy out, no Flower import.
A payload is a ``dict[str, np.ndarray]`` that the Flower layer puts into one
``ArrayRecord``, one ``Array`` per key. Every ``Array`` costs about 300 bytes once
serialized besides its data (its object with dtype, shape and stype, its chunk's header,
and twice its 64-character id in the record), 9% of a packed BNN, so the uplink is a
single array.

Payload kinds
-------------
``signs`` (every uplink, and the downlink in ``vote`` mode): one array, ``uint8``.
    First the signs of all binary layers' latent weights, each flattened row-major,
    concatenated input to output, packed with :func:`common.packing.pack_signs` (``+1`` ->
    bit 1, most significant bit first, padding bits 0), ``ceil(B/8)`` bytes. Then the batch
    norm, as the key says:

    ``"bnn"`` (``bn-encoding = "floats"``): the ``K`` batch-norm numbers (see below) as
    little-endian float16 (``s = 2``, the default) or float32 (``s = 4``); the length
    tells which.
    ``"bnt"`` (``bn-encoding = "thresholds"``): a threshold block
    (:mod:`common.federated.thresholds`): each hidden unit's integer threshold and flip,
    whole (the downlink) or as an update against the global thresholds the client
    received (the uplink), and the output batch norm's numbers.
``latent`` (the downlink in ``mean`` mode): ``"latent"``, ``int8 (B,)``, the weighted
    mean of the clients' +-1 weights, a value in ``[-1, 1]``, quantized as
    ``round(127 * mean)``; and ``"bn"``, the ``K`` batch-norm numbers as a float16 or
    float32 array, or ``"thresholds"``, a full threshold block (uint8).

The batch-norm numbers are, for every batch-norm layer, input to output, its
``weight``, ``bias``, ``running_mean`` and ``running_var`` concatenated.
The running statistics are averaged like the affine parameters; the batch counter
(``num_batches_tracked``) does not travel because the layers use a fixed momentum.
A threshold block decodes into such numbers too (its canonical form), so a receiver
always gets ``K`` batch-norm numbers.

1-D ``uint8`` and ``int8`` arrays travel as raw bytes (:mod:`common.federated.wire`), without
numpy's 128-byte header.

The codec version travels beside the arrays (the ``codec-version`` entry of the
message's config or metric record); a receiver refuses a version it does not know.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from common.bnn.model import BNN, BNNConfig
from common.errors import HyBNNError
from common.federated import thresholds
from common.packing import pack_signs, packed_length, unpack_signs

CODEC_VERSION = 2
"""2: threshold batch norm (``"bnt"``, ``"thresholds"``), raw byte arrays; 1 had float batch norm only."""
BNN_KEY = "bnn"
BNT_KEY = "bnt"
BN_KEY = "bn"
THRESHOLDS_KEY = "thresholds"
LATENT_KEY = "latent"
KINDS = ("signs", "latent")
BN_ENCODINGS = ("thresholds", "floats")
LATENT_LEVELS = 127
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
BN_DTYPES = {"float16": np.float16, "float32": np.float32}


class CodecError(HyBNNError):
    """A payload that does not decode into the expected BNN; the message says why."""


@dataclass(frozen=True)
class Layout:
    """Where each BNN tensor lives in a payload, derived from a :class:`BNNConfig`."""

    config: BNNConfig
    binary_names: tuple[str, ...]
    binary_shapes: tuple[tuple[int, int], ...]
    bn_names: tuple[str, ...]
    bn_sizes: tuple[int, ...]

    @property
    def n_binary(self) -> int:
        """Number of binary weights ``B``."""
        return sum(a * b for a, b in self.binary_shapes)

    @property
    def n_bits_bytes(self) -> int:
        return packed_length(self.n_binary)

    @property
    def n_bn(self) -> int:
        """Number of batch-norm numbers ``K``."""
        return sum(self.bn_sizes)

    @property
    def shape(self) -> thresholds.Shape:
        """The batch-norm layers as the threshold form sees them."""
        return thresholds.Shape.of(self.config)


def layout_for(config: BNNConfig) -> Layout:
    """The payload layout of a BNN built with ``config``."""
    model = BNN(config)
    binary_names = []
    binary_shapes = []
    bn_names = []
    bn_sizes = []
    for name, module in model.named_modules():
        if module in model.binary_layers():
            binary_names.append(f"{name}.weight")
            binary_shapes.append(tuple(module.weight.shape))
        elif isinstance(module, torch.nn.BatchNorm1d):
            for field in BN_FIELDS:
                bn_names.append(f"{name}.{field}")
                bn_sizes.append(module.num_features)
    return Layout(config, tuple(binary_names), tuple(binary_shapes), tuple(bn_names), tuple(bn_sizes))


# ------------------------------------------------------------------ model <-> flat numpy
def binary_latents(model: BNN) -> np.ndarray:
    """All binary layers' latent weights, flattened and concatenated (float32, ``(B,)``)."""
    return np.concatenate(
        [layer.weight.detach().cpu().numpy().reshape(-1) for layer in model.binary_layers()]
    ).astype(np.float32)


def bn_vector(model: BNN, layout: Layout) -> np.ndarray:
    """All batch-norm numbers in layout order (float32, ``(K,)``)."""
    state = model.state_dict()
    return np.concatenate([state[name].detach().cpu().numpy().reshape(-1) for name in layout.bn_names]).astype(
        np.float32
    )


def load_into_model(model: BNN, layout: Layout, latent: np.ndarray, bn: np.ndarray) -> None:
    """Set ``model``'s binary latent weights from ``latent (B,)`` and batch norm from ``bn (K,)``."""
    latent = np.asarray(latent, dtype=np.float32)
    bn = np.asarray(bn, dtype=np.float32)
    if latent.shape != (layout.n_binary,) or bn.shape != (layout.n_bn,):
        raise CodecError(
            f"expected {layout.n_binary} binary and {layout.n_bn} batch-norm numbers, "
            f"got {latent.shape} and {bn.shape}"
        )
    state = model.state_dict()
    offset = 0
    for name, shape in zip(layout.binary_names, layout.binary_shapes):
        size = shape[0] * shape[1]
        state[name] = torch.from_numpy(latent[offset : offset + size].reshape(shape).copy())
        offset += size
    offset = 0
    for name, size in zip(layout.bn_names, layout.bn_sizes):
        state[name] = torch.from_numpy(bn[offset : offset + size].copy())
        offset += size
    model.load_state_dict(state)


# ------------------------------------------------------------------ encode
def check_bn_encoding(bn_encoding: str) -> str:
    if bn_encoding not in BN_ENCODINGS:
        raise CodecError(f"unknown batch-norm encoding {bn_encoding!r}; use one of {', '.join(BN_ENCODINGS)}")
    return bn_encoding


def encode_signs(latent: np.ndarray, bn: np.ndarray, bn_dtype: str = "float16", bn_encoding: str = "floats",
                 reference_bn: np.ndarray | None = None, layout: Layout | None = None) -> dict[str, np.ndarray]:
    """A ``signs`` payload: the sign bits of ``latent`` (``sign(0)=+1``), then the batch norm ``bn``.

    ``bn_encoding="thresholds"`` (needs the BNN's ``layout``): a threshold block, an update
    against ``reference_bn`` (the global batch norm received) when one is given, else the full block.
    """
    bits = pack_signs(np.asarray(latent).reshape(-1))
    if check_bn_encoding(bn_encoding) == "floats":
        return {BNN_KEY: np.concatenate([bits, bn_wire_bytes(bn, bn_dtype)])}
    return {BNT_KEY: np.concatenate([bits, threshold_block(bn, layout, bn_dtype, reference_bn)])}


def threshold_block(bn: np.ndarray, layout: Layout | None, bn_dtype: str = "float16",
                    reference_bn: np.ndarray | None = None) -> np.ndarray:
    """``bn`` as a threshold block (uint8): an update against ``reference_bn``, or the full block."""
    if layout is None:
        raise CodecError("encoding batch norm as thresholds needs the BNN's layout")
    bn = _finite(bn)
    if bn.shape != (layout.n_bn,):
        raise CodecError(f"expected {layout.n_bn} batch-norm numbers, got {bn.size}")
    try:
        if reference_bn is None:
            data = thresholds.encode_full(bn, layout.shape, bn_dtype)
        else:
            data = thresholds.encode_update(bn, _finite(reference_bn), layout.shape, bn_dtype)
    except (thresholds.ThresholdError, HyBNNError) as exc:
        raise CodecError(f"the batch norm has no threshold form: {exc}") from exc
    return np.frombuffer(data, dtype=np.uint8).copy()


def _finite(bn: np.ndarray) -> np.ndarray:
    bn = np.asarray(bn, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(bn)):
        raise CodecError("the batch-norm numbers hold NaN or infinity; the model diverged")
    return bn


def encode_latent(mean: np.ndarray, bn: np.ndarray, bn_dtype: str = "float16",
                  bn_encoding: str = "floats", layout: Layout | None = None) -> dict[str, np.ndarray]:
    """A ``latent`` payload: ``mean`` in ``[-1, 1]`` quantized to int8, and ``bn`` (numbers or a full threshold block)."""
    mean = np.clip(np.asarray(mean, dtype=np.float64).reshape(-1), -1.0, 1.0)
    q = np.rint(mean * LATENT_LEVELS).astype(np.int8)
    if check_bn_encoding(bn_encoding) == "floats":
        return {LATENT_KEY: q, BN_KEY: _encode_bn(bn, bn_dtype)}
    return {LATENT_KEY: q, THRESHOLDS_KEY: threshold_block(bn, layout, bn_dtype)}


def encode_model(model: BNN, bn_dtype: str = "float16", bn_encoding: str = "floats",
                 reference_bn: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The uplink payload of a trained BNN: its sign bits and batch norm (see :func:`encode_signs`)."""
    layout = layout_for(model.config)
    return encode_signs(binary_latents(model), bn_vector(model, layout), bn_dtype, bn_encoding, reference_bn, layout)


def bn_wire_bytes(bn: np.ndarray, bn_dtype: str) -> np.ndarray:
    """The batch-norm numbers as they travel after the signs: little-endian ``bn_dtype``, as uint8."""
    return _encode_bn(bn, bn_dtype).astype(_little(bn_dtype)).view(np.uint8)


def _little(bn_dtype: str) -> np.dtype:
    return np.dtype(BN_DTYPES[bn_dtype]).newbyteorder("<")


def _encode_bn(bn: np.ndarray, bn_dtype: str) -> np.ndarray:
    if bn_dtype not in BN_DTYPES:
        raise CodecError(f"unknown batch-norm dtype {bn_dtype!r}; use one of {', '.join(BN_DTYPES)}")
    bn = np.asarray(bn, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(bn)):
        raise CodecError("the batch-norm numbers hold NaN or infinity; the model diverged")
    out = bn.astype(BN_DTYPES[bn_dtype])
    if not np.all(np.isfinite(out)):
        raise CodecError(f"the batch-norm numbers overflow {bn_dtype}; send them as float32")
    return out


# ------------------------------------------------------------------ decode and validate
def payload_kind(payload: dict[str, np.ndarray]) -> str:
    """``"signs"`` or ``"latent"``, from the payload's keys; :class:`CodecError` if neither."""
    return _keys(payload)[0]


def bn_encoding_of(payload: dict[str, np.ndarray]) -> str:
    """``"floats"`` or ``"thresholds"``: how the payload carries batch norm, from its keys."""
    return _keys(payload)[1]


_KEY_SETS = {
    frozenset({BNN_KEY}): ("signs", "floats"),
    frozenset({BNT_KEY}): ("signs", "thresholds"),
    frozenset({LATENT_KEY, BN_KEY}): ("latent", "floats"),
    frozenset({LATENT_KEY, THRESHOLDS_KEY}): ("latent", "thresholds"),
}


def _keys(payload: dict[str, np.ndarray]) -> tuple[str, str]:
    found = _KEY_SETS.get(frozenset(payload))
    if found is None:
        expected = " or ".join(str(sorted(k)) for k in _KEY_SETS)
        raise CodecError(f"payload keys are {sorted(payload)}; expected {expected}")
    return found


def check_version(version: object) -> None:
    """Refuse a codec version other than :data:`CODEC_VERSION`."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or int(version) != CODEC_VERSION:
        raise CodecError(
            f"codec version {version!r} is not supported (this side speaks version {CODEC_VERSION}); "
            "run the same HyBNN release on the server and every client"
        )


def _blob(payload: dict[str, np.ndarray], key: str) -> np.ndarray:
    blob = payload[key]
    if not isinstance(blob, np.ndarray) or blob.dtype != np.uint8 or blob.ndim != 1:
        raise CodecError(f"'{key}' must be a 1-D uint8 array, got {_describe(blob)}")
    return blob


def _thresholds(data: np.ndarray, key: str, layout: Layout, reference_bn: np.ndarray | None) -> thresholds.Block:
    try:
        return thresholds.decode(data.tobytes(), layout.shape, reference_bn)
    except thresholds.ThresholdError as exc:
        raise CodecError(f"'{key}': {exc}") from exc


def _split(payload: dict[str, np.ndarray], layout: Layout, kind: str,
           reference_bn: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check the arrays' dtypes and sizes; return ``(binary part, bn (K,))``: float16/32 numbers
    as sent, or the canonical numbers of a threshold block (float32)."""
    encoding = bn_encoding_of(payload)
    if kind == "signs":
        head = layout.n_bits_bytes
        if encoding == "thresholds":
            blob = _blob(payload, BNT_KEY)
            if blob.shape[0] <= head:
                raise CodecError(f"'{BNT_KEY}' has {blob.shape[0]} bytes, no more than the {head} bytes of "
                                 "signs: its threshold block is missing (truncated)")
            return blob[:head], _thresholds(blob[head:], BNT_KEY, layout, reference_bn).bn
        blob = _blob(payload, BNN_KEY)
        sizes = {head + layout.n_bn * 2: "float16", head + layout.n_bn * 4: "float32"}
        if blob.shape[0] not in sizes:
            raise CodecError(
                f"'{BNN_KEY}' has {blob.shape[0]} bytes; a BNN {layout.config.in_bits}->"
                f"{list(layout.config.hidden)}->{layout.config.num_classes} takes "
                f"{' or '.join(str(n) for n in sizes)} (float16 or float32 batch norm)"
            )
        bn = blob[head:].copy().view(_little(sizes[blob.shape[0]]))
        return blob[:head], bn
    latent = payload[LATENT_KEY]
    if not isinstance(latent, np.ndarray) or latent.dtype != np.int8 or latent.shape != (layout.n_binary,):
        raise CodecError(f"'{LATENT_KEY}' must be int8 of shape ({layout.n_binary},), got {_describe(latent)}")
    if encoding == "thresholds":
        block = _thresholds(_blob(payload, THRESHOLDS_KEY), THRESHOLDS_KEY, layout, None)
        if block.form != "full":
            raise CodecError(f"'{THRESHOLDS_KEY}' beside '{LATENT_KEY}' must be a full threshold block")
        return latent, block.bn
    bn = payload[BN_KEY]
    if not isinstance(bn, np.ndarray) or bn.dtype.name not in BN_DTYPES or bn.shape != (layout.n_bn,):
        raise CodecError(f"'{BN_KEY}' must be float16 or float32 of shape ({layout.n_bn},), got {_describe(bn)}")
    return latent, bn


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} of shape {a.shape}"
    return type(a).__name__


def _checked(payload: dict[str, np.ndarray], layout: Layout, kind: str | None,
             reference_bn: np.ndarray | None) -> tuple[str, np.ndarray, np.ndarray]:
    found = payload_kind(payload)
    if kind is not None and found != kind:
        raise CodecError(f"expected a {kind!r} payload, got a {found!r} payload")
    binary, bn = _split(payload, layout, found, reference_bn)
    if not np.all(np.isfinite(bn)):
        raise CodecError("the batch-norm numbers hold NaN or infinity")
    if np.any(_bn_field(bn, layout, "running_var") < 0):
        raise CodecError("a batch-norm running variance is negative")
    if found == "signs":
        pad = layout.n_bits_bytes * 8 - layout.n_binary
        if pad and int(binary[-1]) & ((1 << pad) - 1):
            raise CodecError(f"the {pad} padding bits of the signs are not zero")
    elif np.any(binary < -LATENT_LEVELS):
        raise CodecError(f"'{LATENT_KEY}' holds -128, outside the quantized range [-127, 127]")
    return found, binary, bn


def validate(payload: dict[str, np.ndarray], layout: Layout, kind: str | None = None,
             reference_bn: np.ndarray | None = None) -> str:
    """Check keys, dtypes, sizes, padding bits and finiteness; return the payload kind.

    A threshold update is checked against ``reference_bn``, the global batch norm it was
    taken against (without it, it is refused). Raises :class:`CodecError` with the reason
    on the first problem.
    """
    return _checked(payload, layout, kind, reference_bn)[0]


def decode(payload: dict[str, np.ndarray], layout: Layout, kind: str | None = None,
           reference_bn: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate, then return ``(weights (B,), bn (K,))`` as float32.

    For a ``signs`` payload ``weights`` are +-1; for a ``latent`` payload they are the
    dequantized mean in ``[-1, 1]``. A threshold block gives its canonical batch-norm
    numbers (:func:`common.federated.thresholds.canonical`); an update needs ``reference_bn``.
    """
    found, binary, bn = _checked(payload, layout, kind, reference_bn)
    if found == "signs":
        weights = unpack_signs(binary, layout.n_binary, dtype=np.float32)
    else:
        weights = binary.astype(np.float32) / LATENT_LEVELS
    return weights, bn.astype(np.float32)


def bn_update_step(payload: dict[str, np.ndarray], layout: Layout) -> int | None:
    """The step of a threshold update in a ``signs`` payload (1: exact), from its header; ``None``
    for any other payload. Only for reporting: :func:`decode` does the checking."""
    if set(payload) != {BNT_KEY}:
        return None
    data = np.asarray(payload[BNT_KEY]).tobytes()[layout.n_bits_bytes :]
    if len(data) < 2 or thresholds.block_form(data) != "update":
        return None
    index = data[1] >> 4
    return thresholds.STEPS[index] if index < len(thresholds.STEPS) else None


def _bn_field(bn: np.ndarray, layout: Layout, field: str) -> np.ndarray:
    parts = []
    offset = 0
    for name, size in zip(layout.bn_names, layout.bn_sizes):
        if name.endswith("." + field):
            parts.append(bn[offset : offset + size])
        offset += size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bn.dtype)


# ------------------------------------------------------------------ sizes
def npy_nbytes(array: np.ndarray) -> int:
    """Bytes of ``array`` as ``np.save`` writes it, which is the data a Flower ``Array`` carries."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getbuffer().nbytes


def payload_nbytes(payload: dict[str, np.ndarray]) -> int:
    """Bytes of the arrays' data as serialized (record headers not included): raw bytes for
    1-D ``uint8`` / ``int8`` arrays, numpy's ``np.save`` form (its header included) otherwise.

    The Flower layer measures the full serialized record (``common.federated.wire.record_nbytes``);
    this number is the part the codec controls.
    """
    return sum(a.nbytes if is_raw(a) else npy_nbytes(a) for a in payload.values())


RAW_DTYPES = ("uint8", "int8")


def is_raw(array: np.ndarray) -> bool:
    """Whether ``array`` travels as raw bytes (a 1-D ``uint8`` or ``int8`` array)."""
    return isinstance(array, np.ndarray) and array.ndim == 1 and array.dtype.name in RAW_DTYPES
