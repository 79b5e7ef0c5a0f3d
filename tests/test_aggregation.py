"""Weighted mean of +-1 signs and the vote, without Flower."""

import numpy as np
import pytest

from common.federated import aggregation


def test_weighted_sign_mean_and_vote_by_hand():
    a = np.array([1, 1, -1, -1, 1], dtype=np.float32)
    b = np.array([1, -1, -1, 1, -1], dtype=np.float32)
    c = np.array([-1, -1, -1, 1, -1], dtype=np.float32)
    mean = aggregation.sign_mean([a, b, c], [2, 1, 1])
    # By hand: (2a + b + c) / 4.
    np.testing.assert_allclose(mean, [0.5, 0.0, -1.0, 0.0, 0.0])
    np.testing.assert_array_equal(aggregation.vote(mean), [1, 1, -1, 1, 1])  # ties go to +1


def test_weights_matter():
    a = np.array([1.0, -1.0])
    b = np.array([-1.0, 1.0])
    np.testing.assert_array_equal(aggregation.vote(aggregation.sign_mean([a, b], [1, 3])), [-1, 1])
    np.testing.assert_array_equal(aggregation.vote(aggregation.sign_mean([a, b], [3, 1])), [1, -1])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        aggregation.sign_mean([np.array([1.0, 0.5])], [1])
    with pytest.raises(ValueError):
        aggregation.weighted_mean([np.ones(2)], [0])
    with pytest.raises(ValueError):
        aggregation.weighted_mean([np.ones(2)], [float("nan")])
    with pytest.raises(ValueError):
        aggregation.weighted_mean([], [])


def test_client_start_latent():
    signs = np.array([1.0, -1.0])
    np.testing.assert_allclose(aggregation.client_start_latent(signs, "signs", 0.1), [0.1, -0.1])
    mean = np.array([0.3, -1.0])
    np.testing.assert_allclose(aggregation.client_start_latent(mean, "latent", mean_latent_scale=1.0), mean)
    np.testing.assert_allclose(aggregation.client_start_latent(mean, "latent"),
                               mean * aggregation.DEFAULT_MEAN_LATENT_SCALE)


def test_a_mean_restarts_scaled_and_keeps_its_signs():
    mean = np.array([1.0, -1.0, 0.5, -0.02, 0.0])
    start = aggregation.client_start_latent(mean, "latent", mean_latent_scale=0.25)
    np.testing.assert_allclose(start, [0.25, -0.25, 0.125, -0.005, 0.0])
    np.testing.assert_array_equal(np.sign(start), np.sign(mean))
    # The vote's scale and the mean's are apart: each kind takes its own.
    np.testing.assert_allclose(aggregation.client_start_latent(np.array([1.0, -1.0]), "signs", 0.1, 0.25), [0.1, -0.1])
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mean_latent_scale"):
            aggregation.client_start_latent(mean, "latent", mean_latent_scale=bad)


def test_unknown_mode():
    from common.errors import HyBNNError

    with pytest.raises(HyBNNError, match="vote, mean"):
        aggregation.check_mode("median")
