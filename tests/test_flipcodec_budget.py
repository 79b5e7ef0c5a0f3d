"""The flip budget: a client keeps only its strongest flips (common.federated.flipcodec)."""

import numpy as np
import pytest
import torch

from common.bnn.model import BNN, BNNConfig
from common.federated import codec
from common.federated import flipcodec as fc


def _signs(x: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(x) >= 0, 1.0, -1.0).astype(np.float32)


def test_keeps_the_flips_farthest_past_zero():
    reference = np.array([0.1, 0.1, -0.1, -0.1, 0.1, -0.1], dtype=np.float32)
    latent = np.array([-0.5, -0.02, 0.3, 0.01, 0.4, -0.7], dtype=np.float32)  # flips at 0, 1, 2, 3
    kept = fc.keep_strongest_flips(reference, latent, 2)
    np.testing.assert_array_equal(fc.flip_positions(reference, kept), [0, 2])
    # The weights put back keep their magnitude on the reference's side; the others are untouched.
    np.testing.assert_array_equal(kept, np.array([-0.5, 0.02, 0.3, -0.01, 0.4, -0.7], dtype=np.float32))
    np.testing.assert_array_equal(latent, np.array([-0.5, -0.02, 0.3, 0.01, 0.4, -0.7], dtype=np.float32))


def test_a_budget_above_the_flips_changes_nothing():
    rng = np.random.default_rng(0)
    reference, latent = rng.standard_normal(1000), rng.standard_normal(1000).astype(np.float32)
    n_flips = fc.flip_positions(reference, latent).size
    for budget in (n_flips, n_flips + 1, 10_000):
        np.testing.assert_array_equal(fc.keep_strongest_flips(reference, latent, budget), latent)
    assert fc.flip_positions(reference, fc.keep_strongest_flips(reference, latent, 0)).size == 0


def test_a_zero_latent_against_a_negative_reference_goes_back_to_minus():
    # sign(0) = +1: a latent of exactly 0 under a negative reference is a flip; put back, it must read -1.
    reference = np.array([-1.0, -1.0, 1.0], dtype=np.float32)
    latent = np.array([0.0, 0.2, 0.5], dtype=np.float32)
    kept = fc.keep_strongest_flips(reference, latent, 1)
    np.testing.assert_array_equal(_signs(kept), [-1, 1, 1])
    assert fc.flip_positions(reference, kept).tolist() == [1]


def test_ties_go_to_the_lower_position():
    reference = np.ones(6, dtype=np.float32)
    latent = np.array([0.3, -0.2, -0.2, 0.3, -0.2, -0.2], dtype=np.float32)
    np.testing.assert_array_equal(fc.flip_positions(reference, fc.keep_strongest_flips(reference, latent, 2)), [1, 2])


def test_the_budget_bounds_the_payload():
    layout = codec.layout_for(BNNConfig())
    rng = np.random.default_rng(1)
    reference = rng.standard_normal(layout.n_binary).astype(np.float32)
    latent = np.where(rng.random(layout.n_binary) < 0.25, -reference, reference).astype(np.float32)  # ~25% flips
    bn = np.abs(rng.standard_normal(layout.n_bn)).astype(np.float32)
    kept = fc.keep_strongest_flips(reference, latent, fc.flip_budget_count(0.05, layout.n_binary))
    payload = fc.encode_flips(reference, kept, bn)
    weights, _ = fc.decode_flips(payload, layout, reference)
    np.testing.assert_array_equal(weights, _signs(kept))
    assert fc.parse(payload, layout, reference)[2]["flips"] == int(0.05 * layout.n_binary)
    # 5% of the weights: entropy H(0.05) = 0.286 bits per weight; Rice stays close to it.
    assert fc.sign_bits_per_weight(payload, layout) < 0.31
    assert fc.sign_bits_per_weight(fc.encode_flips(reference, latent, bn), layout) > 0.75


@pytest.mark.parametrize("budget", [-0.01, 1.01, float("nan"), float("inf"), True, "0.05", None])
def test_a_bad_budget_is_refused(budget):
    with pytest.raises(fc.FlipCodecError, match="flip budget"):
        fc.flip_budget_count(budget, 100)


@pytest.mark.parametrize("max_flips", [-1, 2.5, True, None])
def test_a_bad_flip_count_is_refused(max_flips):
    with pytest.raises(fc.FlipCodecError, match="whole number"):
        fc.keep_strongest_flips(np.ones(4), np.ones(4), max_flips)


def test_a_reference_of_another_size_is_refused():
    with pytest.raises(fc.FlipCodecError, match="binary weights"):
        fc.keep_strongest_flips(np.ones(5), np.ones(4), 1)


def test_budget_counts():
    assert fc.flip_budget_count(0.0, 25_856) == 0
    assert fc.flip_budget_count(0.05, 25_856) == 1292
    assert fc.flip_budget_count(1.0, 25_856) == 25_856


def test_a_model_keeps_its_strongest_flips_and_its_batch_norm():
    torch.manual_seed(0)
    model = BNN(BNNConfig())
    layout = codec.layout_for(model.config)
    rng = np.random.default_rng(2)
    reference = rng.standard_normal(layout.n_binary).astype(np.float32)
    latent, bn = codec.binary_latents(model), codec.bn_vector(model, layout)
    n_flips = fc.flip_positions(reference, latent).size
    assert n_flips > 1000  # a random model against a random reference: about half its signs differ
    dropped = fc.limit_model_flips(model, reference, 0.01)
    budget = fc.flip_budget_count(0.01, layout.n_binary)
    assert dropped == n_flips - budget
    after = codec.binary_latents(model)
    np.testing.assert_array_equal(after, fc.keep_strongest_flips(reference, latent, budget))
    np.testing.assert_array_equal(codec.bn_vector(model, layout), bn)
    # What is sent is exactly the kept flips.
    weights, _ = fc.decode_flips(fc.encode_model_flips(model, reference), layout, reference)
    np.testing.assert_array_equal(weights, _signs(after))
    assert fc.limit_model_flips(model, reference, 1.0) == 0


def test_the_client_keeps_its_strongest_flips_from_round_2_on():
    from flwr.app import ConfigRecord

    from client.client_app import LocalRound, train_local
    from common.federated.wire import METRIC, TRAIN_CONFIG

    layout = codec.layout_for(BNNConfig())
    torch.manual_seed(0)
    downlink = codec.encode_model(BNN(BNNConfig()), bn_encoding="thresholds")
    received, received_bn = codec.decode(downlink, layout)
    x = torch.where(torch.rand(256, 200) < 0.5, -1.0, 1.0)
    y = (x[:, :3].sum(dim=1) > 0).long()
    key = TRAIN_CONFIG
    base = {key.task: "4v5", key.local_epochs: 2, key.lr: 0.05, key.batch_size: 32, key.encoder_sha256: "x",
            key.codec_version: codec.CODEC_VERSION, key.uplink_codec: "flips", key.server_round: 2}

    def train(**config):
        payload, metrics = train_local(downlink, x, y, LocalRound.from_config(ConfigRecord({**base, **config})), 2,
                                       seed=0)
        return fc.parse(payload, layout, received)[2]["flips"], metrics, payload

    all_flips, all_metrics, lossless = train(**{"flip-budget": 1.0})
    budget = fc.flip_budget_count(0.01, layout.n_binary)
    assert all_flips > 2 * budget and all_metrics[METRIC.flips_dropped] == 0
    kept, metrics, payload = train(**{"flip-budget": 0.01})
    assert kept == budget and metrics[METRIC.flips_dropped] == all_flips - budget
    # The kept flips are a subset of the lossless ones, and the payload decodes like any other.
    lossless_signs = fc.decode_flips(lossless, layout, received, received_bn)[0]
    signs = fc.decode_flips(payload, layout, received, received_bn)[0]
    changed = np.flatnonzero(signs != _signs(received))
    assert changed.size == budget and np.all(signs[changed] == lossless_signs[changed])
    # Round 1 starts from the random initial model: the budget does not apply.
    first, metrics, _ = train(**{"flip-budget": 0.01, key.server_round: 1})
    assert first == all_flips and METRIC.flips_dropped not in metrics
    # The server refuses a budget outside [0, 1] in the train config, with the key's name.
    from common.errors import HyBNNError

    for bad in (-0.5, 1.5, "lots"):
        with pytest.raises(HyBNNError, match="flip-budget"):
            LocalRound.from_config(ConfigRecord({**base, "flip-budget": bad}))


@pytest.mark.parametrize("bad", [-1, 2.5, float("nan"), True, [3]])
def test_a_hostile_flips_dropped_metric_drops_the_reply(bad):
    from common.federated import robust
    from common.federated.wire import METRIC

    good = {METRIC.num_examples: 10, METRIC.codec_version: codec.CODEC_VERSION}
    assert robust.check_client_metrics({**good, METRIC.flips_dropped: 7})[0][METRIC.flips_dropped] == 7
    with pytest.raises(robust.ReplyError, match="flips-dropped"):
        robust.check_client_metrics({**good, METRIC.flips_dropped: bad})
