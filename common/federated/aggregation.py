"""Aggregating binary weights: the weighted mean of +-1 signs, and what goes back down.

FedAvg on a BNN averages the clients' binarized weights (each +-1), weighted by their
number of training examples. The mean lies in ``[-1, 1]``: its sign is the weighted
majority vote, and its magnitude says how strongly the clients agree. Two ways to
send it back:

``vote``
    the sign of the mean, 1 bit per weight (ties go to +1, as ``sign(0) = +1``).
    Each client restarts from latent weights ``vote * vote_latent_scale``: a small
    magnitude, so that local training can still flip a weight in one epoch.
``mean``
    the mean itself, quantized to int8; the clients restart from ``mean *
    mean_latent_scale``. Weights the clients disagree on start near 0 and flip easily;
    weights they all agree on start at ``+-mean_latent_scale``. At 1 those are hard to
    flip: Adam moves a weight by about ``lr`` per step, and a client with a few samples
    takes a few steps per round, so a weight that every client left unchanged in round 1
    keeps its random initial sign for good (docs/scale.md). It costs 8 bits per weight
    downlink.

The Flower strategy computes the mean with Flower's own FedAvg arithmetic; the
functions here are the reference it is tested against, and the downlink decisions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.errors import HyBNNError

MODES = ("vote", "mean")
DEFAULT_MODE = "vote"
DEFAULT_VOTE_LATENT_SCALE = 0.1
"""Latent magnitude a client gives the voted signs before local training (``vote`` mode)."""
DEFAULT_MEAN_LATENT_SCALE = 0.25
"""What a client multiplies the received mean by before local training (``mean`` mode). Measured in
docs/scale.md: 1,000 clients of about 11 samples, and 3 clients, ended closer to the centralized model
at 0.25 than at 1."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise HyBNNError(f"Unknown aggregation mode {mode!r}; use one of {', '.join(MODES)}.")
    return mode


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_i w_i a_i / sum_i w_i`` in float64; weights must be positive and finite."""
    if len(arrays) == 0 or len(arrays) != len(weights):
        raise ValueError("need one weight per array and at least one array")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive and finite, got {list(weights)}")
    stacked = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])
    return np.tensordot(w / w.sum(), stacked, axes=1)


def sign_mean(signs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted mean of +-1 arrays, in ``[-1, 1]``."""
    for s in signs:
        if not np.all(np.abs(np.asarray(s)) == 1):
            raise ValueError("sign arrays must hold only +1 and -1")
    return np.clip(weighted_mean(signs, weights), -1.0, 1.0)


def vote(mean: np.ndarray) -> np.ndarray:
    """The weighted majority vote: ``+1`` where ``mean >= 0`` (ties go to +1), else ``-1``."""
    return np.where(np.asarray(mean) >= 0, 1.0, -1.0).astype(np.float32)


def client_start_latent(weights: np.ndarray, kind: str, vote_latent_scale: float = DEFAULT_VOTE_LATENT_SCALE,
                        mean_latent_scale: float = DEFAULT_MEAN_LATENT_SCALE) -> np.ndarray:
    """The latent weights a client trains from, given the decoded global weights.

    ``kind`` is the payload kind: ``"signs"`` (a vote, +-1) is scaled by
    ``vote_latent_scale``; ``"latent"`` (a mean in [-1, 1]) by ``mean_latent_scale``.
    Either scale must lie in (0, 1]: the signs, the model's binary weights, stay the same.
    """
    for name, scale in (("vote_latent_scale", vote_latent_scale), ("mean_latent_scale", mean_latent_scale)):
        if not 0 < scale <= 1:
            raise ValueError(f"{name} must lie in (0, 1], got {scale!r}")
    weights = np.asarray(weights, dtype=np.float32)
    if kind == "signs":
        return weights * np.float32(vote_latent_scale)
    return np.clip(weights, -1.0, 1.0) * np.float32(mean_latent_scale)
