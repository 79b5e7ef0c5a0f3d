"""flwr-datasets partitions of local labels: disjoint, complete, deterministic."""

import numpy as np
import pytest

from common.errors import HyBNNError
from common.data.partition import partition_indices

LABELS = np.random.default_rng(0).integers(0, 2, 3000)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_complete(scheme):
    parts = [partition_indices(LABELS, i, 3, scheme, alpha=0.5, seed=1) for i in range(3)]
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) == len(np.unique(joined))
    again = [partition_indices(LABELS, i, 3, scheme, alpha=0.5, seed=1) for i in range(3)]
    for a, b in zip(parts, again):
        np.testing.assert_array_equal(a, b)


def test_iid_is_balanced():
    parts = [partition_indices(LABELS, i, 3) for i in range(3)]
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    for p in parts:
        assert abs(LABELS[p].mean() - LABELS.mean()) < 0.05


def test_dirichlet_skews_labels():
    parts = [partition_indices(LABELS, i, 3, "dirichlet", alpha=0.1, seed=0) for i in range(3)]
    shares = [LABELS[p].mean() for p in parts]
    assert max(shares) - min(shares) > 0.2


def test_bad_arguments():
    with pytest.raises(HyBNNError, match="partition-id"):
        partition_indices(LABELS, 3, 3)
    with pytest.raises(HyBNNError, match="scheme"):
        partition_indices(LABELS, 0, 3, "zipf")
    with pytest.raises(HyBNNError, match="alpha"):
        partition_indices(LABELS, 0, 3, "dirichlet", alpha=0)
