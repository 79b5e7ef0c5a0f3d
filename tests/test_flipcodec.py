"""The sign-flip uplink: round trips, sizes, and refusal of malformed payloads."""

import struct
import zlib

import numpy as np
import pytest
import torch

from common.federated import codec
from common.federated import flipcodec as fc
from common.bnn.model import BNN, BNNConfig


@pytest.fixture()
def layout() -> codec.Layout:
    return codec.layout_for(BNNConfig())


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _flipped(reference: np.ndarray, positions: np.ndarray) -> np.ndarray:
    new = np.where(reference >= 0, 0.3, -0.3).astype(np.float32)
    new[positions] *= -1
    return new


def _bn(layout: codec.Layout, rng: np.random.Generator) -> np.ndarray:
    return np.abs(rng.standard_normal(layout.n_bn)).astype(np.float32)


def _signs(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, 1.0, -1.0).astype(np.float32)


@pytest.mark.parametrize("rate", [0.0, 0.0005, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0])
def test_round_trip_random_flips(layout, rng, rate):
    reference = rng.standard_normal(layout.n_binary).astype(np.float32)
    positions = np.flatnonzero(rng.random(layout.n_binary) < rate)
    new = _flipped(reference, positions)
    bn = _bn(layout, rng)
    payload = fc.encode_flips(reference, new, bn)
    assert list(payload) == [fc.FLIPS_KEY] and payload[fc.FLIPS_KEY].dtype == np.uint8
    weights, bn_out = fc.decode_flips(payload, layout, reference)
    np.testing.assert_array_equal(weights, _signs(new))
    np.testing.assert_array_equal(bn_out, bn.astype(np.float16).astype(np.float32))
    _, _, info = fc.parse(payload, layout, reference)
    assert info["flips"] == positions.size
    # Never more than the sign codec plus the header, whatever the flips look like.
    assert info["sign_bytes"] <= layout.n_bits_bytes + fc.HEADER_BYTES


def test_sparse_flips_cost_far_below_one_bit(layout, rng):
    reference = rng.standard_normal(layout.n_binary)
    positions = np.sort(rng.choice(layout.n_binary, size=layout.n_binary // 100, replace=False))
    payload = fc.encode_flips(reference, _flipped(reference, positions), _bn(layout, rng))
    _, _, info = fc.parse(payload, layout, reference)
    assert info["method"] == "rice"
    # 1% random flips: entropy 0.081 bits per weight; Rice coding stays within 15% of it.
    assert fc.sign_bits_per_weight(payload, layout) < 0.081 * 1.15


def test_zero_and_all_flips_are_tiny(layout, rng):
    reference = rng.standard_normal(layout.n_binary)
    bn = _bn(layout, rng)
    none = fc.encode_flips(reference, reference, bn)
    every = fc.encode_flips(reference, -reference - (reference == 0), bn)
    for payload, count in ((none, 0), (every, layout.n_binary)):
        _, _, info = fc.parse(payload, layout, reference)
        assert info["flips"] == count
        assert info["sign_bytes"] < 64
    np.testing.assert_array_equal(fc.decode_flips(none, layout, reference)[0], _signs(reference))
    np.testing.assert_array_equal(fc.decode_flips(every, layout, reference)[0], -_signs(reference))


def test_clustered_flips_use_a_compressed_bitmap_or_rice(layout, rng):
    reference = rng.standard_normal(layout.n_binary)
    positions = np.arange(1000, 9000)  # one block of flips: a few hidden units flipped
    payload = fc.encode_flips(reference, _flipped(reference, positions), _bn(layout, rng))
    _, _, info = fc.parse(payload, layout, reference)
    assert info["sign_bytes"] < 100
    np.testing.assert_array_equal(fc.decode_flips(payload, layout, reference)[0],
                                  _signs(_flipped(reference, positions)))


def test_sign_of_zero_is_plus_one_in_the_reference(layout, rng):
    reference = np.zeros(layout.n_binary, dtype=np.float32)
    new = np.full(layout.n_binary, 0.5, dtype=np.float32)
    new[7] = -0.5
    payload = fc.encode_flips(reference, new, _bn(layout, rng))
    _, _, info = fc.parse(payload, layout, reference)
    assert info["flips"] == 1


def test_model_round_trip_against_a_vote_and_a_mean_downlink(layout, rng):
    torch.manual_seed(0)
    model = BNN(BNNConfig())
    bn = codec.bn_vector(model, layout)
    for downlink in (codec.encode_signs(rng.standard_normal(layout.n_binary), bn),
                     codec.encode_latent(rng.uniform(-1, 1, layout.n_binary), bn)):
        received, _ = codec.decode(downlink, layout)
        payload = fc.encode_model_flips(model, received)
        weights, _ = fc.decode_flips(payload, layout, received)
        np.testing.assert_array_equal(weights, _signs(codec.binary_latents(model)))
        # The same model through the full codec decodes to the same signs.
        np.testing.assert_array_equal(weights, codec.decode(codec.encode_model(model), layout)[0])


def test_float32_batch_norm_travels_too(layout, rng):
    reference = rng.standard_normal(layout.n_binary)
    bn = rng.standard_normal(layout.n_bn).astype(np.float32) ** 2
    payload = fc.encode_flips(reference, reference, bn, bn_dtype="float32")
    np.testing.assert_array_equal(fc.decode_flips(payload, layout, reference)[1], bn)


# ------------------------------------------------------------------ malformed payloads
@pytest.fixture()
def case(layout, rng):
    reference = rng.standard_normal(layout.n_binary).astype(np.float32)
    positions = np.sort(rng.choice(layout.n_binary, size=200, replace=False))
    payload = fc.encode_flips(reference, _flipped(reference, positions), _bn(layout, rng))
    return reference, payload[fc.FLIPS_KEY]


def _refused(blob: np.ndarray, layout, reference, match: str) -> None:
    with pytest.raises(fc.FlipCodecError, match=match):
        fc.decode_flips({fc.FLIPS_KEY: np.asarray(blob, dtype=np.uint8)}, layout, reference)


def _with_header(blob: np.ndarray, **fields) -> np.ndarray:
    names = ("version", "method", "digest", "n_binary", "n_flips", "body_len")
    values = dict(zip(names, struct.unpack_from("<BB8sIII", blob.tobytes())))
    values.update(fields)
    header = struct.pack("<BB8sIII", *(values[n] for n in names))
    return np.frombuffer(header + blob.tobytes()[fc.HEADER_BYTES:], dtype=np.uint8)


def test_wrong_version_is_refused(layout, case):
    reference, blob = case
    _refused(_with_header(blob, version=2), layout, reference, "flip format version 2 is not supported")


def test_wrong_reference_is_refused(layout, case):
    reference, blob = case
    other = reference.copy()
    other[123] = -other[123]
    _refused(blob, layout, other, "different reference model")


def test_truncated_payloads_are_refused(layout, case):
    reference, blob = case
    _refused(blob[:10], layout, reference, "header")
    _refused(blob[:-1], layout, reference, "truncated")
    _refused(blob[: fc.HEADER_BYTES + 5], layout, reference, "truncated")


def test_trailing_garbage_is_refused(layout, case):
    reference, blob = case
    _refused(np.concatenate([blob, [0]]), layout, reference, "trailing garbage")
    # One extra body byte, claimed by the header, but never read by the Rice decoder.
    body_len = struct.unpack_from("<I", blob.tobytes(), 18)[0]
    raw = blob.tobytes()
    grown = raw[: fc.HEADER_BYTES + body_len] + b"\x00" + raw[fc.HEADER_BYTES + body_len :]
    grown = _with_header(np.frombuffer(grown, dtype=np.uint8), body_len=body_len + 1)
    _refused(grown, layout, reference, "trailing garbage")


def test_out_of_range_index_is_refused(layout, rng):
    reference = rng.standard_normal(layout.n_binary)
    bn_bytes = np.abs(rng.standard_normal(layout.n_bn)).astype("<f2").tobytes()
    body = fc.rice_encode(np.array([5, layout.n_binary + 3]))
    header = struct.pack("<BB8sIII", fc.FLIP_FORMAT_VERSION, fc.METHOD_RICE, fc.reference_digest(reference),
                         layout.n_binary, 2, len(body))
    blob = np.frombuffer(header + body + bn_bytes, dtype=np.uint8)
    _refused(blob, layout, reference, "outside the 25856 binary weights")


def test_more_flips_claimed_than_coded_is_refused(layout, case):
    reference, blob = case
    _refused(_with_header(blob, n_flips=201), layout, reference, "truncated")
    _refused(_with_header(blob, n_flips=layout.n_binary + 1), layout, reference, "only 25856")


def test_bitmap_count_and_padding_are_checked(layout, rng):
    reference = rng.standard_normal(layout.n_binary)
    bn_bytes = np.ones(layout.n_bn, dtype="<f2").tobytes()
    bitmap = np.zeros(layout.n_bits_bytes, dtype=np.uint8)
    bitmap[0] = 0b1000_0000

    def blob(method: int, body: bytes, n_flips: int) -> np.ndarray:
        header = struct.pack("<BB8sIII", fc.FLIP_FORMAT_VERSION, method, fc.reference_digest(reference),
                             layout.n_binary, n_flips, len(body))
        return np.frombuffer(header + body + bn_bytes, dtype=np.uint8)

    ok = blob(fc.METHOD_BITMAP, bitmap.tobytes(), 1)
    assert fc.decode_flips({fc.FLIPS_KEY: ok}, layout, reference)[0][0] == -_signs(reference)[0]
    _refused(blob(fc.METHOD_BITMAP, bitmap.tobytes(), 2), layout, reference, "holds 1 flips, the header says 2")
    _refused(blob(fc.METHOD_ZLIB, zlib.compress(bitmap.tobytes())[:-3], 1), layout, reference, "zlib")
    _refused(blob(fc.METHOD_ZLIB, zlib.compress(bitmap.tobytes() + b"\0"), 1), layout, reference, "exactly 3232")
    _refused(blob(7, bitmap.tobytes(), 1), layout, reference, "unknown flip coding method 7")


def test_bad_batch_norm_gets_the_full_codecs_checks(layout, rng):
    reference = rng.standard_normal(layout.n_binary)
    bn = np.ones(layout.n_bn, dtype=np.float32)
    blob = fc.encode_flips(reference, reference, bn)[fc.FLIPS_KEY].copy()
    bn_part = blob[-layout.n_bn * 2 :].view("<f2")
    bn_part[-1] = -1.0  # the last running variance
    with pytest.raises(codec.CodecError, match="running variance is negative"):
        fc.decode_flips({fc.FLIPS_KEY: blob}, layout, reference)
    bn_part[-1] = np.nan
    with pytest.raises(codec.CodecError, match="NaN"):
        fc.decode_flips({fc.FLIPS_KEY: blob}, layout, reference)


def test_wrong_keys_and_dtypes_are_refused(layout, case):
    reference, blob = case
    with pytest.raises(fc.FlipCodecError, match="a flip payload holds only"):
        fc.decode_flips({"bnn": blob}, layout, reference)
    with pytest.raises(fc.FlipCodecError, match="1-D uint8"):
        fc.decode_flips({fc.FLIPS_KEY: blob.astype(np.int16)}, layout, reference)
    with pytest.raises(fc.FlipCodecError, match="binary weights"):
        fc.decode_flips({fc.FLIPS_KEY: blob}, layout, reference[:-1])


# ------------------------------------------------------------------ strategy and client
SMALL = BNNConfig(in_bits=8, hidden=(2,), num_classes=2)  # 16 + 4 = 20 binary weights


@pytest.fixture()
def task_identity():
    """Flower stamps messages with the identity of the running task; give tests one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def _reply(node_id: int, payload: dict, n: int = 100):
    from flwr.app import Message, MetricRecord, RecordDict

    from common.federated.wire import METRIC, RECORD, payload_to_record

    ins = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    metrics = MetricRecord({METRIC.num_examples: n, METRIC.train_loss: 0.5, METRIC.train_acc: 0.9,
                            METRIC.codec_version: codec.CODEC_VERSION, METRIC.partition_id: node_id})
    return Message(content=RecordDict({RECORD.arrays: payload_to_record(payload), RECORD.metrics: metrics}),
                   reply_to=ins)


@pytest.mark.parametrize("mode", ["vote", "mean"])
def test_strategy_decodes_flips_against_the_global_it_sent(task_identity, mode):
    from common.federated.wire import record_to_payload
    from server.strategy import PackedFedAvg

    layout = codec.layout_for(SMALL)
    rng = np.random.default_rng(1)
    bn = np.ones(layout.n_bn, dtype=np.float32)
    strategy = PackedFedAvg(layout, mode=mode, bn_encoding="floats")
    sent = strategy.encode_global(rng.uniform(-1, 1, layout.n_binary), bn)
    strategy.set_reference(3, sent)
    received, _ = codec.decode(record_to_payload(sent), layout)
    new = np.where(received >= 0, 1.0, -1.0).astype(np.float32)
    new[[2, 5]] *= -1
    good = _reply(1, fc.encode_flips(received, new, bn))
    stale = _reply(2, fc.encode_flips(-received, new, bn))  # taken against another reference
    truncated = _reply(3, {fc.FLIPS_KEY: fc.encode_flips(received, new, bn)[fc.FLIPS_KEY][:-4]})
    arrays, _ = strategy.aggregate_train(3, [good, stale, truncated])
    weights, _ = codec.decode(record_to_payload(arrays), layout)
    if mode == "vote":
        np.testing.assert_array_equal(weights, new)
    else:
        np.testing.assert_allclose(weights, new, atol=1 / 127)
    log = strategy.rounds[3]
    assert [c["node_id"] for c in log.clients] == [1]
    assert log.clients[0]["sign_flips"] == 2
    assert log.clients[0]["sign_bits_per_binary_weight"] < 8 * (fc.HEADER_BYTES + 4) / layout.n_binary
    assert sorted(d["node_id"] for d in log.dropped) == [2, 3]
    assert "different reference" in log.dropped[0]["reason"]
    # Without a global model for the round, a flip update cannot be decoded: left out, no crash.
    other = PackedFedAvg(layout, mode=mode, bn_encoding="floats")
    assert other.aggregate_train(3, [_reply(1, fc.encode_flips(received, new, bn))]) == (None, None)
    assert "no global model" in other.rounds[3].dropped[0]["reason"]
    # A full sign update is still accepted, and its flips are counted too.
    strategy.set_reference(4, sent)
    strategy.aggregate_train(4, [_reply(1, codec.encode_signs(new, bn))])
    entry = strategy.rounds[4].clients[0]
    assert entry["sign_flips"] == 2 and entry["sign_bits_per_binary_weight"] == 8 * 3 / 20
    assert entry["uplink_bits_per_binary_weight"] == 8 * entry["uplink_bytes"] / layout.n_binary


def test_client_sends_flips_when_the_server_asks():
    from client.client_app import LocalRound, train_local
    from common.federated.wire import TRAIN_CONFIG
    from flwr.app import ConfigRecord

    layout = codec.layout_for(BNNConfig())
    torch.manual_seed(0)
    global_model = BNN(BNNConfig())
    downlink = codec.encode_model(global_model, bn_encoding="thresholds")
    x = torch.where(torch.rand(64, 200) < 0.5, -1.0, 1.0)
    y = torch.randint(0, 2, (64,))
    key = TRAIN_CONFIG
    base = {key.task: "4v5", key.local_epochs: 1, key.lr: 0.001, key.batch_size: 32, key.encoder_sha256: "x",
            key.codec_version: codec.CODEC_VERSION}
    flips_round = LocalRound.from_config(ConfigRecord({**base, key.uplink_codec: "flips"}))
    payload, _ = train_local(downlink, x, y, flips_round, 2, seed=0)
    assert fc.is_flips(payload)
    received, received_bn = codec.decode(downlink, layout)
    signs_payload, _ = train_local(downlink, x, y, LocalRound.from_config(ConfigRecord(base)), 2, seed=0)
    assert set(signs_payload) == {codec.BNT_KEY} and set(payload) == {fc.FLIPT_KEY}  # bn-encoding thresholds
    # Same seed, same training: the flips decode to exactly the signs and batch norm the full codec sends.
    from_flips = fc.decode_flips(payload, layout, received, received_bn)
    from_signs = codec.decode(signs_payload, layout, reference_bn=received_bn)
    np.testing.assert_array_equal(from_flips[0], from_signs[0])
    np.testing.assert_array_equal(from_flips[1], from_signs[1])
    from common.errors import HyBNNError

    with pytest.raises(HyBNNError, match="uplink-codec 'gzip' is unknown"):
        LocalRound.from_config(ConfigRecord({**base, key.uplink_codec: "gzip"}))
