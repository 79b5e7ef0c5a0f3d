"""The summable aggregation: a round's global model from integer sums over its clients alone.

Secure aggregation (``secure-aggregation = "on"``) lets the server learn only the sum of the
clients' vectors, so the global model must follow from sums. ``secure-aggregation = "clear"``
is the same aggregation in the clear; for the same clients and seeds both give the same global
model, bit for bit, because both go through :func:`client_vector` and :func:`global_model`.

Each client's weight
    its capped ``num-examples`` (:func:`common.federated.robust.capped_weights`), scaled to
    ``1 .. 2**weight_bits - 1`` against the round's largest capped weight and rounded
    (:func:`quantized_weights`). A small integer keeps the sums, and so the bits every
    element takes on the wire, small; clients of equal size weigh the same as before.

The vector of a client of weight ``w``, four segments of non-negative integers:

============ ============================== ==========================================
segment      elements                       the server derives
============ ============================== ==========================================
``votes``    ``w * (s + 1) / 2`` per binary  the weighted mean of the signs
             weight (``s`` its sign, +-1)   ``(2 P - W) / W``, ``W`` the weights' sum
``flips``    ``w * flip`` per hidden unit   the unit flips iff ``2 F > W`` (a tie does
                                            not flip), the weighted majority
``u``        ``w * u`` per hidden unit      the threshold ``rint(U / W)``
``output``   ``w * (q + R)`` per output     the weighted mean of the fixed-point
             batch-norm number              numbers ``q = rint(x * 2**FRACTION_BITS)``
============ ============================== ==========================================

These are :func:`common.federated.thresholds.aggregate`'s weighted-mean rules on integer
weights, with the output batch norm in fixed point (:data:`FRACTION_BITS` fraction bits, the
offset ``R`` making every element non-negative).

Widths. A segment's sums never exceed ``W_max`` times its largest element per unit of
weight, ``W_max`` the sum of the round's weights: ``1`` for votes and flips, ``n + 1`` for
thresholds (``n`` a hidden layer's inputs), ``2 R`` for the output numbers. Its width is the
bit length of that bound (:func:`widths`): the sum modulo ``2**width`` is the sum itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import HyBNNError
from common.federated import thresholds

SEGMENTS = ("votes", "flips", "u", "output")
FRACTION_BITS = 12
"""Fraction bits of the output batch norm's fixed point: steps of 1/4096, finer than float16's
2^-11 relative step for numbers above 1/2."""
OUTPUT_LIMIT = {"float16": 65504.0, "float32": float(2**24)}
"""The largest output batch-norm magnitude a vector carries, by bn-dtype: float16's largest
finite number (every downlink number fits it), or 2^24 for float32."""


class SumError(HyBNNError):
    """A vector or a sum that does not fit the round's summable layout."""


@dataclass(frozen=True)
class SumLayout:
    """The segments of one BNN's summable vector."""

    n_binary: int
    shape: thresholds.Shape
    bn_dtype: str = "float16"

    @property
    def lengths(self) -> tuple[int, ...]:
        h = self.shape.total_units
        return (self.n_binary, h, h, 4 * self.shape.num_classes)

    @property
    def offset(self) -> int:
        """``R``: what makes a fixed-point output number non-negative."""
        return int(np.ceil(OUTPUT_LIMIT[self.bn_dtype] * 2**FRACTION_BITS))

    def element_bounds(self) -> tuple[int, ...]:
        """Each segment's largest element per unit of weight."""
        return (1, 1, max(self.shape.hidden_inputs) + 1, 2 * self.offset)


def quantized_weights(capped: Sequence[int], weight_bits: int) -> list[int]:
    """Each capped weight scaled to ``1 .. 2**weight_bits - 1`` against the largest, rounded half up."""
    if not 1 <= weight_bits <= 16:
        raise SumError(f"weight bits {weight_bits} outside 1..16")
    capped = [int(c) for c in capped]
    if not capped:
        return []
    if min(capped) < 1:
        raise SumError(f"a weight below 1 ({min(capped)})")
    top, levels = max(capped), 2**weight_bits - 1
    return [max(1, (2 * c * levels + top) // (2 * top)) for c in capped]


def widths(layout: SumLayout, total_weight: int) -> tuple[int, ...]:
    """The bits of each segment for a round whose weights sum to at most ``total_weight``."""
    if total_weight < 1:
        raise SumError(f"a round's total weight must be at least 1, got {total_weight}")
    found = tuple(int(total_weight * bound).bit_length() for bound in layout.element_bounds())
    if max(found) > 64:
        raise SumError(f"the round's sums need {max(found)} bits (total weight {total_weight}); at most 64 fit. "
                       "Lower sum-weight-bits or the clients per round")
    return found


def _fixed_point(values: np.ndarray, layout: SumLayout) -> np.ndarray:
    limit = OUTPUT_LIMIT[layout.bn_dtype]
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) > limit):
        raise SumError(f"an output batch-norm number is not finite or beyond +-{limit:g}")
    return np.rint(values * 2**FRACTION_BITS).astype(np.int64) + layout.offset


def client_vector(weights: np.ndarray, bn: np.ndarray, weight: int, layout: SumLayout) -> list[np.ndarray]:
    """A client's vector (uint64 segments) from its decoded update: ``weights`` +-1 ``(B,)`` and
    ``bn`` the canonical batch norm (what the server decodes from its plaintext reply)."""
    weights = np.asarray(weights).reshape(-1)
    if weights.size != layout.n_binary or not np.all(np.abs(weights) == 1):
        raise SumError(f"the update must hold {layout.n_binary} signs of +-1")
    if weight < 1:
        raise SumError(f"a client's weight must be at least 1, got {weight}")
    folded = thresholds.fold(np.asarray(bn, dtype=np.float32), layout.shape)
    parts = [(weights > 0).astype(np.int64), folded.flip.astype(np.int64), folded.u.astype(np.int64),
             _fixed_point(thresholds.output_numbers(bn, layout.shape), layout)]
    return [(int(weight) * p).astype(np.uint64) for p in parts]


def add(total: list[np.ndarray] | None, vector: Sequence[np.ndarray], widths_: Sequence[int]) -> list[np.ndarray]:
    """``total + vector`` segment by segment, modulo ``2**width`` (numpy's uint64 wraps modulo 2^64)."""
    masks = [np.uint64(2**w - 1) if w < 64 else np.uint64(2**64 - 1) for w in widths_]
    if total is None:
        return [np.asarray(v, dtype=np.uint64) & m for v, m in zip(vector, masks)]
    return [(t + np.asarray(v, dtype=np.uint64)) & m for t, v, m in zip(total, vector, masks)]


def check_sums(sums: Sequence[np.ndarray], total_weight: int, layout: SumLayout) -> None:
    """Refuse sums that honest clients of total weight ``total_weight`` cannot give (a client that
    sent elements out of range, or a wrong total): :class:`SumError` naming the segment."""
    if len(sums) != len(SEGMENTS):
        raise SumError(f"{len(sums)} segments, expected {len(SEGMENTS)}")
    for name, s, n, bound in zip(SEGMENTS, sums, layout.lengths, layout.element_bounds()):
        if s.shape != (n,):
            raise SumError(f"segment {name} holds {s.shape} elements, expected ({n},)")
        top = total_weight * bound
        if s.size and int(s.max()) > top:
            raise SumError(f"segment {name} sums to {int(s.max())} somewhere, beyond {top}, the most the round's "
                           f"clients of total weight {total_weight} can send: a client sent elements out of range")


def global_model(sums: Sequence[np.ndarray], total_weight: int, layout: SumLayout) -> tuple[np.ndarray, np.ndarray]:
    """``(mean of the signs in [-1, 1] (float64, (B,)), canonical batch norm (float32))`` from the sums."""
    check_sums(sums, total_weight, layout)
    votes, flips, us, output = (np.asarray(s, dtype=np.int64) for s in sums)
    w = int(total_weight)
    mean = (2 * votes - w) / w
    u = np.rint(us / w).astype(np.int64)
    flip = 2 * flips > w
    numbers = (output / w - layout.offset) / 2**FRACTION_BITS
    var = slice(3 * layout.shape.num_classes, 4 * layout.shape.num_classes)
    numbers[var] = np.maximum(numbers[var], 2.0**-FRACTION_BITS)  # a variance stays positive
    return mean, thresholds.canonical(thresholds.Thresholds(u, flip), numbers, layout.shape)


def plain_sum(vectors: Sequence[Sequence[np.ndarray]], widths_: Sequence[int]) -> list[np.ndarray]:
    """The clients' vectors summed in the clear, modulo each segment's width: what the secure sum gives."""
    total = None
    for v in vectors:
        total = add(total, v, widths_)
    if total is None:
        raise SumError("no vector to sum")
    return total


def groups(n: int, size: int, seed: int, server_round: int) -> list[list[int]]:
    """Secure groups: the round's clients ``0 .. n - 1`` in ``n // size`` groups of ``size`` or
    ``size + 1`` (one group when ``size`` is 0 or more than half of ``n``), drawn from
    ``(seed, round)`` so that the secure run and its clear twin form the same groups."""
    import random

    if size <= 0 or n < 2 * size:
        return [list(range(n))] if n else []
    order = list(range(n))
    random.Random(f"hybnn-groups:{seed}:{server_round}").shuffle(order)
    count = n // size
    return [sorted(order[i::count]) for i in range(count)]


def group_model(group_sums: Sequence[Sequence[np.ndarray]], group_weights: Sequence[int],
                layout: SumLayout) -> tuple[np.ndarray, np.ndarray]:
    """The global model from several groups' sums: each group's model (:func:`global_model`),
    then, across the groups, each weight's majority of the groups' votes (the mean of their +-1
    votes, in [-1, 1]; the project's tie rule, sign(0) = +1, in each group's vote) and each batch-norm
    unit's majority flip and lower median threshold, the output batch norm's coordinate-wise
    median (:func:`common.federated.thresholds.aggregate`, ``"median"``): a group that a
    minority of clients controls moves neither. One group: its model."""
    models = [global_model(s, w, layout) for s, w in zip(group_sums, group_weights)]
    if not models:
        raise SumError("no group to aggregate")
    if len(models) == 1:
        return models[0]
    votes = np.stack([np.where(mean >= 0, 1.0, -1.0) for mean, _ in models])
    bn = thresholds.aggregate([bn for _, bn in models], [1.0] * len(models), layout.shape, "median")
    return votes.mean(axis=0), bn
