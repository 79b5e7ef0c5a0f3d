"""PackedFedAvg: aggregation against a hand-computed vote, and bad replies left out."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from common.federated import codec
from common.bnn.model import BNNConfig
from common.federated.wire import METRIC, RECORD, payload_to_record, record_nbytes, record_to_payload
from server.strategy import PackedFedAvg

CONFIG = BNNConfig(in_bits=8, hidden=(2,), num_classes=2)  # 16 + 4 = 20 binary weights
LAYOUT = codec.layout_for(CONFIG)


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def reply(node_id: int, signs: np.ndarray, bn: np.ndarray, n: int, **overrides) -> Message:
    ins = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    arrays = overrides.pop("arrays", payload_to_record(codec.encode_signs(signs, bn)))
    metrics = {METRIC.num_examples: n, METRIC.train_loss: 0.5, METRIC.train_acc: 0.9,
               METRIC.codec_version: codec.CODEC_VERSION, METRIC.partition_id: node_id}
    metrics.update(overrides.pop("metrics", {}))
    content = RecordDict({RECORD.arrays: arrays, RECORD.metrics: MetricRecord(metrics)})
    return Message(content=content, reply_to=ins)


def signs_of(*values: int) -> np.ndarray:
    out = np.ones(LAYOUT.n_binary, dtype=np.float32)
    out[: len(values)] = values
    return out


def decode_global(record: ArrayRecord) -> tuple[np.ndarray, np.ndarray]:
    return codec.decode(record_to_payload(record), LAYOUT)


def test_vote_matches_hand_computation():
    bn = [np.full(LAYOUT.n_bn, v, dtype=np.float32) for v in (1.0, 2.0, 4.0)]
    replies = [
        reply(1, signs_of(+1, +1, -1, -1, +1), bn[0], 200),
        reply(2, signs_of(+1, -1, -1, +1, -1), bn[1], 100),
        reply(3, signs_of(-1, -1, -1, +1, -1), bn[2], 100),
    ]
    # FedAvg's weighting as it is: no weight cap, batch norm by the weighted mean.
    strategy = PackedFedAvg(LAYOUT, bn_encoding="floats", mode="vote", max_weight_vs_median=0, bn_aggregation="mean")
    arrays, metrics = strategy.aggregate_train(1, replies)
    weights, global_bn = decode_global(arrays)
    # By hand: mean = (2a + b + c) / 4 = [0.5, 0, -1, 0, 0] -> vote [+1, +1, -1, +1, +1] (ties +1).
    np.testing.assert_array_equal(weights[:5], [1, 1, -1, 1, 1])
    assert np.all(weights[5:] == 1)
    # Batch norm: the num-examples-weighted mean (2*1 + 2 + 4) / 4 = 2.
    np.testing.assert_allclose(global_bn, 2.0)
    assert metrics[METRIC.train_acc] == pytest.approx(0.9)
    assert METRIC.partition_id not in metrics and METRIC.codec_version not in metrics
    assert set(record_to_payload(arrays)) == {"bnn"}


def test_mean_mode_sends_quantized_mean():
    bn = np.ones(LAYOUT.n_bn, dtype=np.float32)
    replies = [reply(1, signs_of(+1, +1), bn, 300), reply(2, signs_of(-1, +1), bn, 100)]
    arrays, _ = PackedFedAvg(LAYOUT, bn_encoding="floats", mode="mean", max_weight_vs_median=0).aggregate_train(1, replies)
    payload = record_to_payload(arrays)
    assert set(payload) == {"latent", "bn"}
    weights, _ = codec.decode(payload, LAYOUT)
    np.testing.assert_allclose(weights[:2], [0.5, 1.0], atol=1 / 254)


def test_bad_replies_are_left_out_and_the_round_goes_on():
    bn = np.ones(LAYOUT.n_bn, dtype=np.float32)
    good = reply(1, signs_of(-1, -1), bn, 100)
    nan_blob = codec.encode_signs(signs_of(1), bn)["bnn"].copy()
    nan_blob[LAYOUT.n_bits_bytes:].view("<f2")[0] = np.nan
    ins = Message(content=RecordDict(), dst_node_id=9, message_type="train")
    bad = [
        reply(2, signs_of(1), bn, 100, arrays=ArrayRecord({"bnn": Array(nan_blob)})),            # NaN
        reply(3, signs_of(1), bn, 100, arrays=ArrayRecord({"bnn": Array(np.zeros(5, np.uint8))})),  # size
        reply(4, signs_of(1), bn, 100, arrays=ArrayRecord({"w": Array(np.zeros(3, np.float32))})),  # keys
        reply(5, signs_of(1), bn, 0),                                                             # weight
        reply(6, signs_of(1), bn, 100, metrics={METRIC.num_examples: float("nan")}),
        reply(7, signs_of(1), bn, 100, metrics={METRIC.codec_version: 99}),
        reply(8, signs_of(1), bn, 100, metrics={METRIC.train_loss: float("inf")}),
        Message(error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node gone"), reply_to=ins),
    ]
    raw = Message(content=RecordDict({RECORD.arrays: ArrayRecord({"bnn": Array(dtype="uint8", shape=(4,), stype="raw",
                                                                           data=b"\x00" * 4)}),
                                      RECORD.metrics: MetricRecord({METRIC.num_examples: 5, METRIC.codec_version: 1})}),
                  reply_to=Message(content=RecordDict(), dst_node_id=10, message_type="train"))
    extra = reply(11, signs_of(1), bn, 100)
    extra.content[RECORD.config] = ConfigRecord({"images": b"leak"})
    strategy = PackedFedAvg(LAYOUT, bn_encoding="floats", mode="vote")
    arrays, _ = strategy.aggregate_train(1, [*bad, raw, extra, good])
    weights, _ = decode_global(arrays)
    # Only node 1 counted: its -1s win.
    np.testing.assert_array_equal(weights[:2], [-1, -1])
    log = strategy.rounds[1]
    assert [c["node_id"] for c in log.clients] == [1]
    assert sorted(d["node_id"] for d in log.dropped) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


def test_no_good_reply_keeps_the_global_model():
    bn = np.ones(LAYOUT.n_bn, dtype=np.float32)
    strategy = PackedFedAvg(LAYOUT, bn_encoding="floats")
    assert strategy.aggregate_train(1, [reply(1, signs_of(1), bn, 0)]) == (None, None)


def test_uplink_is_measured_per_client():
    bn = np.ones(LAYOUT.n_bn, dtype=np.float32)
    r = reply(1, signs_of(1), bn, 10)
    strategy = PackedFedAvg(LAYOUT, bn_encoding="floats")
    strategy.aggregate_train(1, [r])
    entry = strategy.rounds[1].clients[0]
    assert entry["uplink_bytes"] == record_nbytes(r.content[RECORD.arrays])
    assert entry["reply_bytes"] == record_nbytes(r.content) > entry["uplink_bytes"]
