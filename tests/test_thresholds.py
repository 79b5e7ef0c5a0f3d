"""Batch norm as integer thresholds: exact folding, the wire blocks, their refusals, the update
budget that keeps the uplink at 1/30 of float32 FedAvg, aggregation, and the client's calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.bnn.model import BNN, BNNConfig
from common.federated import codec, flipcodec
from common.federated import thresholds as th

PAPER = BNNConfig()
LAYOUT = codec.layout_for(PAPER)
SHAPE = LAYOUT.shape
TWO_LAYERS = BNNConfig(in_bits=300, hidden=(260, 9), num_classes=3)  # uint16 thresholds in layer 2


def trained_like(config: BNNConfig = PAPER, seed: int = 0) -> BNN:
    """A BNN whose batch norms look trained: scales of both signs and near zero, shifted statistics."""
    torch.manual_seed(seed)
    model = BNN(config)
    with torch.no_grad():
        for bn in [*model.hidden_bn, model.out_bn]:
            h = bn.num_features
            bn.weight.copy_(torch.randn(h) * 0.8)
            bn.weight[0] = 0.0
            bn.bias.copy_(torch.randn(h) * 0.7)
            bn.running_mean.copy_(torch.randn(h) * 6)
            bn.running_var.copy_(torch.rand(h) * 600 + 100)
    return model.eval()


def hidden_outputs(model: BNN, x: torch.Tensor) -> list[torch.Tensor]:
    outs, h = [], x
    with torch.no_grad():
        for linear, bn in zip(model.hidden, model.hidden_bn):
            h = torch.where(bn(h @ torch.where(linear.weight >= 0, 1.0, -1.0).T) >= 0, 1.0, -1.0)
            outs.append(h)
    return outs


def inputs(n: int = 500, bits: int = 200, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(n, bits, generator=g) < 0.4, -1.0, 1.0)


def with_bn(config: BNNConfig, model: BNN, bn: np.ndarray) -> BNN:
    out = BNN(config)
    layout = codec.layout_for(config)
    codec.load_into_model(out, layout, codec.binary_latents(model), bn)
    return out.eval()


# ------------------------------------------------------------------ exact folding
@pytest.mark.parametrize("config", [PAPER, TWO_LAYERS])
def test_canonical_thresholds_compute_what_the_batch_norm_computes(config):
    model = trained_like(config)
    layout = codec.layout_for(config)
    folded = th.fold(codec.bn_vector(model, layout), layout.shape)
    assert folded.flip.any() and (~folded.flip).any()
    canonical = th.canonical(folded, th.output_numbers(codec.bn_vector(model, layout), layout.shape), layout.shape)
    x = inputs(bits=config.in_bits)
    for a, b in zip(hidden_outputs(model, x), hidden_outputs(with_bn(config, model, canonical), x)):
        assert torch.equal(a, b)
    # and on every possible popcount, not only these inputs: folding the canonical form gives the same units
    again = th.fold(canonical, layout.shape)
    np.testing.assert_array_equal(again.u, folded.u)
    np.testing.assert_array_equal(again.flip, folded.flip)


def test_the_edge_engine_folds_a_received_model_to_the_same_thresholds():
    from common.edge.deploy import predict, to_deployment
    from common.packing import pack_signs

    model = trained_like()
    received = with_bn(PAPER, model, codec.decode(codec.encode_model(model, bn_encoding="thresholds"), LAYOUT)[1])
    deployed = to_deployment(received)
    folded = th.fold(codec.bn_vector(model, LAYOUT), SHAPE)
    np.testing.assert_array_equal(deployed.hidden[0].threshold.astype(np.int64) + deployed.hidden[0].flip, folded.u)
    x = inputs()
    with torch.no_grad():
        torch_pred = received(x).argmax(1).numpy()
    np.testing.assert_array_equal(predict(deployed, pack_signs(x.numpy())), torch_pred)


# ------------------------------------------------------------------ blocks
@pytest.mark.parametrize("config", [PAPER, TWO_LAYERS])
@pytest.mark.parametrize("bn_dtype", ["float16", "float32"])
def test_full_block_round_trip(config, bn_dtype):
    model = trained_like(config)
    layout = codec.layout_for(config)
    bn = codec.bn_vector(model, layout)
    data = th.encode_full(bn, layout.shape, bn_dtype)
    assert len(data) == 1 + layout.shape.full_hidden_bytes() + layout.shape.output_bytes(bn_dtype)
    block = th.decode(data, layout.shape)
    assert block.form == "full" and block.bn_dtype == bn_dtype
    folded = th.fold(bn, layout.shape)
    expected_out = th.output_numbers(bn, layout.shape).astype(bn_dtype).astype(np.float32)
    np.testing.assert_array_equal(block.bn, th.canonical(folded, expected_out, layout.shape))


def moved(bn: np.ndarray, shift: np.ndarray, shape: th.Shape = SHAPE) -> np.ndarray:
    """``bn``'s canonical form with every threshold moved by ``shift`` (clipped to the valid range)."""
    folded = th.fold(bn, shape)
    u = np.clip(folded.u + shift, 0, shape.hidden_inputs[0] + 1)
    return th.canonical(th.Thresholds(u, folded.flip), th.output_numbers(bn, shape), shape)


def firing(bn: np.ndarray, shape: th.Shape = SHAPE) -> np.ndarray:
    """bool ``(n + 1, H)``: whether each unit fires at popcount ``p`` (one hidden layer)."""
    folded = th.fold(bn, shape)
    p = np.arange(shape.hidden_inputs[0] + 1)[:, None]
    return (p >= folded.u[None, :]) ^ folded.flip[None, :]


def test_a_small_update_is_exact_and_small():
    reference = codec.bn_vector(trained_like(), LAYOUT)
    rng = np.random.default_rng(0)
    new = moved(reference, rng.choice([-1, 0, 0, 0, 1], SHAPE.total_units))
    data = th.encode_update(new, reference, SHAPE)
    assert th.block_form(data) == "update"
    block = th.decode(data, SHAPE, reference)
    assert block.step == 1
    np.testing.assert_array_equal(th.fold(block.bn, SHAPE).u, th.fold(new, SHAPE).u)
    assert len(data) < 1 + th.update_budget(SHAPE) + SHAPE.output_bytes("float16")


def test_a_large_update_is_coarsened_to_its_budget():
    reference = codec.bn_vector(trained_like(), LAYOUT)
    rng = np.random.default_rng(1)
    new = moved(reference, rng.integers(-40, 41, SHAPE.total_units))
    data = th.encode_update(new, reference, SHAPE)
    hidden = len(data) - 1 - SHAPE.output_bytes("float16")
    assert hidden <= th.update_budget(SHAPE) == 3 + 32
    block = th.decode(data, SHAPE, reference)
    assert block.form == "update" and block.step > 1
    # per unit, the popcounts at which the sent unit fires differently from the wanted one
    wrong = (firing(block.bn) != firing(new)).sum(axis=0)
    assert np.median(wrong) <= block.step // 2 and np.max(wrong) < block.step  # the range's ends clip
    assert np.mean((firing(block.bn) != firing(reference)).any(axis=0)) > 0.5  # it did move the thresholds


def test_the_uplink_record_is_at_most_one_thirtieth_of_float32_fedavg():
    """The paper's BNN: every uplink, whatever its thresholds did, as Flower serializes it."""
    from common.federated.wire import payload_to_record, record_nbytes
    from server.server_app import float_fedavg_record

    model = trained_like()
    float_fedavg = record_nbytes(float_fedavg_record(PAPER))  # results.json's float_fedavg_uplink_bytes
    assert float_fedavg == 108_156
    reference = codec.decode(codec.encode_model(trained_like(), bn_encoding="thresholds"), LAYOUT)[1]
    rng = np.random.default_rng(2)
    sizes = []
    for spread in (0, 1, 3, 10, 60, 200):
        bn = moved(reference, rng.integers(-spread, spread + 1, SHAPE.total_units))
        payload = codec.encode_signs(codec.binary_latents(model), bn, bn_encoding="thresholds",
                                     reference_bn=reference, layout=LAYOUT)
        sizes.append(record_nbytes(payload_to_record(payload)))
    assert max(sizes) * 30 <= float_fedavg, (sizes, float_fedavg)
    floats = record_nbytes(payload_to_record(codec.encode_model(model)))
    assert floats * 23 <= float_fedavg < floats * 24  # float16 numbers, raw bytes: about 1/23.6


def test_flips_in_the_batch_norm_travel_in_an_update():
    reference = codec.bn_vector(trained_like(), LAYOUT)
    folded = th.fold(reference, SHAPE)
    inner = np.flatnonzero((folded.u > 0) & (folded.u <= 200))  # units that are no constant
    flip = folded.flip.copy()
    flip[inner[[3, 40, -1]]] ^= True
    new = th.canonical(th.Thresholds(folded.u, flip), th.output_numbers(reference, SHAPE), SHAPE)
    data = th.encode_update(new, reference, SHAPE)
    assert th.block_form(data) == "update"
    np.testing.assert_array_equal(firing(th.decode(data, SHAPE, reference).bn), firing(new))
    # more changed flips than the budget holds: the full block, exact
    many = th.canonical(th.Thresholds(folded.u, ~folded.flip), th.output_numbers(reference, SHAPE), SHAPE)
    data = th.encode_update(many, reference, SHAPE)
    assert th.block_form(data) == "full"
    np.testing.assert_array_equal(firing(th.decode(data, SHAPE).bn), firing(many))


def _update(reference: np.ndarray) -> bytes:
    rng = np.random.default_rng(3)
    return th.encode_update(moved(reference, rng.integers(-2, 3, SHAPE.total_units)), reference, SHAPE)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d, r: b"", "empty"),
        (lambda d, r: bytes([d[0] | 0b100]) + d[1:], "tag"),
        (lambda d, r: d[:10], "truncated"),
        (lambda d, r: d[:-16] + b"\x00" + d[-16:], "trailing"),
        (lambda d, r: d[:-17] + bytes([d[-17] | 1]) + d[-16:], "padding|trailing|outside"),
        (lambda d, r: d[:2] + bytes([d[2] ^ 1]) + d[3:], "different|other global thresholds"),
        (lambda d, r: d[:-16] + np.full(8, np.nan, np.float16).tobytes(), "NaN"),
        (lambda d, r: d[:1] + b"\x00" * (th.update_budget(SHAPE) + 1) + d[-16:], "budget"),
    ],
)
def test_malformed_updates_are_refused(mutate, message):
    reference = codec.bn_vector(trained_like(), LAYOUT)
    with pytest.raises(th.ThresholdError, match=message):
        th.decode(mutate(_update(reference), reference), SHAPE, reference)


def test_an_update_needs_the_reference_it_was_taken_against():
    reference = codec.bn_vector(trained_like(), LAYOUT)
    with pytest.raises(th.ThresholdError, match="holds no global batch norm"):
        th.decode(_update(reference), SHAPE)
    other = moved(reference, np.ones(SHAPE.total_units, dtype=np.int64))
    with pytest.raises(th.ThresholdError, match="other global thresholds"):
        th.decode(_update(reference), SHAPE, other)


def test_an_update_beyond_the_threshold_range_is_refused():
    reference = codec.bn_vector(trained_like(), LAYOUT)
    folded = th.fold(reference, SHAPE)
    # a hand-made update: Rice k = 0, step 1, unit 0 moved by n + 2 (zigzag 2 (n + 2)), the others 0
    d = np.zeros(SHAPE.total_units, dtype=np.int64)
    d[0] = 200 + 2 - folded.u[0] + 1
    z = np.where(d >= 0, 2 * d, -2 * d - 1)
    bits = np.concatenate([th._rice_bits(z, 0), [False]])
    from common.packing import pack_bits

    data = bytes([1, 0]) + th.digest(folded) + pack_bits(bits).tobytes() + bytes(16)
    with pytest.raises(th.ThresholdError, match="outside"):
        th.decode(data, SHAPE, reference)


def test_full_blocks_out_of_range_or_with_padding_are_refused():
    bn = codec.bn_vector(trained_like(), LAYOUT)
    data = bytearray(th.encode_full(bn, SHAPE))
    data[5] = 202  # thresholds of 200 inputs lie in [0, 201]
    with pytest.raises(th.ThresholdError, match="outside"):
        th.decode(bytes(data), SHAPE)
    config = BNNConfig(in_bits=10, hidden=(5,), num_classes=2)  # 5 flips in one byte: 3 padding bits
    shape = codec.layout_for(config).shape
    data = bytearray(th.encode_full(codec.bn_vector(trained_like(config), codec.layout_for(config)), shape))
    data[1 + 5] |= 1
    with pytest.raises(th.ThresholdError, match="padding"):
        th.decode(bytes(data), shape)
    with pytest.raises(th.ThresholdError, match="bytes"):
        th.decode(bytes(data[:-17]) + bytes(data[-16:]), shape)


# ------------------------------------------------------------------ the codec and the flip codec
def test_codec_payloads_say_how_their_batch_norm_travels():
    model = trained_like()
    floats = codec.encode_model(model)
    thresholded = codec.encode_model(model, bn_encoding="thresholds")
    assert codec.bn_encoding_of(floats) == "floats" and codec.bn_encoding_of(thresholded) == "thresholds"
    assert set(thresholded) == {codec.BNT_KEY} and thresholded[codec.BNT_KEY].dtype == np.uint8
    weights, bn = codec.decode(thresholded, LAYOUT)
    np.testing.assert_array_equal(weights, codec.decode(floats, LAYOUT)[0])
    np.testing.assert_array_equal(th.fold(bn, SHAPE).u, th.fold(codec.bn_vector(model, LAYOUT), SHAPE).u)
    latent = codec.encode_latent(np.zeros(LAYOUT.n_binary), bn, bn_encoding="thresholds", layout=LAYOUT)
    assert set(latent) == {codec.LATENT_KEY, codec.THRESHOLDS_KEY}
    np.testing.assert_array_equal(codec.decode(latent, LAYOUT)[1], bn)
    update = codec.encode_model(model, bn_encoding="thresholds", reference_bn=bn)
    with pytest.raises(codec.CodecError, match="holds no global batch norm"):
        codec.decode(update, LAYOUT)
    with pytest.raises(codec.CodecError, match="threshold block is missing"):
        codec.decode({codec.BNT_KEY: update[codec.BNT_KEY][: LAYOUT.n_bits_bytes]}, LAYOUT)
    with pytest.raises(codec.CodecError, match="layout"):
        codec.encode_signs(codec.binary_latents(model), bn, bn_encoding="thresholds")
    with pytest.raises(codec.CodecError, match="unknown batch-norm encoding"):
        codec.encode_model(model, bn_encoding="ints")


def test_flip_updates_carry_a_threshold_block():
    model = trained_like()
    received_weights, received_bn = codec.decode(codec.encode_model(trained_like(seed=2), bn_encoding="thresholds"),
                                                 LAYOUT)
    payload = flipcodec.encode_model_flips(model, received_weights, bn_encoding="thresholds",
                                           reference_bn=received_bn)
    assert set(payload) == {flipcodec.FLIPT_KEY}
    weights, bn = flipcodec.decode_flips(payload, LAYOUT, received_weights, received_bn)
    signs = codec.encode_model(model, bn_encoding="thresholds", reference_bn=received_bn)
    expected = codec.decode(signs, LAYOUT, reference_bn=received_bn)
    np.testing.assert_array_equal(weights, expected[0])
    np.testing.assert_array_equal(bn, expected[1])
    cut = {flipcodec.FLIPT_KEY: payload[flipcodec.FLIPT_KEY][:-20]}
    with pytest.raises(codec.CodecError):
        flipcodec.decode_flips(cut, LAYOUT, received_weights, received_bn)


# ------------------------------------------------------------------ aggregation
def test_aggregation_takes_median_thresholds_and_majority_flips():
    shape = th.Shape((200,), (3,), 2)
    out = np.array([1, 1, 0, 0, 0, 0, 1, 1], dtype=np.float32)

    def bn(u, flip, out=out):
        return th.canonical(th.Thresholds(np.array(u), np.array(flip)), out, shape)

    honest = [bn([10, 100, 150], [False, True, False]), bn([12, 104, 150], [False, True, True]),
              bn([11, 101, 151], [False, False, False])]
    hostile = bn([201, 0, 0], [True, True, True], out * 1000)
    for clients in (honest, honest[:2] + [hostile]):
        result = th.fold(th.aggregate(clients, [1, 1, 1], shape), shape)
        assert np.all(result.u >= np.min([th.fold(b, shape).u for b in honest[:2]], axis=0) - 1)
    median = th.fold(th.aggregate(honest, [1, 1, 1], shape), shape)
    np.testing.assert_array_equal(median.u, [11, 101, 150])
    np.testing.assert_array_equal(median.flip, [False, True, False])
    with_hostile = th.aggregate(honest[:2] + [hostile], [1, 1, 1], shape)
    assert np.all(np.abs(th.output_numbers(with_hostile, shape)) <= 1)  # median of the output numbers
    tie = th.fold(th.aggregate(honest[:2], [1, 1], shape), shape)
    np.testing.assert_array_equal(tie.flip, [False, True, False])  # 1 of 2 does not flip unit 2
    weighted = th.fold(th.aggregate(honest, [1, 1, 6], shape, "mean"), shape)
    np.testing.assert_array_equal(weighted.u, [11, 101, 151])
    assert not weighted.flip.any()


# ------------------------------------------------------------------ the client's side
@pytest.mark.parametrize("config", [PAPER, TWO_LAYERS])
def test_calibration_makes_received_thresholds_fire_the_same_in_training_mode(config):
    layout = codec.layout_for(config)
    sent = trained_like(config)
    received_bn = codec.decode(codec.encode_model(sent, bn_encoding="thresholds"), layout)[1]
    received = with_bn(config, sent, received_bn)
    x = inputs(bits=config.in_bits)
    expected = hidden_outputs(received, x)
    out_before = codec.bn_vector(received, layout)[-4 * config.num_classes :]
    th.calibrate(received, x)
    received.train()
    with torch.no_grad():  # training mode, the whole set as one batch: the batch's own statistics
        h, got = x, []
        for linear, bn in zip(received.hidden, received.hidden_bn):
            h = torch.where(bn(h @ torch.where(linear.weight >= 0, 1.0, -1.0).T) >= 0, 1.0, -1.0)
            got.append(h)
    for a, b in zip(expected, got):
        assert (a != b).float().mean() < 1e-3
    assert torch.all(received.hidden_bn[0].weight.abs() == 1)
    np.testing.assert_array_equal(codec.bn_vector(received, layout)[-4 * config.num_classes :], out_before)


def test_recalibration_sets_the_exact_statistics_of_the_data():
    model = trained_like()
    x = inputs()
    th.recalibrate(model, x)
    with torch.no_grad():
        a = x @ torch.where(model.hidden[0].weight >= 0, 1.0, -1.0).T
    torch.testing.assert_close(model.hidden_bn[0].running_mean, a.mean(0))
    torch.testing.assert_close(model.hidden_bn[0].running_var, a.var(0))
    h = hidden_outputs(model, x)[-1]
    with torch.no_grad():
        out = h @ torch.where(model.out.weight >= 0, 1.0, -1.0).T
    torch.testing.assert_close(model.out_bn.running_mean, out.mean(0))


# ------------------------------------------------------------------ the server's side
@pytest.mark.usefixtures("flower_task_identity")
def test_the_strategy_aggregates_threshold_updates_and_refuses_the_wrong_ones():
    from flwr.app import Message, MetricRecord, RecordDict

    from common.federated.wire import METRIC, RECORD, payload_to_record, record_to_payload
    from server.strategy import PackedFedAvg

    strategy = PackedFedAvg(LAYOUT, bn_encoding="thresholds")
    initial = trained_like()
    sent = strategy.encode_global(codec.binary_latents(initial), codec.bn_vector(initial, LAYOUT))
    assert set(record_to_payload(sent)) == {codec.BNT_KEY}
    strategy.set_reference(1, sent)
    reference_bn = strategy.bn_references[1]

    def reply(node: int, payload: dict) -> Message:
        metrics = MetricRecord({METRIC.num_examples: 100, METRIC.codec_version: codec.CODEC_VERSION,
                                METRIC.partition_id: node - 1})
        return Message(content=RecordDict({RECORD.arrays: payload_to_record(payload), RECORD.metrics: metrics}),
                       reply_to=Message(content=RecordDict(), dst_node_id=node, message_type="train"))

    signs = codec.binary_latents(initial)
    some = np.arange(SHAPE.total_units) % 8 == 0
    clients = [moved(reference_bn, np.where(some, shift, 0)) for shift in (-2, 1, 3)]
    good = [reply(n + 1, codec.encode_signs(signs, bn, bn_encoding="thresholds", reference_bn=reference_bn,
                                            layout=LAYOUT)) for n, bn in enumerate(clients)]
    floats = reply(4, codec.encode_signs(signs, clients[0]))
    elsewhere = reply(5, codec.encode_signs(signs, clients[0], bn_encoding="thresholds",
                                            reference_bn=clients[2], layout=LAYOUT))
    arrays, _ = strategy.aggregate_train(1, [*good, floats, elsewhere])
    log = strategy.rounds[1]
    assert [c["node_id"] for c in log.clients] == [1, 2, 3] and all(c["bn_step"] == 1 for c in log.clients)
    reasons = {d["node_id"]: d["reason"] for d in log.dropped}
    assert "travels as floats" in reasons[4] and "other global thresholds" in reasons[5]
    _, global_bn = codec.decode(record_to_payload(arrays), LAYOUT)
    np.testing.assert_array_equal(firing(global_bn), firing(clients[1]))  # the median client
