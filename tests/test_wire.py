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


def test_byte_arrays_travel_raw_and_come_back_exactly():
    import numpy as np
    import pytest
    from flwr.app import Array, ArrayRecord

    from common.federated.codec import CodecError
    from common.federated.wire import RAW_STYPE, payload_to_record, record_nbytes, record_to_payload

    payload = {"bnn": np.arange(300, dtype=np.int64).astype(np.uint8), "latent": np.array([-127, 0, 5], np.int8),
               "bn": np.ones(4, np.float16)}
    record = payload_to_record(payload)
    assert record["bnn"].stype == record["latent"].stype == RAW_STYPE and record["bn"].stype == "numpy.ndarray"
    back = record_to_payload(record)
    for key, value in payload.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value)
    back["bnn"][0] = 7  # a writable copy, not a view of the record
    # numpy's own serialization would add its header
    as_numpy = ArrayRecord({"bnn": Array(payload["bnn"])})
    assert record_nbytes(as_numpy) - record_nbytes(ArrayRecord({"bnn": record["bnn"]})) >= 128
    for bad, message in [(Array(dtype="float32", shape=(4,), stype=RAW_STYPE, data=b"\x00" * 4), "dtype"),
                         (Array(dtype="uint8", shape=(5,), stype=RAW_STYPE, data=b"\x00" * 4), "shape"),
                         (Array(dtype="uint8", shape=(2, 2), stype=RAW_STYPE, data=b"\x00" * 4), "shape")]:
        with pytest.raises(CodecError, match=message):
            record_to_payload(ArrayRecord({"bnn": bad}))
