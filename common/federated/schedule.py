"""The clients' learning rate over the rounds of a federated run (the ``lr-schedule`` setting).

Plain functions, no Flower import: the ServerApp sends each round's rate, and the
benchmarks print the same numbers.
"""

from __future__ import annotations

import math

LR_FINAL_FRACTION = 0.01
"""The last round's rate as a fraction of ``lr`` (cosine and exponential schedules)."""


def lr_for_round(lr: float, schedule: str, server_round: int, rounds: int) -> float:
    """The clients' learning rate in round ``server_round`` (1-based) of ``rounds``.

    ``constant``: ``lr``; ``exponential``: from ``lr`` to ``lr * LR_FINAL_FRACTION`` by the
    same factor every round; ``cosine``: the same ends along a half cosine.
    """
    if schedule == "constant" or rounds == 1:
        return lr
    progress = min(1.0, (server_round - 1) / (rounds - 1))
    if schedule == "exponential":
        return lr * LR_FINAL_FRACTION ** progress
    return lr * (LR_FINAL_FRACTION + (1 - LR_FINAL_FRACTION) * (1 + math.cos(math.pi * progress)) / 2)
