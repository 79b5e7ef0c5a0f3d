"""What one client can do to a round: bounded weight, checked metrics, robust batch norm.

Every client reply is input that may be wrong or hostile. The strategy
(``server/strategy.py``) uses these plain functions, tested without Flower:

* :func:`check_client_metrics`: the reply's ``MetricRecord`` against a small schema
  (:data:`CLIENT_METRICS`): each known key a scalar of the right kind within its range;
  unknown keys are set aside (the caller logs them) and never reach results.json.
* :func:`capped_weights`: a client's weight in the aggregate is its ``num-examples``,
  capped at ``max_weight_vs_median`` times the round's (lower) median and at
  ``max_num_examples``. With ``k`` adversaries among ``n`` clients that all claim
  more than the cap, the adversaries hold at most ``k m / (k m + n - k)`` of the weight
  (``m`` the multiple, honest clients near the median); a minority stays below half as
  long as ``m < (n - k) / k``: the default 1.25 keeps 2 of 5 at 45%.
* :func:`aggregate_bn`: the batch-norm numbers, by coordinate-wise median (default) or
  by the weighted mean. The median of ``n`` clients stays within the honest clients'
  range while fewer than half are hostile; a weighted mean follows any one client.
* :func:`check_bn_range`: batch-norm numbers finite, within what the downlink's dtype
  holds, running variances positive.
* :func:`printable`: the one escape for every string a peer chose (an error reply's reason,
  a metric key, a message naming its records) before it reaches a log or results: control
  characters and terminal escapes written as ``\\x1b``-style escapes, the length bounded.
* :func:`error_summary`: an error reply's reason that carries a traceback (Ray's exception repr in
  a simulation) cut to its root exception's line, colour codes removed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import HyBNNError
from common.federated.wire import METRIC

DEFAULT_MAX_WEIGHT_VS_MEDIAN = 1.25
"""A client weighs at most this many times the round's median ``num-examples``; 0: no cap."""
BN_AGGREGATIONS = ("median", "mean")
DEFAULT_BN_AGGREGATION = "median"


class ReplyError(HyBNNError):
    """A client reply that is left out of the round; the message says why."""


@dataclass(frozen=True)
class MetricSpec:
    """One client metric: a scalar of ``kind`` (``int`` or ``float``) within ``[low, high]``, finite."""

    kind: type
    low: float
    high: float = math.inf
    required: bool = False

    def check(self, key: str, value: object) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ReplyError(f"metric {key!r} must be a scalar {self.kind.__name__}, got {type(value).__name__} "
                             f"{_short(value)}")
        if self.kind is int and not isinstance(value, int):
            raise ReplyError(f"metric {key!r} must be a whole number (int), got {_short(value)}")
        if not math.isfinite(value) or not self.low <= value <= self.high:
            raise ReplyError(f"metric {key!r} = {_short(value)} is outside [{self.low}, {self.high}]")
        return self.kind(value)


CLIENT_METRICS: dict[str, MetricSpec] = {
    METRIC.num_examples: MetricSpec(int, 1, required=True),
    METRIC.codec_version: MetricSpec(int, 0, required=True),
    METRIC.partition_id: MetricSpec(int, 0),
    METRIC.train_loss: MetricSpec(float, 0.0),
    METRIC.train_acc: MetricSpec(float, 0.0, 1.0),
    METRIC.train_seconds: MetricSpec(float, 0.0),
}
"""What a client may report, and nothing else counts. ``train-*`` are averaged over the round."""
AVERAGED_METRICS = (METRIC.train_loss, METRIC.train_acc, METRIC.train_seconds)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_KEY_CHARS = 60
"""A client's metric key the schema does not know is cut to this length in logs."""
MAX_REASON_CHARS = 500
"""Why a reply was left out, which may hold a client's own words (an error reply's reason), is cut to this length in logs and results."""


TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")
"""Terminal colour codes (SGR sequences), which Ray's exception reprs and Flower's log lines carry:
:func:`error_summary` and the terminal echo of a simulation's log remove them."""


def printable(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` safe to print and store: control characters (newlines, terminal escapes) and other
    unprintable ones escaped, at most ``limit`` characters, with the original length when cut."""
    text = str(text)
    cleaned = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[: 4 * limit])
    if len(cleaned) <= limit:
        return cleaned
    return f"{cleaned[:limit]}... ({len(text)} characters)"


EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): ?(.*)$")
"""A Python exception's own line in a traceback: ``ValueError: boom``."""


def error_summary(reason: object) -> str:
    """An error reply's reason, short: one that carries a traceback (a Flower simulation wraps a
    client's exception in Ray's exception repr, with the remote traceback and colour codes) becomes
    the first exception's line, the root cause; others are kept. Pass the result to :func:`printable`."""
    text = TERMINAL_COLOURS.sub("", str(reason))
    if "Traceback (most recent call last):" not in text and "ray::" not in text:
        return text
    for line in text.splitlines():
        match = EXCEPTION_LINE.match(line)
        if match:
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()} (its traceback is in the client's log)"
    return text


def check_client_metrics(metrics: Mapping[str, object]) -> tuple[dict[str, int | float], list[str]]:
    """``(checked metrics, unknown keys)``; :class:`ReplyError` on a missing or bad known key.

    The unknown keys come back through :func:`printable` (at most :data:`MAX_KEY_CHARS` each),
    ready for a log line."""
    checked: dict[str, int | float] = {}
    unknown: list[str] = []
    for key, value in metrics.items():
        spec = CLIENT_METRICS.get(key)
        if spec is None:
            unknown.append(printable(key, MAX_KEY_CHARS))  # the client's own words: escaped where they are read
            continue
        checked[key] = spec.check(key, value)
    missing = [key for key, spec in CLIENT_METRICS.items() if spec.required and key not in checked]
    if missing:
        raise ReplyError(f"the reply lacks the metric(s) {', '.join(missing)}")
    return checked, sorted(unknown)


def averaged_metrics(metrics: Sequence[Mapping[str, float]], weights: Sequence[float]) -> dict[str, float]:
    """Per key of :data:`AVERAGED_METRICS`, the ``weights``-weighted mean over the clients that report it."""
    out: dict[str, float] = {}
    for key in AVERAGED_METRICS:
        pairs = [(float(m[key]), float(w)) for m, w in zip(metrics, weights) if key in m]
        total = sum(w for _, w in pairs)
        if pairs and total > 0:
            # A convex combination: never past the largest value (v * w alone overflows near 1e308).
            out[key] = sum(v * (w / total) for v, w in pairs)
    return out


def check_weight_bounds(max_weight_vs_median: float, max_num_examples: int, bn_aggregation: str) -> None:
    """Refuse settings that would not bound anything or do not exist."""
    if not (max_weight_vs_median == 0 or 1.0 <= max_weight_vs_median < math.inf):
        raise HyBNNError(f"Run config max-weight-vs-median={max_weight_vs_median}; use 0 (no cap) or a "
                         "multiple >= 1 of the round's median num-examples.")
    if max_num_examples < 0:
        raise HyBNNError(f"Run config max-num-examples={max_num_examples}; use 0 (no cap) or a positive number.")
    if bn_aggregation not in BN_AGGREGATIONS:
        raise HyBNNError(f"Run config bn-aggregation={bn_aggregation!r}; use one of {', '.join(BN_AGGREGATIONS)}.")


def weight_cap(num_examples: Sequence[int], max_weight_vs_median: float = DEFAULT_MAX_WEIGHT_VS_MEDIAN,
               max_num_examples: int = 0) -> int | None:
    """The largest weight a client may have this round, ``None`` for no cap.

    The median is the lower median (the smaller middle value of an even count), so that
    with two clients the larger claim cannot set the cap.
    """
    caps = []
    if max_weight_vs_median and num_examples:
        lower_median = sorted(int(n) for n in num_examples)[(len(num_examples) - 1) // 2]
        caps.append(max(1, math.floor(max_weight_vs_median * lower_median)))
    if max_num_examples:
        caps.append(int(max_num_examples))
    return min(caps) if caps else None


def capped_weights(num_examples: Sequence[int], max_weight_vs_median: float = DEFAULT_MAX_WEIGHT_VS_MEDIAN,
                   max_num_examples: int = 0) -> list[int]:
    """Each client's weight: its ``num-examples``, at most :func:`weight_cap`."""
    cap = weight_cap(num_examples, max_weight_vs_median, max_num_examples)
    return [int(n) if cap is None else min(int(n), cap) for n in num_examples]


def running_var_mask(bn_names: Sequence[str], bn_sizes: Sequence[int]) -> np.ndarray:
    """Which of the batch-norm numbers (in the codec's layout order) are running variances."""
    return np.concatenate([np.full(size, name.endswith(".running_var")) for name, size in zip(bn_names, bn_sizes)])


def check_bn_range(bn: np.ndarray, is_running_var: np.ndarray, bn_dtype: str) -> None:
    """:class:`ReplyError` unless every number is finite and fits ``bn_dtype``, and every variance is > 0.

    ``is_running_var`` is :func:`running_var_mask` of the layout.
    """
    bn = np.asarray(bn, dtype=np.float64)
    if not np.all(np.isfinite(bn)):
        raise ReplyError("the batch-norm numbers hold NaN or infinity")
    limit = float(np.finfo(bn_dtype).max)
    largest = float(np.max(np.abs(bn))) if bn.size else 0.0
    if largest > limit:
        raise ReplyError(f"a batch-norm number ({largest:.3g}) is outside what the {bn_dtype} downlink holds "
                         f"(|x| <= {limit:.6g})")
    if np.any(bn[np.asarray(is_running_var, dtype=bool)] <= 0):
        raise ReplyError("a batch-norm running variance is zero or negative")


def aggregate_bn(bns: Sequence[np.ndarray], weights: Sequence[float], how: str = DEFAULT_BN_AGGREGATION) -> np.ndarray:
    """The global batch-norm numbers (float32): coordinate-wise ``median`` or weighted ``mean``."""
    if how not in BN_AGGREGATIONS:
        raise ValueError(f"unknown batch-norm aggregation {how!r}")
    stacked = np.stack([np.asarray(b, dtype=np.float64) for b in bns])
    if how == "median":
        return np.median(stacked, axis=0).astype(np.float32)
    w = np.asarray(weights, dtype=np.float64)
    return np.tensordot(w / w.sum(), stacked, axes=1).astype(np.float32)
