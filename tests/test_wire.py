"""The message format's names: written once in common.federated.wire, and stable across releases."""

from __future__ import annotations

from dataclasses import fields

from common.federated import robust
from common.federated.wire import METRIC, RECORD, TRAIN_CONFIG


def test_names_are_the_released_ones():
    # A server and clients of different builds only work together while these stay the same.
    assert (RECORD.arrays, RECORD.config, RECORD.metrics) == ("arrays", "config", "metrics")
    assert {f.name: getattr(TRAIN_CONFIG, f.name) for f in fields(TRAIN_CONFIG)} == {
        "task": "task", "server_round": "server-round", "local_epochs": "local-epochs", "lr": "lr",
        "batch_size": "batch-size", "final_lr_fraction": "final-lr-fraction", "encoder_sha256": "encoder-sha256",
        "bn_dtype": "bn-dtype", "uplink_codec": "uplink-codec", "vote_latent_scale": "vote-latent-scale",
        "codec_version": "codec-version"}
    assert {f.name: getattr(METRIC, f.name) for f in fields(METRIC)} == {
        "num_examples": "num-examples", "codec_version": "codec-version", "partition_id": "partition-id",
        "train_loss": "train-loss", "train_acc": "train-acc", "train_seconds": "train-seconds"}


def test_the_server_checks_exactly_the_metrics_a_client_sends():
    assert set(robust.CLIENT_METRICS) == {getattr(METRIC, f.name) for f in fields(METRIC)}
    assert set(robust.AVERAGED_METRICS) <= set(robust.CLIENT_METRICS)


def test_the_server_sends_every_key_the_client_requires():
    from server.server_app import ServerSettings

    sent = set(ServerSettings().train_config("0" * 64).keys())
    # The strategy adds server-round each round; final-lr-fraction is optional (the client's default).
    required = {getattr(TRAIN_CONFIG, f.name) for f in fields(TRAIN_CONFIG)}
    assert required - {TRAIN_CONFIG.server_round, TRAIN_CONFIG.final_lr_fraction} <= sent
