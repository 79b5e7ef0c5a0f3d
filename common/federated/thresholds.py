"""Batch norm on the wire as integer thresholds (``bn-encoding = "thresholds"``).

A hidden unit of the BNN computes ``sign(bn(2p - n))``, where ``p`` counts the agreeing
bits of its ``n`` binary inputs. In eval mode that is a step function of the integer ``p``:
the unit fires iff ``p >= u`` (or, when its batch-norm scale is negative, iff ``p < u``),
with ``u`` in ``[0, n + 1]``. The edge engine folds it the same way
(:func:`common.edge.deploy.fold_sign_thresholds`); ``u`` is that threshold, plus one for a
flipped unit. One integer and one bit per hidden unit say everything the server's
evaluation needs from the hidden batch norms; the output batch norm travels as its four
numbers per class, in ``bn-dtype``.

Canonical form. On the receiving side a threshold becomes the batch norm
``weight = -1 if flip else 1``, ``bias = 0``, ``running_mean = 2u - n - 1``,
``running_var = 1``: in eval mode it fires exactly where the threshold says (``2p - n``
and ``2u - n - 1`` differ in parity, so the sign never meets a tie). A received
model is therefore an ordinary :class:`common.bnn.model.BNN` (evaluation, saving, the
edge export work unchanged), but its hidden batch norms are not trainable as they are:
in training mode a batch norm uses its batch's statistics, not the running ones. A client
first calls :func:`calibrate`, which sets ``bias`` from its own data so that, at the
start of training, each unit fires at the received threshold (``|weight| = 1``). After
training it calls :func:`recalibrate`, which replaces the running statistics by the exact
ones of its data, so that the thresholds it sends depend on its data and weights, not on
the last batches' noise.

Block layout (little-endian), after the packed signs (or alone, beside ``latent``):

===== ===================================================================================
bytes field
===== ===================================================================================
1     tag: bit 0 the form (0 full, 1 update), bit 1 the output numbers' dtype (0 float16,
      1 float32); the other bits are 0
...   full form: per hidden layer its ``u`` (uint8 when ``n + 1 <= 255``, else uint16),
      then its flip bits packed like the signs.
      Update form: one byte ``step_index << 4 | k``, two bytes of reference digest (the
      first bytes of sha256 over the reference's ``u`` as uint16 and its packed flips), then
      a bit stream, most significant bit first: for every hidden unit the Rice code
      (parameter ``k``: ``z >> k`` zero bits, a one bit, the low ``k`` bits of ``z``) of
      ``z``, the zigzag of ``d`` (0, -1, 1, -2, ... as 0, 1, 2, 3, ...), where
      ``u = u_reference + STEPS[step_index] * d``; one bit "flips changed"; if set, the
      count of changed flips and their unit indices (increasing), each in
      ``ceil(log2(H + 1))`` bits; zero padding to a whole byte.
C*4*s the output batch norm's weight, bias, running mean, running variance
===== ===================================================================================

The update form is what a client sends: its thresholds against the global thresholds it
received this round, which the server keeps. Its hidden part never exceeds
:func:`update_budget` bytes (:data:`BITS_PER_UNIT` bits per hidden unit plus its 3-byte
header): when the exact changes do not fit, the client sends them in steps of
``STEPS[i]`` (the smallest step that fits; :func:`encode_update`). Early in a run, when
a round moves many thresholds, that rounds them; once training settles they travel
exactly. The server and the downlink use the full form.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.packing import pack_bits, packed_length, unpack_bits

STEPS: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
"""The step sizes an update may use, by their 4-bit index."""
BITS_PER_UNIT = 2
"""An update's hidden part costs at most this many bits per hidden unit (plus 3 header bytes)."""
MAX_RICE_K = 15
DIGEST_BYTES = 2
FORM_FULL = 0
FORM_UPDATE = 1
_TAG_FORM = 0b01
_TAG_FLOAT32 = 0b10
OUTPUT_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
BN_EPS = 1e-5
"""``torch.nn.BatchNorm1d``'s default, which the BNN uses."""


class ThresholdError(ValueError):
    """A threshold block that does not decode; :mod:`common.federated.codec` turns it into a ``CodecError``."""


@dataclass(frozen=True)
class Shape:
    """The batch-norm layers of a BNN as the threshold form sees them."""

    hidden_inputs: tuple[int, ...]
    """``n`` of every hidden layer: its number of binary inputs."""
    hidden_units: tuple[int, ...]
    num_classes: int

    @classmethod
    def of(cls, config) -> "Shape":
        widths = (config.in_bits, *config.hidden)
        return cls(tuple(widths[:-1]), tuple(config.hidden), config.num_classes)

    @property
    def total_units(self) -> int:
        return sum(self.hidden_units)

    def threshold_dtype(self, layer: int) -> np.dtype:
        return np.dtype("u1") if self.hidden_inputs[layer] + 1 <= 255 else np.dtype("<u2")

    def full_hidden_bytes(self) -> int:
        return sum(h * self.threshold_dtype(i).itemsize + packed_length(h)
                   for i, h in enumerate(self.hidden_units))

    def output_bytes(self, bn_dtype: str) -> int:
        return 4 * self.num_classes * OUTPUT_DTYPES[bn_dtype].itemsize


@dataclass(frozen=True)
class Thresholds:
    """Every hidden unit's threshold ``u`` and flip, all hidden layers concatenated."""

    u: np.ndarray
    """int64 ``(H,)``, each in ``[0, n + 1]`` of its layer."""
    flip: np.ndarray
    """bool ``(H,)``: fires iff ``p < u`` instead of ``p >= u``."""


def update_budget(shape: Shape) -> int:
    """The most bytes an update's hidden part may take: :data:`BITS_PER_UNIT` bits per hidden
    unit and the 3-byte header (step and Rice parameter, reference digest)."""
    return 3 + math.ceil(BITS_PER_UNIT * shape.total_units / 8)


# ------------------------------------------------------------------ batch-norm vector <-> thresholds
def _slices(shape: Shape) -> tuple[list[slice], slice]:
    """Where each hidden batch norm's four fields and the output's sit in a layout's bn vector."""
    hidden, offset = [], 0
    for h in shape.hidden_units:
        hidden.append(slice(offset, offset + 4 * h))
        offset += 4 * h
    return hidden, slice(offset, offset + 4 * shape.num_classes)


def _batch_norm(numbers: np.ndarray, width: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(width)
    weight, bias, mean, var = np.asarray(numbers, dtype=np.float32).reshape(4, width)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(weight.copy()))
        bn.bias.copy_(torch.from_numpy(bias.copy()))
        bn.running_mean.copy_(torch.from_numpy(mean.copy()))
        bn.running_var.copy_(torch.from_numpy(var.copy()))
    return bn.eval()


def fold(bn: np.ndarray, shape: Shape) -> Thresholds:
    """The thresholds of the hidden batch norms in ``bn`` (layout order), exactly as eval mode computes them."""
    from common.edge.deploy import fold_sign_thresholds

    us, flips = [], []
    for i, (part, n, h) in enumerate(zip(_slices(shape)[0], shape.hidden_inputs, shape.hidden_units)):
        threshold, flip = fold_sign_thresholds(_batch_norm(bn[part], h), n, i)
        us.append(threshold.astype(np.int64) + flip)  # a flipped unit fires iff p <= t, i.e. p < t + 1
        flips.append(flip)
    return Thresholds(np.concatenate(us), np.concatenate(flips))


def output_numbers(bn: np.ndarray, shape: Shape) -> np.ndarray:
    """The output batch norm's weight, bias, running mean and running variance (float32)."""
    return np.asarray(bn, dtype=np.float32)[_slices(shape)[1]]


def canonical(thresholds: Thresholds, output: np.ndarray, shape: Shape) -> np.ndarray:
    """The batch-norm vector (layout order) that fires exactly at ``thresholds`` (see the module doc)."""
    parts, offset = [], 0
    for n, h in zip(shape.hidden_inputs, shape.hidden_units):
        u = thresholds.u[offset : offset + h].astype(np.float64)
        flip = thresholds.flip[offset : offset + h]
        offset += h
        parts += [np.where(flip, -1.0, 1.0), np.zeros(h), 2 * u - n - 1, np.ones(h)]
    parts.append(np.asarray(output, dtype=np.float64))
    return np.concatenate(parts).astype(np.float32)


def _check_range(thresholds: Thresholds, shape: Shape) -> None:
    offset = 0
    for i, (n, h) in enumerate(zip(shape.hidden_inputs, shape.hidden_units)):
        u = thresholds.u[offset : offset + h]
        bad = np.flatnonzero((u < 0) | (u > n + 1))
        if bad.size:
            raise ThresholdError(f"hidden layer {i} unit {int(bad[0])} has threshold {int(u[bad[0]])}, "
                                 f"outside [0, {n + 1}] for {n} inputs")
        offset += h


def digest(thresholds: Thresholds) -> bytes:
    """The first :data:`DIGEST_BYTES` bytes of sha256 over the thresholds and flips."""
    h = hashlib.sha256(np.asarray(thresholds.u, dtype="<u2").tobytes())
    h.update(pack_bits(thresholds.flip).tobytes())
    return h.digest()[:DIGEST_BYTES]


# ------------------------------------------------------------------ bit streams
def _zigzag(d: np.ndarray) -> np.ndarray:
    return np.where(d >= 0, 2 * d, -2 * d - 1)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return np.where(z % 2 == 0, z // 2, -(z + 1) // 2)


def _rice_bits(values: np.ndarray, k: int) -> np.ndarray:
    if values.size == 0:
        return np.zeros(0, dtype=bool)
    q = values >> k
    lengths = q + 1 + k
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    bits = np.zeros(int(lengths.sum()), dtype=bool)
    bits[starts + q] = True
    for j in range(k):
        bits[starts + q + 1 + j] = ((values >> (k - 1 - j)) & 1).astype(bool)
    return bits


def _int_bits(value: int, width: int) -> np.ndarray:
    return np.array([(value >> (width - 1 - j)) & 1 for j in range(width)], dtype=bool)


class _Reader:
    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits
        self.ones = np.flatnonzero(bits)
        self.cursor = 0

    def rice(self, count: int, k: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        weights = 1 << np.arange(k - 1, -1, -1, dtype=np.int64)
        for i in range(count):
            at = int(np.searchsorted(self.ones, self.cursor))
            if at >= self.ones.size:
                raise ThresholdError(f"the threshold update ends after {i} of {count} units (truncated)")
            q = int(self.ones[at]) - self.cursor
            self.cursor = int(self.ones[at]) + 1
            out[i] = (q << k) | (int(self.take(k) @ weights) if k else 0)
        return out

    def take(self, width: int) -> np.ndarray:
        if self.cursor + width > self.bits.size:
            raise ThresholdError("the threshold update ends inside a field (truncated)")
        out = self.bits[self.cursor : self.cursor + width].astype(np.int64)
        self.cursor += width
        return out

    def integer(self, width: int) -> int:
        return int(self.take(width) @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))) if width else 0


def _index_width(shape: Shape) -> int:
    return max(1, math.ceil(math.log2(shape.total_units + 1)))


# ------------------------------------------------------------------ encode
def _tag(form: int, bn_dtype: str) -> bytes:
    if bn_dtype not in OUTPUT_DTYPES:
        raise ThresholdError(f"unknown batch-norm dtype {bn_dtype!r}; use one of {', '.join(OUTPUT_DTYPES)}")
    return bytes([form | (_TAG_FLOAT32 if bn_dtype == "float32" else 0)])


def _output_bytes(output: np.ndarray, bn_dtype: str) -> bytes:
    out = np.asarray(output, dtype=np.float32).astype(OUTPUT_DTYPES[bn_dtype])
    if not np.all(np.isfinite(out)):
        raise ThresholdError(f"the output batch-norm numbers are NaN, infinite or overflow {bn_dtype}")
    return out.tobytes()


def encode_full(bn: np.ndarray, shape: Shape, bn_dtype: str = "float16") -> bytes:
    """The full block of the batch norms in ``bn`` (any batch-norm vector, layout order)."""
    thresholds = fold(bn, shape)
    parts, offset = [_tag(FORM_FULL, bn_dtype)], 0
    for i, h in enumerate(shape.hidden_units):
        parts.append(thresholds.u[offset : offset + h].astype(shape.threshold_dtype(i)).tobytes())
        parts.append(pack_bits(thresholds.flip[offset : offset + h]).tobytes())
        offset += h
    parts.append(_output_bytes(output_numbers(bn, shape), bn_dtype))
    return b"".join(parts)


def _oriented_like(new: Thresholds, reference: Thresholds, shape: Shape) -> Thresholds:
    """``new`` with each constant unit (firing always or never, which :func:`fold` writes unflipped)
    written with the reference's flip, so that a unit falling silent costs no flip change."""
    n_plus_1 = np.repeat(np.asarray(shape.hidden_inputs) + 1, shape.hidden_units)
    turn = ((new.u == 0) | (new.u == n_plus_1)) & ~new.flip & reference.flip
    return Thresholds(np.where(turn, n_plus_1 - new.u, new.u), new.flip | turn)


def _update_hidden(new: Thresholds, reference: Thresholds, shape: Shape, step_index: int) -> tuple[bytes, np.ndarray]:
    """The hidden part of an update with step ``STEPS[step_index]``; and the thresholds it stands for."""
    step = STEPS[step_index]
    new = _oriented_like(new, reference, shape)
    offset, d = 0, []
    for n, h in zip(shape.hidden_inputs, shape.hidden_units):
        ref = reference.u[offset : offset + h]
        want = new.u[offset : offset + h]
        # the multiple of the step nearest to the change that stays within [0, n + 1]
        lo, hi = -(ref // step), (n + 1 - ref) // step
        d.append(np.clip(np.rint((want - ref) / step).astype(np.int64), lo, hi))
        offset += h
    d = np.concatenate(d)
    z = _zigzag(d)
    k = min(range(MAX_RICE_K + 1), key=lambda k: int(np.sum(z >> k)) + z.size * (k + 1))
    changed = np.flatnonzero(new.flip != reference.flip)
    width = _index_width(shape)
    streams = [_rice_bits(z, k), np.array([changed.size > 0])]
    if changed.size:
        streams.append(_int_bits(int(changed.size), width))
        streams += [_int_bits(int(i), width) for i in changed]
    body = pack_bits(np.concatenate(streams)).tobytes()
    return bytes([step_index << 4 | k]) + digest(reference) + body, reference.u + step * d


def encode_update(bn: np.ndarray, reference_bn: np.ndarray, shape: Shape, bn_dtype: str = "float16") -> bytes:
    """What a client sends: the thresholds of ``bn`` against those of ``reference_bn`` (the global
    batch norm it received), within :func:`update_budget` (see the module doc). The full form
    instead when it is exact and fits, or when even the coarsest update does not fit (more
    changed flips than the budget holds)."""
    new, reference = fold(bn, shape), fold(reference_bn, shape)
    tag, out = _tag(FORM_UPDATE, bn_dtype), _output_bytes(output_numbers(bn, shape), bn_dtype)
    budget = update_budget(shape)
    exact, _ = _update_hidden(new, reference, shape, 0)
    if len(exact) <= budget:
        return tag + exact + out
    if shape.full_hidden_bytes() <= budget:
        return encode_full(bn, shape, bn_dtype)
    for step_index in range(1, len(STEPS)):
        hidden, _ = _update_hidden(new, reference, shape, step_index)
        if len(hidden) <= budget:
            return tag + hidden + out
    return encode_full(bn, shape, bn_dtype)


# ------------------------------------------------------------------ decode
@dataclass(frozen=True)
class Block:
    """A decoded block: the batch norm it stands for (canonical form) and how it travelled."""

    bn: np.ndarray
    form: str
    """``"full"`` or ``"update"``."""
    step: int
    """The update's step (1: exact); 1 for the full form."""
    bn_dtype: str


def block_form(data: bytes) -> str:
    """``"full"`` or ``"update"``, from the tag byte."""
    if len(data) < 1:
        raise ThresholdError("the threshold block is empty")
    return "update" if data[0] & _TAG_FORM else "full"


def decode(data: bytes, shape: Shape, reference_bn: np.ndarray | None = None) -> Block:
    """Check a block and return the canonical batch norm it stands for.

    An update needs ``reference_bn``, the global batch norm the client received (the server
    keeps it for the round). Everything malformed is a :class:`ThresholdError` that says what.
    """
    if len(data) < 1:
        raise ThresholdError("the threshold block is empty")
    tag = data[0]
    if tag & ~(_TAG_FORM | _TAG_FLOAT32):
        raise ThresholdError(f"unknown threshold block tag {tag:#04x}")
    bn_dtype = "float32" if tag & _TAG_FLOAT32 else "float16"
    out_len = shape.output_bytes(bn_dtype)
    if len(data) < 1 + out_len:
        raise ThresholdError(f"the threshold block has {len(data)} bytes, too few for its tag and the "
                             f"{out_len}-byte output batch norm (truncated)")
    hidden = data[1 : len(data) - out_len]
    output = np.frombuffer(data[len(data) - out_len :], dtype=OUTPUT_DTYPES[bn_dtype]).astype(np.float32)
    if not np.all(np.isfinite(output)):
        raise ThresholdError("the output batch-norm numbers hold NaN or infinity")
    if tag & _TAG_FORM:
        if reference_bn is None:
            raise ThresholdError("a threshold update arrived, but this side holds no global batch norm for the "
                                 "round to apply it to")
        thresholds, step = _decode_update(hidden, shape, fold(reference_bn, shape))
        form = "update"
    else:
        thresholds, step = _decode_full(hidden, shape), 1
        form = "full"
    return Block(canonical(thresholds, output, shape), form, step, bn_dtype)


def _decode_full(hidden: bytes, shape: Shape) -> Thresholds:
    if len(hidden) != shape.full_hidden_bytes():
        raise ThresholdError(f"the full threshold block's hidden part has {len(hidden)} bytes; "
                             f"{shape.full_hidden_bytes()} expected (truncated, or trailing bytes)")
    us, flips, offset = [], [], 0
    for i, h in enumerate(shape.hidden_units):
        dtype = shape.threshold_dtype(i)
        us.append(np.frombuffer(hidden, dtype=dtype, count=h, offset=offset).astype(np.int64))
        offset += h * dtype.itemsize
        packed = np.frombuffer(hidden, dtype=np.uint8, count=packed_length(h), offset=offset)
        pad = packed_length(h) * 8 - h
        if pad and int(packed[-1]) & ((1 << pad) - 1):
            raise ThresholdError(f"the {pad} padding bits of hidden layer {i}'s flips are not zero")
        flips.append(unpack_bits(packed, h).astype(bool))
        offset += packed_length(h)
    thresholds = Thresholds(np.concatenate(us), np.concatenate(flips))
    _check_range(thresholds, shape)
    return thresholds


def _decode_update(hidden: bytes, shape: Shape, reference: Thresholds) -> tuple[Thresholds, int]:
    if len(hidden) < 3:
        raise ThresholdError(f"the threshold update has {len(hidden)} header bytes, 3 expected (truncated)")
    if len(hidden) > update_budget(shape):
        raise ThresholdError(f"the threshold update takes {len(hidden)} bytes, more than its budget of "
                             f"{update_budget(shape)}")
    step_index, k = hidden[0] >> 4, hidden[0] & 0x0F
    if hidden[1:3] != digest(reference):
        raise ThresholdError("the threshold update was taken against other global thresholds than this side "
                             f"holds (digest {hidden[1:3].hex()}, expected {digest(reference).hex()}); the client "
                             "must encode against the global model of the round it answers")
    reader = _Reader(np.unpackbits(np.frombuffer(hidden, dtype=np.uint8, offset=3), bitorder="big").astype(bool))
    d = _unzigzag(reader.rice(shape.total_units, k))
    flip = reference.flip.copy()
    if reader.take(1)[0]:
        width = _index_width(shape)
        count = reader.integer(width)
        if not 1 <= count <= shape.total_units:
            raise ThresholdError(f"the threshold update changes {count} flips of {shape.total_units} units")
        changed = np.array([reader.integer(width) for _ in range(count)], dtype=np.int64)
        if np.any(np.diff(changed) <= 0) or changed[-1] >= shape.total_units:
            raise ThresholdError("the threshold update's changed flips are not increasing unit indices below "
                                 f"{shape.total_units}")
        flip[changed] = ~flip[changed]
    if packed_length(reader.cursor) != len(hidden) - 3:
        raise ThresholdError(f"the threshold update has {len(hidden) - 3 - packed_length(reader.cursor)} "
                             "trailing byte(s)")
    if np.any(reader.bits[reader.cursor :]):
        raise ThresholdError("the padding bits of the threshold update are not zero")
    thresholds = Thresholds(reference.u + STEPS[step_index] * d, flip)
    _check_range(thresholds, shape)
    return thresholds, STEPS[step_index]


# ------------------------------------------------------------------ aggregation
def aggregate(bns: list[np.ndarray], weights: list[float], shape: Shape, how: str = "median") -> np.ndarray:
    """The global batch norm (canonical) from the clients' batch-norm vectors.

    Every unit's flip is the clients' majority (by count for ``"median"``, by weight for
    ``"mean"``; a tie does not flip). Its threshold is the lower median over all clients
    (a value one of them sent, and within the honest clients' values while fewer than half
    are hostile), or the weighted mean, rounded. The output batch norm's numbers are the
    coordinate-wise median or weighted mean, as :func:`common.federated.robust.aggregate_bn`.
    """
    from common.federated.robust import aggregate_bn

    folded = [fold(np.asarray(b, dtype=np.float32), shape) for b in bns]
    us = np.stack([t.u for t in folded])
    votes = np.stack([np.where(t.flip, 1.0, -1.0) for t in folded])
    w = np.asarray(weights, dtype=np.float64) if how == "mean" else np.ones(len(bns))
    flip = (w[:, None] * votes).sum(axis=0) > 0
    if how == "mean":
        u = np.rint((w[:, None] * us).sum(axis=0) / w.sum()).astype(np.int64)
    else:
        u = np.sort(us, axis=0)[(len(bns) - 1) // 2]
    output = aggregate_bn([output_numbers(b, shape) for b in bns], weights, how)
    return canonical(Thresholds(u, flip), output, shape)


# ------------------------------------------------------------------ the client's side
def _hidden_preactivations(model, x: torch.Tensor):
    """Yield ``(layer index, linear, bn, pre-activations of x)`` layer by layer, each layer's input
    the eval-mode output of the one before."""
    with torch.no_grad():
        h = x
        for i, (linear, bn) in enumerate(zip(model.hidden, model.hidden_bn)):
            a = linear(h)
            yield i, linear, bn, a
            h = torch.where(bn.eval()(a) >= 0, 1.0, -1.0)
        yield len(model.hidden), model.out, model.out_bn, model.out(h)


def calibrate(model, x: torch.Tensor) -> None:
    """Make received threshold batch norms trainable on ``x`` (a client's inputs), keeping what they compute.

    For each hidden unit with threshold pre-activation ``t = running_mean`` and sign
    ``s = weight``: ``weight = s``, ``bias = -s (t - mean) / sqrt(var + eps)`` with the mean
    and variance of its pre-activations on ``x``, so that in training mode the unit starts
    firing where the received model's unit fires. The output batch norm is left as received.
    """
    was_training = model.training
    for index, _, bn, a in _hidden_preactivations(model, x):
        if index == len(model.hidden):
            break
        with torch.no_grad():
            mean, var = a.mean(0), a.var(0, unbiased=False)
            sign = torch.where(bn.weight >= 0, 1.0, -1.0)
            threshold = bn.running_mean.clone()
            bn.weight.copy_(sign)
            bn.bias.copy_(-sign * (threshold - mean) / torch.sqrt(var + bn.eps))
            # eval mode (the next layer's input) then fires as the received unit does
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    model.train(was_training)


def recalibrate(model, x: torch.Tensor) -> None:
    """Set every batch norm's running statistics to the exact mean and variance of its
    pre-activations on ``x``, layer by layer in eval mode (as ``torch`` keeps them: unbiased variance)."""
    was_training = model.training
    model.eval()
    for _, _, bn, a in _hidden_preactivations(model, x):
        with torch.no_grad():
            bn.running_mean.copy_(a.mean(0))
            bn.running_var.copy_(a.var(0, unbiased=len(a) > 1))
    model.train(was_training)
