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


def lr_end_fraction(schedule: str, in_round: str, server_round: int, rounds: int) -> float:
    """Where the learning rate ends within round ``server_round``, as a fraction of its start.

    ``in_round = "constant"``: 1. ``"decay"``: the next round's rate (after the last round an
    exponential schedule goes on by its factor, the others stay). ``"anneal"``: a hundredth,
    every round (the schedule over the rounds sets where each round starts).
    """
    if in_round == "anneal":
        return LR_FINAL_FRACTION
    if in_round == "constant" or schedule == "constant" or rounds == 1:
        return 1.0
    if schedule == "exponential":
        return LR_FINAL_FRACTION ** (1 / (rounds - 1))
    return lr_for_round(1.0, schedule, server_round + 1, rounds) / lr_for_round(1.0, schedule, server_round, rounds)
