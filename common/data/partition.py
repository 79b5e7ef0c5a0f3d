"""Which of its local samples a client trains on: flwr-datasets partitioners, offline.

A client knows its ``partition-id`` and the ``num-partitions`` of the federation. It
builds a ``datasets.Dataset`` from the labels it holds (no hub, no download),
shuffles it with a seed every client shares, and asks a flwr-datasets partitioner
for its share. Every client computes the same split, so the partitions
are disjoint without any coordination.

* ``iid``: :class:`~flwr_datasets.partitioner.IidPartitioner` on the shuffled samples,
  equal-sized contiguous shards.
* ``dirichlet``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` by label
  with concentration ``alpha`` (small alpha, skewed label mixes).
"""

from __future__ import annotations

import logging

import numpy as np

from common.errors import HyBNNError

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet")


def partition_indices(
    labels: np.ndarray,
    partition_id: int,
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
) -> np.ndarray:
    """Indices into ``labels`` of partition ``partition_id`` (sorted, int64)."""
    if num_partitions < 1:
        raise HyBNNError(f"num-partitions must be at least 1, got {num_partitions}.")
    if not 0 <= partition_id < num_partitions:
        raise HyBNNError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1}; give each client "
            f"a distinct partition-id below num-partitions={num_partitions} in its node config."
        )
    return all_partitions(labels, num_partitions, scheme, alpha, seed, min_partition_size)[partition_id]


def all_partitions(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """The indices (sorted, int64) of every partition, computed in one pass: what a process that
    serves many clients (a simulation's worker) keeps, instead of splitting the data once per client.

    A Dirichlet split asks every partition for at least ``min(min_partition_size, samples //
    partitions)`` samples. When that cannot be met (many partitions of a small task: flwr-datasets
    gives up after ten draws), the split is drawn again without the minimum, with a warning: some
    partitions may then be smaller than a batch, or empty (their clients refuse the round)."""
    import warnings

    from datasets import Dataset, disable_progress_bars
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_partitions < 1:
        raise HyBNNError(f"num-partitions must be at least 1, got {num_partitions}.")
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) < num_partitions:
        raise HyBNNError(f"{len(labels)} samples cannot be split into {num_partitions} partitions.")
    disable_progress_bars()
    # numpy format: a partition's indices come out as one array, not row by row.
    dataset = Dataset.from_dict({"label": labels, "index": np.arange(len(labels), dtype=np.int64)}).with_format("numpy")

    def split(partitioner) -> list[np.ndarray]:
        partitioner.dataset = dataset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # flwr-datasets warns on every redraw
            return [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
                    for i in range(num_partitions)]

    if scheme == "iid":
        dataset = dataset.shuffle(seed=seed)
        return split(IidPartitioner(num_partitions=num_partitions))
    if scheme != "dirichlet":
        raise HyBNNError(f"Unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}.")
    if not alpha > 0:
        raise HyBNNError(f"The Dirichlet alpha must be positive, got {alpha}.")

    def dirichlet(minimum: int) -> DirichletPartitioner:
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=float(alpha),
                                    min_partition_size=minimum, self_balancing=False, shuffle=True, seed=seed)

    minimum = min(min_partition_size, len(labels) // num_partitions)
    try:
        return split(dirichlet(minimum))
    except ValueError as exc:
        if minimum == 0:
            raise HyBNNError(
                f"The {scheme} partitioner could not split {len(labels)} samples into {num_partitions} "
                f"partitions ({exc}). Use fewer partitions or a larger alpha."
            ) from exc
    log.warning("Dirichlet(%g) could not give each of %d partitions %d of the %d samples; drawing the split "
                "without a minimum: some partitions may be smaller than a batch or empty.",
                alpha, num_partitions, minimum, len(labels))
    return split(dirichlet(0))
