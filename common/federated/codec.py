"""The wire codec of FedHyBNN: what a BNN looks like while it travels.

Shared by the ClientApp and the ServerApp; numpy in, numpy out, no Flower import.
A payload is a ``dict[str, np.ndarray]`` that the Flower layer puts into one
``ArrayRecord``, one ``Array`` per key. Every ``Array`` costs about 290 bytes of
headers once serialized (a numpy header, an object header and a chunk header), which
is 7% of a packed BNN, so the uplink is a single array.

Payload kinds
-------------
``signs`` (every uplink, and the downlink in ``vote`` mode): one array ``"bnn"``,
    ``uint8 (ceil(B/8) + K*s,)``. First the signs of all binary layers' latent weights,
    each flattened row-major, concatenated input to output, packed with
    :func:`common.packing.pack_signs` (``+1`` -> bit 1, most significant bit first,
    padding bits 0). Then the ``K`` batch-norm numbers (see below) as little-endian
    float16 (``s = 2``, the default) or float32 (``s = 4``); the length tells which.
``latent`` (the downlink in ``mean`` mode): ``"latent"``, ``int8 (B,)``, the weighted
    mean of the clients' +-1 weights, a value in ``[-1, 1]``, quantized as
    ``round(127 * mean)``; and ``"bn"``, the ``K`` batch-norm numbers as a float16 or
    float32 array.

The batch-norm numbers are, for every batch-norm layer, input to output, its
``weight``, ``bias``, ``running_mean`` and ``running_var`` concatenated.
The running statistics are averaged like the affine parameters; the batch counter
(``num_batches_tracked``) does not travel because the layers use a fixed momentum.

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
from common.packing import pack_signs, packed_length, unpack_signs

CODEC_VERSION = 1
BNN_KEY = "bnn"
BN_KEY = "bn"
LATENT_KEY = "latent"
KINDS = ("signs", "latent")
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
def encode_signs(latent: np.ndarray, bn: np.ndarray, bn_dtype: str = "float16") -> dict[str, np.ndarray]:
    """A ``signs`` payload: the sign bits of ``latent`` (``sign(0)=+1``), then ``bn``'s bytes."""
    bits = pack_signs(np.asarray(latent).reshape(-1))
    return {BNN_KEY: np.concatenate([bits, bn_wire_bytes(bn, bn_dtype)])}


def encode_latent(mean: np.ndarray, bn: np.ndarray, bn_dtype: str = "float16") -> dict[str, np.ndarray]:
    """A ``latent`` payload: ``mean`` in ``[-1, 1]`` quantized to int8, and ``bn``."""
    mean = np.clip(np.asarray(mean, dtype=np.float64).reshape(-1), -1.0, 1.0)
    q = np.rint(mean * LATENT_LEVELS).astype(np.int8)
    return {LATENT_KEY: q, BN_KEY: _encode_bn(bn, bn_dtype)}


def encode_model(model: BNN, bn_dtype: str = "float16") -> dict[str, np.ndarray]:
    """The uplink payload of a trained BNN: its sign bits and batch norm."""
    layout = layout_for(model.config)
    return encode_signs(binary_latents(model), bn_vector(model, layout), bn_dtype)


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
    keys = set(payload)
    if keys == {BNN_KEY}:
        return "signs"
    if keys == {LATENT_KEY, BN_KEY}:
        return "latent"
    raise CodecError(f"payload keys are {sorted(keys)}; expected {[BNN_KEY]} or {[BN_KEY, LATENT_KEY]}")


def check_version(version: object) -> None:
    """Refuse a codec version other than :data:`CODEC_VERSION`."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or int(version) != CODEC_VERSION:
        raise CodecError(
            f"codec version {version!r} is not supported (this side speaks version {CODEC_VERSION}); "
            "run the same HyBNN release on the server and every client"
        )


def _split(payload: dict[str, np.ndarray], layout: Layout, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Check the arrays' dtypes and sizes; return ``(binary part, bn as float16/32)``."""
    if kind == "signs":
        blob = payload[BNN_KEY]
        if not isinstance(blob, np.ndarray) or blob.dtype != np.uint8 or blob.ndim != 1:
            raise CodecError(f"'{BNN_KEY}' must be a 1-D uint8 array, got {_describe(blob)}")
        head = layout.n_bits_bytes
        sizes = {head + layout.n_bn * 2: "float16", head + layout.n_bn * 4: "float32"}
        if blob.shape[0] not in sizes:
            raise CodecError(
                f"'{BNN_KEY}' has {blob.shape[0]} bytes; a BNN {layout.config.in_bits}->"
                f"{list(layout.config.hidden)}->{layout.config.num_classes} takes "
                f"{' or '.join(str(n) for n in sizes)} (float16 or float32 batch norm)"
            )
        bn = blob[head:].copy().view(_little(sizes[blob.shape[0]]))
        return blob[:head], bn
    latent, bn = payload[LATENT_KEY], payload[BN_KEY]
    if not isinstance(latent, np.ndarray) or latent.dtype != np.int8 or latent.shape != (layout.n_binary,):
        raise CodecError(f"'{LATENT_KEY}' must be int8 of shape ({layout.n_binary},), got {_describe(latent)}")
    if not isinstance(bn, np.ndarray) or bn.dtype.name not in BN_DTYPES or bn.shape != (layout.n_bn,):
        raise CodecError(f"'{BN_KEY}' must be float16 or float32 of shape ({layout.n_bn},), got {_describe(bn)}")
    return latent, bn


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} of shape {a.shape}"
    return type(a).__name__


def validate(payload: dict[str, np.ndarray], layout: Layout, kind: str | None = None) -> str:
    """Check keys, dtypes, sizes, padding bits and finiteness; return the payload kind.

    Raises :class:`CodecError` with the reason on the first problem.
    """
    found = payload_kind(payload)
    if kind is not None and found != kind:
        raise CodecError(f"expected a {kind!r} payload, got a {found!r} payload")
    binary, bn = _split(payload, layout, found)
    if not np.all(np.isfinite(bn)):
        raise CodecError("the batch-norm numbers hold NaN or infinity")
    if np.any(_bn_field(bn, layout, "running_var") < 0):
        raise CodecError("a batch-norm running variance is negative")
    if found == "signs":
        pad = layout.n_bits_bytes * 8 - layout.n_binary
        if pad and int(binary[-1]) & ((1 << pad) - 1):
            raise CodecError(f"the {pad} padding bits of '{BNN_KEY}' are not zero")
    elif np.any(binary < -LATENT_LEVELS):
        raise CodecError(f"'{LATENT_KEY}' holds -128, outside the quantized range [-127, 127]")
    return found


def decode(payload: dict[str, np.ndarray], layout: Layout, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate, then return ``(weights (B,), bn (K,))`` as float32.

    For a ``signs`` payload ``weights`` are +-1; for a ``latent`` payload they are the
    dequantized mean in ``[-1, 1]``.
    """
    found = validate(payload, layout, kind)
    binary, bn = _split(payload, layout, found)
    if found == "signs":
        weights = unpack_signs(binary, layout.n_binary, dtype=np.float32)
    else:
        weights = binary.astype(np.float32) / LATENT_LEVELS
    return weights, bn.astype(np.float32)


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
    """Bytes of the arrays' data as serialized (numpy headers included, record headers not).

    The Flower layer measures the full serialized record (``server.strategy.record_nbytes``);
    this number is the part the codec controls.
    """
    return sum(npy_nbytes(a) for a in payload.values())
