"""Limits of the training loop that the federated settings schema also enforces.

Torch-free, so that :mod:`common.federated.settings` (read by the CLI's ``--help``) refuses
at launch what :mod:`common.bnn.training` would refuse in every client's every round.
"""

from __future__ import annotations

MAX_EPOCHS = 10_000
"""The most epochs one run may ask for (and the most rounds of a federation). The BNN recipe
takes 80, the VAE 20; at a few seconds an epoch, 10,000 is already days of training, and a
larger count is a typo."""

MIN_BATCH_SIZE = 2
"""Batch norm in training mode needs at least two samples per batch."""

MAX_LR = 10.0
"""The largest learning rate one run may ask for. The recipes use 0.001 to 0.06; latent
weights live in [-1, 1], so a larger step only flips signs at random, and a rate beyond
float32's range breaks the optimizer: a larger value is a typo."""

DROPOUT_RESOLUTION = 2**8
"""The input-dropout mask (:func:`common.bnn.training.keep_mask`) draws one random byte per
input: the drop probability is rounded to a multiple of 1/256 (0.2 becomes 51/256 = 0.1992)."""


def dropout_too_fine(drop_probability: float) -> str | None:
    """Why ``drop_probability`` cannot be honoured by the dropout mask, or ``None`` when it can:
    a positive probability that rounds to 0 steps of 1/:data:`DROPOUT_RESOLUTION` drops nothing."""
    if 0 < drop_probability and round(drop_probability * DROPOUT_RESOLUTION) == 0:
        return (f"the dropout mask drops in steps of 1/{DROPOUT_RESOLUTION}, so it would drop nothing. "
                f"Pass 0 (no dropout) or at least {1 / DROPOUT_RESOLUTION:.4f}")
    return None


SEED_LIMIT = 2**32
"""Seeds are whole numbers in ``[0, 2**32)``: what every generator a seed reaches accepts (numpy's
``default_rng`` and the data sets' shuffle refuse a negative one, numpy's legacy seed one of
2**32 or more). The settings schema's ``seed`` (common/federated/settings.py) holds the check."""


def derived_seed(seed: int, offset: int) -> int:
    """A seed made from ``seed`` (a run's, in range) for one part of the run (a task, a client's
    round), within :data:`SEED_LIMIT` again, the same as ``seed + offset`` wherever that fits."""
    return (seed + offset) % SEED_LIMIT
