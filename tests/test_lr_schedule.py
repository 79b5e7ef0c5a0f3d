"""The clients' learning rate over the rounds and within a round, and the clients' input dropout."""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import HyBNNError


def _settings(**changes):
    from server.server_app import ServerSettings

    return ServerSettings(**{"lr": 0.03, "num_server_rounds": 20, **changes})


@pytest.mark.parametrize("schedule", ["cosine", "exponential"])
def test_schedules_fall_from_lr_to_a_hundredth(schedule):
    s = _settings(lr_schedule=schedule)
    rates = [s.lr_for_round(r) for r in range(1, 21)]
    assert rates[0] == pytest.approx(0.03) and rates[-1] == pytest.approx(0.0003)
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_exponential_falls_by_the_same_factor_every_round_and_sooner_than_cosine():
    exp, cos = _settings(lr_schedule="exponential"), _settings(lr_schedule="cosine")
    ratios = {round(exp.lr_for_round(r + 1) / exp.lr_for_round(r), 12) for r in range(1, 20)}
    assert ratios == {round(0.01 ** (1 / 19), 12)}
    assert exp.lr_for_round(10) < cos.lr_for_round(10) / 3


def test_constant_schedule_and_a_single_round_keep_lr():
    assert {_settings(lr_schedule="constant").lr_for_round(r) for r in (1, 10, 20)} == {0.03}
    assert _settings(num_server_rounds=1, lr_schedule="exponential").lr_for_round(1) == 0.03


@pytest.mark.parametrize("schedule", ["cosine", "exponential", "constant"])
def test_within_a_round_the_rate_is_constant_unless_asked_to_decay(schedule):
    s = _settings(lr_schedule=schedule)
    assert {s.lr_end_fraction(r) for r in range(1, 21)} == {1.0}


@pytest.mark.parametrize("schedule", ["cosine", "exponential"])
def test_decay_in_round_ends_each_round_at_the_next_round_s_rate(schedule):
    s = _settings(lr_schedule=schedule, lr_in_round="decay")
    for r in range(1, 20):
        assert s.lr_for_round(r) * s.lr_end_fraction(r) == pytest.approx(s.lr_for_round(r + 1))
    assert 0 < s.lr_end_fraction(20) <= 1 and math.isfinite(s.lr_end_fraction(20))


@pytest.mark.parametrize("schedule", ["cosine", "exponential", "constant"])
def test_anneal_ends_every_round_at_a_hundredth_of_its_rate(schedule):
    s = _settings(lr_schedule=schedule, lr_in_round="anneal")
    assert all(s.lr_end_fraction(r) == pytest.approx(0.01) for r in range(1, 21))


@pytest.mark.usefixtures("flower_task_identity")
def test_the_train_config_carries_the_round_s_rate_and_its_end_fraction():
    from common.federated import codec
    from common.bnn.model import BNN, BNNConfig
    from common.federated.wire import TRAIN_CONFIG, payload_to_record
    from flwr.app import ConfigRecord
    from server.strategy import PackedFedAvg

    s = _settings(lr_schedule="exponential", lr_in_round="decay")
    layout = codec.layout_for(BNNConfig())
    strategy = PackedFedAvg(layout, lr_for_round=s.lr_for_round, lr_end_fraction=s.lr_end_fraction,
                            node_wait_s=0)

    class Grid:
        def get_node_ids(self):
            return [1]

    arrays = payload_to_record(codec.encode_model(BNN(BNNConfig())))
    [message] = list(strategy.configure_train(4, arrays, ConfigRecord(s.train_config("ab" * 32)), Grid()))
    config = message.content.config_records["config"]
    assert config[TRAIN_CONFIG.lr] == pytest.approx(s.lr_for_round(4))
    assert config[TRAIN_CONFIG.final_lr_fraction] == pytest.approx(s.lr_end_fraction(4))


def test_bad_schedule_values_are_refused_with_their_key():
    from server.server_app import ServerSettings

    with pytest.raises(HyBNNError, match="lr-schedule"):
        ServerSettings.from_run_config({"lr-schedule": "linear"})
    with pytest.raises(HyBNNError, match="lr-in-round"):
        ServerSettings.from_run_config({"lr-in-round": "restart"})
    with pytest.raises(HyBNNError, match="input-dropout"):
        ServerSettings.from_run_config({"input-dropout": 1.0})


def test_the_client_trains_with_the_round_s_input_dropout(monkeypatch):
    import client.client_app as client_app
    from common.federated import codec
    from common.bnn.model import BNN, BNNConfig

    seen = []
    real_fit = client_app.fit

    def spy(model, x, y, config, **kwargs):
        seen.append((config.input_dropout, config.final_lr_fraction))
        return real_fit(model, x, y, config, **kwargs)

    monkeypatch.setattr(client_app, "fit", spy)
    x = torch.where(torch.rand(64, 200) > 0.5, 1.0, -1.0)
    y = (x[:, 0] > 0).long()
    payload = codec.encode_model(BNN(BNNConfig(in_bits=200)), bn_encoding="thresholds")
    for dropout, fraction in ((0.0, 1.0), (0.2, 0.5)):
        round_config = client_app.LocalRound(task="4v5", local_epochs=1, lr=0.01, batch_size=32,
                                             input_dropout=dropout, final_lr_fraction=fraction)
        client_app.train_local(payload, x, y, round_config, num_classes=2, seed=0)
    assert seen == [(0.0, 1.0), (0.2, 0.5)]


def test_a_train_config_without_input_dropout_means_none():
    from flwr.app import ConfigRecord

    from client.client_app import LocalRound
    from common.federated import codec
    from common.federated.wire import TRAIN_CONFIG as key

    base = {key.task: "4v5", key.local_epochs: 1, key.lr: 0.01, key.batch_size: 32,
            key.encoder_sha256: "ab" * 32, key.codec_version: codec.CODEC_VERSION}
    assert LocalRound.from_config(ConfigRecord(base)).input_dropout == 0.0
    assert LocalRound.from_config(ConfigRecord({**base, "input-dropout": 0.2})).input_dropout == 0.2
    with pytest.raises(HyBNNError, match="input-dropout"):
        LocalRound.from_config(ConfigRecord({**base, "input-dropout": 1.5}))


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_federate_refuses_a_bad_input_dropout_before_it_starts(bad):
    from simulation.federate import FederateConfig, check_config

    with pytest.raises(HyBNNError, match="--input-dropout"):
        check_config(FederateConfig(input_dropout=bad))
