"""The wire codec: round trips, sizes, and refusal of malformed payloads."""

import numpy as np
import pytest
import torch

from common.federated import codec
from common.bnn.model import BNN, BNNConfig
from common.packing import pack_signs


@pytest.fixture()
def model() -> BNN:
    torch.manual_seed(0)
    m = BNN(BNNConfig())
    with torch.no_grad():
        m.hidden_bn[0].running_mean.uniform_(-5, 5)
        m.hidden_bn[0].running_var.uniform_(0.5, 40)
        m.hidden_bn[0].weight.uniform_(0.5, 1.5)
    return m


@pytest.fixture()
def layout() -> codec.Layout:
    return codec.layout_for(BNNConfig())


def test_layout_counts_the_papers_bnn(layout):
    assert layout.n_binary == 200 * 128 + 128 * 2 == 25856
    assert layout.n_bits_bytes == 3232
    assert layout.n_bn == 4 * 128 + 4 * 2


def test_signs_round_trip(model, layout):
    payload = codec.encode_model(model)
    assert list(payload) == ["bnn"] and payload["bnn"].dtype == np.uint8
    assert payload["bnn"].shape == (3232 + 520 * 2,)
    weights, bn = codec.decode(payload, layout, kind="signs")
    expected = np.where(codec.binary_latents(model) >= 0, 1.0, -1.0)
    np.testing.assert_array_equal(weights, expected)
    np.testing.assert_allclose(bn, codec.bn_vector(model, layout), rtol=1e-3, atol=1e-3)
    # Loading back gives a model with the same binary weights and (float16-rounded) batch norm.
    other = BNN(BNNConfig())
    codec.load_into_model(other, layout, weights, bn)
    for a, b in zip(model.binary_layers(), other.binary_layers()):
        assert torch.equal(torch.where(a.weight >= 0, 1.0, -1.0), b.weight)


def test_sign_of_zero_is_plus_one(layout):
    latent = np.zeros(layout.n_binary, dtype=np.float32)
    payload = codec.encode_signs(latent, np.ones(layout.n_bn))
    weights, _ = codec.decode(payload, layout)
    assert np.all(weights == 1.0)


def test_float32_batch_norm_is_told_apart_by_length(model, layout):
    payload = codec.encode_model(model, bn_dtype="float32")
    assert payload["bnn"].shape == (3232 + 520 * 4,)
    _, bn = codec.decode(payload, layout)
    np.testing.assert_array_equal(bn, codec.bn_vector(model, layout))


def test_latent_round_trip(layout):
    rng = np.random.default_rng(0)
    mean = rng.uniform(-1, 1, layout.n_binary)
    payload = codec.encode_latent(mean, np.ones(layout.n_bn))
    assert payload["latent"].dtype == np.int8
    weights, _ = codec.decode(payload, layout, kind="latent")
    assert np.max(np.abs(weights - mean)) <= 0.5 / codec.LATENT_LEVELS + 1e-6


def _signs(layout, bn=None):
    return codec.encode_signs(np.ones(layout.n_binary), np.ones(layout.n_bn) if bn is None else bn)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: {"other": p["bnn"]}, "payload keys"),
        (lambda p: {**p, "extra": np.zeros(1)}, "payload keys"),
        (lambda p: {"bnn": p["bnn"][:-1]}, "bytes"),
        (lambda p: {"bnn": np.concatenate([p["bnn"], p["bnn"][:7]])}, "bytes"),
        (lambda p: {"bnn": p["bnn"].astype(np.int16)}, "uint8"),
        (lambda p: {"bnn": p["bnn"].reshape(2, -1)}, "1-D"),
    ],
)
def test_malformed_payloads_are_refused(layout, mutate, message):
    with pytest.raises(codec.CodecError, match=message):
        codec.decode(mutate(_signs(layout)), layout)


def test_nan_in_batch_norm_is_refused(layout):
    payload = _signs(layout)
    blob = payload["bnn"].copy()
    bn = blob[layout.n_bits_bytes:].view("<f2")
    bn[3] = np.nan
    with pytest.raises(codec.CodecError, match="NaN"):
        codec.decode({"bnn": blob}, layout)
    with pytest.raises(codec.CodecError, match="NaN"):
        codec.encode_signs(np.ones(layout.n_binary), np.full(layout.n_bn, np.nan))


def test_negative_variance_and_padding_bits_are_refused():
    config = BNNConfig(in_bits=5, hidden=(3,), num_classes=2)  # 21 weights: 3 padding bits
    layout = codec.layout_for(config)
    payload = codec.encode_signs(np.ones(layout.n_binary), np.ones(layout.n_bn))
    blob = payload["bnn"].copy()
    blob[layout.n_bits_bytes - 1] |= 1
    with pytest.raises(codec.CodecError, match="padding"):
        codec.decode({"bnn": blob}, layout)
    bn = np.ones(layout.n_bn)
    bn[3 * 3] = -1.0  # first running_var of the hidden batch norm
    with pytest.raises(codec.CodecError, match="variance"):
        codec.decode(codec.encode_signs(np.ones(layout.n_binary), bn), layout)


def test_wrong_kind_and_version_are_refused(layout):
    with pytest.raises(codec.CodecError, match="expected a 'latent'"):
        codec.decode(_signs(layout), layout, kind="latent")
    bad = codec.encode_latent(np.zeros(layout.n_binary), np.ones(layout.n_bn))
    bad["latent"][0] = -128
    with pytest.raises(codec.CodecError, match="-128"):
        codec.decode(bad, layout)
    codec.check_version(codec.CODEC_VERSION)
    for version in (None, 0, 1, 3, "2", True):
        with pytest.raises(codec.CodecError, match="codec version"):
            codec.check_version(version)


def test_bits_follow_the_packing_convention(layout):
    latent = -np.ones(layout.n_binary)
    latent[0] = 1.0
    payload = codec.encode_signs(latent, np.ones(layout.n_bn))
    np.testing.assert_array_equal(payload["bnn"][: layout.n_bits_bytes], pack_signs(latent))
    assert payload["bnn"][0] == 0b1000_0000


def test_packed_payload_is_one_twentieth_of_float_fedavg(model):
    """Serialized sizes as Flower sends them: packed record vs stock float32 FedAvg record."""
    from flwr.app import ArrayRecord

    from common.federated.wire import payload_to_record, record_nbytes

    packed = record_nbytes(payload_to_record(codec.encode_model(model)))
    stock = record_nbytes(ArrayRecord(model.state_dict()))
    assert packed * 20 <= stock, (packed, stock)
    assert codec.payload_nbytes(codec.encode_model(model)) < packed
