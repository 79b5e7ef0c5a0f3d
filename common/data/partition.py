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

import numpy as np

from common.errors import HyBNNError

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
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_partitions < 1:
        raise HyBNNError(f"num-partitions must be at least 1, got {num_partitions}.")
    if not 0 <= partition_id < num_partitions:
        raise HyBNNError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1}; give each client "
            f"a distinct partition-id below num-partitions={num_partitions} in its node config."
        )
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) < num_partitions:
        raise HyBNNError(f"{len(labels)} samples cannot be split into {num_partitions} partitions.")
    dataset = Dataset.from_dict({"label": labels, "index": np.arange(len(labels), dtype=np.int64)})
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        dataset = dataset.shuffle(seed=seed)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise HyBNNError(f"The Dirichlet alpha must be positive, got {alpha}.")
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min(min_partition_size, len(labels) // num_partitions),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        raise HyBNNError(f"Unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}.")
    partitioner.dataset = dataset
    try:
        part = partitioner.load_partition(partition_id)
    except ValueError as exc:
        raise HyBNNError(
            f"The {scheme} partitioner could not split {len(labels)} samples into {num_partitions} "
            f"partitions ({exc}). Use fewer partitions or a larger alpha."
        ) from exc
    return np.sort(np.asarray(part["index"], dtype=np.int64))
