"""Flip blocks: from round 2 on, clients train and flip one block of the binary weights per round."""

import numpy as np
import pytest
import torch

from common.bnn.model import BNN, BNNConfig
from common.bnn.training import TrainConfig, fit
from common.federated import codec
from common.federated import flipcodec as fc


def _signs(x: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(x) >= 0, 1.0, -1.0).astype(np.float32)


def test_round_1_and_one_block_train_every_weight():
    assert fc.flip_block(1, 4, 25_856) == (0, 25_856)
    assert fc.flip_block(0, 4, 25_856) == (0, 25_856)
    for server_round in (2, 3, 17):
        assert fc.flip_block(server_round, 1, 25_856) == (0, 25_856)


@pytest.mark.parametrize("blocks", [2, 3, 4, 7, 25_856])
def test_blocks_cover_every_weight_once_per_cycle(blocks):
    n = 25_856
    seen = np.zeros(n, dtype=int)
    sizes = set()
    for server_round in range(2, 2 + blocks):
        start, stop = fc.flip_block(server_round, blocks, n)
        assert 0 <= start < stop <= n
        seen[start:stop] += 1
        sizes.add(stop - start)
    assert np.all(seen == 1)
    assert max(sizes) - min(sizes) <= 1
    # The cycle repeats: the block depends on the round number alone.
    assert fc.flip_block(2, blocks, n) == fc.flip_block(2 + blocks, blocks, n)


@pytest.mark.parametrize("server_round, blocks, n_binary, match", [
    (2, 0, 100, "flip-blocks must be a whole number >= 1"),
    (2, -3, 100, "flip-blocks"),
    (2, 2.5, 100, "flip-blocks"),
    (2, True, 100, "flip-blocks"),
    (-1, 4, 100, "server round"),
    ("2", 4, 100, "server round"),
    (2, 101, 100, "more than the 100 binary weights"),
    (2, 4, 0, "binary weights"),
])
def test_bad_block_arguments_are_refused(server_round, blocks, n_binary, match):
    with pytest.raises(fc.FlipCodecError, match=match):
        fc.flip_block(server_round, blocks, n_binary)


def test_block_mask_checks_its_range():
    np.testing.assert_array_equal(fc.block_mask(1, 3, 5), [False, True, True, False, False])
    for start, stop in ((-1, 3), (3, 2), (0, 6)):
        with pytest.raises(fc.FlipCodecError, match="does not lie within"):
            fc.block_mask(start, stop, 5)


def _data(n: int = 256):
    torch.manual_seed(1)
    x = torch.where(torch.rand(n, 200) < 0.5, -1.0, 1.0)
    return x, (x[:, :3].sum(dim=1) > 0).long()


def test_training_moves_only_the_block():
    torch.manual_seed(0)
    model = BNN(BNNConfig())
    layout = codec.layout_for(model.config)
    before = codec.binary_latents(model)
    start, stop = fc.flip_block(3, 4, layout.n_binary)
    mask = fc.block_mask(start, stop, layout.n_binary)
    hooks = fc.freeze_outside(model, mask)
    x, y = _data()
    fit(model, x, y, TrainConfig(epochs=2, lr=0.05, batch_size=32, seed=0), progress=False)
    for hook in hooks:
        hook.remove()
    after = codec.binary_latents(model)
    np.testing.assert_array_equal(after[~mask], before[~mask])
    assert np.count_nonzero(_signs(after[mask]) != _signs(before[mask])) > 100
    # With the hooks removed, training moves every weight again.
    fit(model, x, y, TrainConfig(epochs=1, lr=0.05, batch_size=32, seed=1), progress=False)
    assert np.count_nonzero(codec.binary_latents(model)[~mask] != after[~mask]) > 1000


def test_restore_outside_puts_back_what_training_should_not_have_moved():
    torch.manual_seed(0)
    model = BNN(BNNConfig())
    layout = codec.layout_for(model.config)
    start_latent = codec.binary_latents(model)
    bn = codec.bn_vector(model, layout)
    mask = fc.block_mask(0, 1000, layout.n_binary)
    moved = -start_latent  # every sign changed, in and outside the block
    codec.load_into_model(model, layout, moved, bn)
    assert fc.restore_outside(model, start_latent, mask) == layout.n_binary - 1000
    after = codec.binary_latents(model)
    np.testing.assert_array_equal(after[mask], moved[mask])
    np.testing.assert_array_equal(after[~mask], start_latent[~mask])
    np.testing.assert_array_equal(codec.bn_vector(model, layout), bn)
    with pytest.raises(fc.FlipCodecError, match="expected"):
        fc.restore_outside(model, start_latent[:-1], mask)
    with pytest.raises(fc.FlipCodecError, match="block mask"):
        fc.freeze_outside(model, mask[:-1])


def _train_config(**overrides):
    from flwr.app import ConfigRecord

    from client.client_app import LocalRound
    from common.federated.wire import TRAIN_CONFIG as key

    base = {key.task: "4v5", key.local_epochs: 2, key.lr: 0.05, key.batch_size: 32, key.encoder_sha256: "x",
            key.codec_version: codec.CODEC_VERSION, key.uplink_codec: "flips", key.server_round: 3}
    return LocalRound.from_config(ConfigRecord({**base, **overrides}))


def _received_global_model():
    """A random initial global model as the client receives it (layout, downlink record, decoded
    signs and batch norm), and the client's training data."""
    layout = codec.layout_for(BNNConfig())
    torch.manual_seed(0)
    downlink = codec.encode_model(BNN(BNNConfig()), bn_encoding="thresholds")
    received, received_bn = codec.decode(downlink, layout)
    return (layout, downlink, received, received_bn, *_data())


def test_the_client_flips_only_its_rounds_block():
    from client.client_app import train_local
    from common.federated.wire import TRAIN_CONFIG as key

    layout, downlink, received, received_bn, x, y = _received_global_model()

    def changed(**config) -> np.ndarray:
        payload, _ = train_local(downlink, x, y, _train_config(**config), 2, seed=0)
        signs = fc.decode_flips(payload, layout, received, received_bn)[0]
        return np.flatnonzero(signs != _signs(received))

    start, stop = fc.flip_block(3, 4, layout.n_binary)
    in_block = changed(**{"flip-blocks": 4})
    assert in_block.size > 100 and in_block.min() >= start and in_block.max() < stop
    # Round 1 (from the random initial model) and flip-blocks 1: every weight trains.
    for config in ({"flip-blocks": 4, key.server_round: 1}, {"flip-blocks": 1}):
        everywhere = changed(**config)
        assert np.count_nonzero((everywhere < start) | (everywhere >= stop)) > 1000
    # flip-blocks 1 without a flip margin is the lossless codec: the same signs as the sign codec.
    payload, _ = train_local(downlink, x, y, _train_config(**{"flip-blocks": 1, "flip-margin": 0.0}), 2, seed=0)
    signs_payload, _ = train_local(downlink, x, y, _train_config(**{key.uplink_codec: "signs"}), 2, seed=0)
    np.testing.assert_array_equal(fc.decode_flips(payload, layout, received, received_bn)[0],
                                  codec.decode(signs_payload, layout, reference_bn=received_bn)[0])
    # The sign codec trains every weight, whatever flip-blocks says.
    signs_payload_4, _ = train_local(downlink, x, y, _train_config(**{key.uplink_codec: "signs", "flip-blocks": 4}),
                                     2, seed=0)
    np.testing.assert_array_equal(signs_payload_4[codec.BNT_KEY], signs_payload[codec.BNT_KEY])


@pytest.mark.parametrize("bad", [0, -1, 2.5, "four", 25_857])
def test_a_bad_flip_blocks_in_the_train_config_is_refused(bad):
    from common.errors import HyBNNError

    with pytest.raises(HyBNNError, match="flip-blocks"):
        _train_config(**{"flip-blocks": bad})


def test_training_only_block_moves_only_the_round_s_block_and_cleans_up():
    torch.manual_seed(0)
    model = BNN(BNNConfig())
    layout = codec.layout_for(model.config)
    before = codec.binary_latents(model).copy()
    x = torch.where(torch.rand(64, 200) > 0.5, 1.0, -1.0)
    y = (x[:, 0] > 0).long()
    with fc.training_only_block(model, 3, 4):
        fit(model, x, y, TrainConfig(epochs=2, batch_size=16, lr=0.1), progress=False)
    after = codec.binary_latents(model)
    start, stop = fc.flip_block(3, 4, layout.n_binary)
    outside = ~fc.block_mask(start, stop, layout.n_binary)
    np.testing.assert_array_equal(after[outside], before[outside])
    assert np.any(after[~outside] != before[~outside])
    assert all(not layer.weight._backward_hooks for layer in model.binary_layers())
    with fc.training_only_block(model, 1, 4):  # round 1: every weight trains
        fit(model, x, y, TrainConfig(epochs=1, batch_size=16, lr=0.1), progress=False)
    assert np.any(codec.binary_latents(model)[outside] != after[outside])


def test_blocks_end_after_flip_block_rounds():
    n = 25_856
    # Blocks in rounds 2 and 3 (block 0, then block 1 of 2), every weight from round 4 on.
    assert fc.flip_block(2, 2, n, 3) == (0, n // 2)
    assert fc.flip_block(3, 2, n, 3) == (n // 2, n)
    for server_round in (1, 4, 5, 20):
        assert fc.flip_block(server_round, 2, n, 3) == (0, n)
    # 0: blocks never end (as before the setting existed).
    assert fc.flip_block(20, 2, n, 0) == fc.flip_block(20, 2, n) == (0, n // 2)
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(fc.FlipCodecError, match="flip-block-rounds"):
            fc.flip_block(2, 2, n, bad)


def test_the_client_trains_every_weight_after_flip_block_rounds():
    from client.client_app import train_local
    from common.federated.wire import TRAIN_CONFIG as key

    layout, downlink, received, received_bn, x, y = _received_global_model()

    def signs(**config) -> np.ndarray:
        payload, _ = train_local(downlink, x, y, _train_config(**config), 2, seed=0)
        return fc.decode_flips(payload, layout, received, received_bn)[0]

    start, stop = fc.flip_block(3, 2, layout.n_binary)
    in_block = np.flatnonzero(signs(**{"flip-blocks": 2, "flip-block-rounds": 3}) != _signs(received))
    assert in_block.size > 100 and in_block.min() >= start and in_block.max() < stop
    # Round 4, past flip-block-rounds 3: the same signs as flip-blocks 1, every weight trained.
    after = {"flip-blocks": 2, "flip-block-rounds": 3, key.server_round: 4}
    np.testing.assert_array_equal(signs(**after), signs(**{"flip-blocks": 1, key.server_round: 4}))


@pytest.mark.parametrize("bad", [-1, 2.5, "three"])
def test_a_bad_flip_block_rounds_in_the_train_config_is_refused(bad):
    from common.errors import HyBNNError

    with pytest.raises(HyBNNError, match="flip-block-rounds"):
        _train_config(**{"flip-block-rounds": bad})


def test_undo_weak_flips_puts_back_only_flips_within_the_margin():
    torch.manual_seed(0)
    model = BNN(BNNConfig())
    layout = codec.layout_for(model.config)
    n = layout.n_binary
    reference = np.ones(n, dtype=np.float32)
    start = reference * np.float32(0.1)
    latent = np.full(n, 0.3, dtype=np.float32)
    latent[:10] = -0.005   # weak flips: put back
    latent[10:20] = -0.5   # strong flips: kept
    latent[20:30] = 0.001  # no flip, however close to zero: left alone
    codec.load_into_model(model, layout, latent, codec.bn_vector(model, layout))
    assert fc.undo_weak_flips(model, reference, start, 0.01) == 10
    after = codec.binary_latents(model)
    np.testing.assert_array_equal(after[:10], start[:10])
    np.testing.assert_array_equal(after[10:], latent[10:])
    assert fc.undo_weak_flips(model, reference, start, 0.0) == 0  # margin 0: nothing to undo
    for bad in (-0.1, float("nan"), float("inf"), "0.1"):
        with pytest.raises(fc.FlipCodecError, match="flip margin"):
            fc.undo_weak_flips(model, reference, start, bad)
    with pytest.raises(fc.FlipCodecError, match="expected"):
        fc.undo_weak_flips(model, reference[:-1], start, 0.01)


def test_the_client_undoes_weak_flips_from_round_2_with_a_flip_margin():
    from client.client_app import train_local
    from common.federated.wire import TRAIN_CONFIG as key

    layout, downlink, received, received_bn, x, y = _received_global_model()

    def flipped(**config) -> int:
        payload, _ = train_local(downlink, x, y, _train_config(**config), 2, seed=0)
        return int(np.count_nonzero(fc.decode_flips(payload, layout, received, received_bn)[0] != _signs(received)))

    plain = flipped(**{"flip-blocks": 1})
    with_margin = flipped(**{"flip-blocks": 1, "flip-margin": 0.02})
    assert 0 < with_margin < plain
    # Round 1 starts from the random initial model: no margin there.
    assert flipped(**{"flip-blocks": 1, "flip-margin": 0.02, key.server_round: 1}) == flipped(
        **{"flip-blocks": 1, key.server_round: 1})


@pytest.mark.parametrize("bad", [-0.01, 1.5, "wide"])
def test_a_bad_flip_margin_in_the_train_config_is_refused(bad):
    from common.errors import HyBNNError

    with pytest.raises(HyBNNError, match="flip-margin"):
        _train_config(**{"flip-margin": bad})
