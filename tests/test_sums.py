"""The summable aggregation (common/federated/sums.py): integer sums give the weighted-mean rules."""

import numpy as np
import pytest

from common.bnn.model import BNNConfig
from common.federated import codec, sums, thresholds

CONFIG = BNNConfig.for_task(200, 2)
LAYOUT = codec.layout_for(CONFIG)
SUM_LAYOUT = sums.SumLayout(LAYOUT.n_binary, LAYOUT.shape)


def _client(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    shape = LAYOUT.shape
    u = rng.integers(0, shape.hidden_inputs[0] + 2, shape.total_units)
    flip = rng.random(shape.total_units) < 0.3
    output = np.concatenate([rng.normal(0, 2, 2), rng.normal(0, 1, 2), rng.normal(0, 30, 2), rng.uniform(1, 900, 2)])
    output = output.astype(np.float16).astype(np.float32)  # what a float16 downlink carries
    bn = thresholds.canonical(thresholds.Thresholds(u, flip), output, shape)
    return np.where(rng.random(LAYOUT.n_binary) < 0.5, 1.0, -1.0).astype(np.float32), bn


def test_sums_give_the_weighted_mean_rules() -> None:
    rng = np.random.default_rng(0)
    clients = [_client(rng) for _ in range(5)]
    weights = sums.quantized_weights([900, 1000, 1000, 1250, 400], weight_bits=4)
    assert weights == [11, 12, 12, 15, 5]
    total = sum(weights)
    widths = sums.widths(SUM_LAYOUT, total)
    vectors = [sums.client_vector(w, bn, q, SUM_LAYOUT) for (w, bn), q in zip(clients, weights)]
    mean, bn = sums.global_model(sums.plain_sum(vectors, widths), total, SUM_LAYOUT)
    expected_mean = np.tensordot(np.asarray(weights, float) / total, np.stack([w for w, _ in clients]), axes=1)
    np.testing.assert_allclose(mean, expected_mean, atol=1e-12)
    expected_bn = thresholds.aggregate([b for _, b in clients], weights, LAYOUT.shape, how="mean")
    got, want = thresholds.fold(bn, LAYOUT.shape), thresholds.fold(expected_bn, LAYOUT.shape)
    assert np.array_equal(got.u, want.u) and np.array_equal(got.flip, want.flip)
    np.testing.assert_allclose(thresholds.output_numbers(bn, LAYOUT.shape),
                               thresholds.output_numbers(expected_bn, LAYOUT.shape), rtol=1e-3, atol=2**-11)


def test_widths_cannot_overflow() -> None:
    # every client at its largest elements: the sums still fit their widths
    total = 100 * 15
    widths = sums.widths(SUM_LAYOUT, total)
    assert widths[0] == (1500).bit_length() == 11
    top = [np.full(n, b * 15, dtype=np.uint64) for n, b in zip(SUM_LAYOUT.lengths, SUM_LAYOUT.element_bounds())]
    s = sums.plain_sum([top] * 100, widths)
    assert all(int(x.max()) == 100 * int(t.max()) for x, t in zip(s, top))


def test_bad_vectors_and_sums_are_refused() -> None:
    rng = np.random.default_rng(1)
    w, bn = _client(rng)
    with pytest.raises(sums.SumError, match="signs"):
        sums.client_vector(np.zeros_like(w), bn, 3, SUM_LAYOUT)
    with pytest.raises(sums.SumError, match="at least 1"):
        sums.client_vector(w, bn, 0, SUM_LAYOUT)
    bad = bn.copy()
    bad[-1] = np.inf
    with pytest.raises(sums.SumError, match="finite"):
        sums.client_vector(w, bad, 3, SUM_LAYOUT)
    vector = sums.client_vector(w, bn, 3, SUM_LAYOUT)
    vector[0][0] = 4  # beyond a weight-3 client's vote
    with pytest.raises(sums.SumError, match="out of range"):
        sums.global_model(vector, 3, SUM_LAYOUT)
    with pytest.raises(sums.SumError, match="1..16"):
        sums.quantized_weights([3], 0)


def test_groups_cover_the_round_once_in_groups_of_at_least_the_size():
    for n, size in [(7, 3), (9, 3), (10, 3), (100, 3), (5, 3), (6, 3)]:
        found = sums.groups(n, size, seed=1, server_round=4)
        assert sorted(i for g in found for i in g) == list(range(n))
        assert all(len(g) >= size for g in found) and len(found) == max(1, n // size)
        assert found == sums.groups(n, size, seed=1, server_round=4)  # drawn from (seed, round)
    assert sums.groups(9, 3, seed=1, server_round=4) != sums.groups(9, 3, seed=1, server_round=5)
    assert sums.groups(4, 0, 0, 1) == [[0, 1, 2, 3]]


def test_a_hostile_group_moves_neither_the_vote_nor_the_thresholds_of_the_majority_of_groups():
    rng = np.random.default_rng(0)
    signs, bn = _client(rng)
    _, other_bn = _client(rng)
    widths = sums.widths(SUM_LAYOUT, 3 * 15)
    honest = sums.plain_sum([sums.client_vector(signs, bn, 15, SUM_LAYOUT)] * 3, widths)
    hostile = sums.plain_sum([sums.client_vector(-signs, other_bn, 15, SUM_LAYOUT)] * 3, widths)
    mean, got_bn = sums.group_model([honest, hostile, honest], [45, 45, 45], SUM_LAYOUT)
    np.testing.assert_array_equal(np.where(mean >= 0, 1.0, -1.0), signs)
    want = thresholds.fold(sums.global_model(honest, 45, SUM_LAYOUT)[1], LAYOUT.shape)
    got = thresholds.fold(got_bn, LAYOUT.shape)
    assert np.array_equal(got.u, want.u) and np.array_equal(got.flip, want.flip)
    # the mean of the hostile group's model alone follows the hostile signs
    assert np.all(np.sign(sums.global_model(hostile, 45, SUM_LAYOUT)[0]) == -signs)
    # one group alone: its own model
    np.testing.assert_array_equal(sums.group_model([honest], [45], SUM_LAYOUT)[0],
                                  sums.global_model(honest, 45, SUM_LAYOUT)[0])
