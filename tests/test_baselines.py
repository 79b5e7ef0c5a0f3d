"""The baseline CNNs: shapes, input modes, the reason bcnn-sign fails, a few training steps."""

from __future__ import annotations

import pytest
import torch

from common.experiments.baselines import (
    BASELINES,
    BaselineCNN,
    BinaryConv2d,
    BinaryLinear,
    CNNConfig,
    binarize_input,
    build_baseline,
    train_baseline,
)
from common.binarize import LatentClipMixin, clip_latent_weights_
from common.errors import HyBNNError
from common.bnn.training import TrainConfig, fit


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Random images in [0, 1] with exact zeros, as MNIST's background is."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    x[x < 0.6] = 0.0
    return x


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("classes", [2, 10])
def test_output_shape(name, classes):
    model = build_baseline(name, classes).eval()
    assert model(images()).shape == (8, classes)


def test_the_three_models_share_one_shape():
    shapes = {name: [tuple(p.shape) for p in build_baseline(name).parameters()] for name in BASELINES}
    assert shapes["bcnn-sign"] == shapes["bcnn-centered"] == shapes["fp-cnn"]


def test_binary_models_binarize_every_weight_layer():
    for name in ("bcnn-sign", "bcnn-centered"):
        model = build_baseline(name)
        binary = [m for m in model.modules() if isinstance(m, LatentClipMixin)]
        assert [type(m) for m in binary] == [BinaryConv2d, BinaryConv2d, BinaryLinear, BinaryLinear]
    assert not any(isinstance(m, LatentClipMixin) for m in build_baseline("fp-cnn").modules())


def test_input_modes():
    x = images()
    assert torch.equal(binarize_input(x, "real"), x)
    centered = binarize_input(x, "centered")
    assert set(centered.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(centered, torch.where(x >= 0.5, 1.0, -1.0))
    with pytest.raises(HyBNNError, match="input mode"):
        CNNConfig(input_mode="raw")


def test_bcnn_sign_sees_a_constant_image():
    """sign(0) = +1: every [0, 1] pixel becomes +1, so all digits look the same."""
    model = build_baseline("bcnn-sign").eval()
    x = images(16)
    seen = model.first_layer_input(x)
    assert torch.all(seen == 1.0)
    outputs = model(x)
    assert torch.allclose(outputs, outputs[:1].expand_as(outputs))  # one answer for every image
    centered = build_baseline("bcnn-centered").eval().first_layer_input(x)
    assert not torch.all(centered == centered[:1])


def test_unknown_model_is_refused():
    with pytest.raises(HyBNNError, match="bcnn-sign, bcnn-centered, fp-cnn"):
        build_baseline("resnet")


@pytest.mark.parametrize("name", BASELINES)
def test_training_steps_keep_latent_weights_clipped_and_learn(name):
    torch.manual_seed(0)
    x = images(64)
    y = (x.mean(dim=(1, 2, 3)) > x.mean()).long()
    model = build_baseline(name)
    before = [p.detach().clone() for p in model.parameters()]
    result = fit(model, x, y, TrainConfig(epochs=2, batch_size=32, lr=0.05), progress=False)
    assert len(result.history) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for module in model.modules():
        if isinstance(module, LatentClipMixin):
            assert module.weight.abs().max() <= 1.0
    clip_latent_weights_(model)


def test_binary_conv_uses_sign_of_latent_weights():
    conv = BinaryConv2d(1, 2)
    with torch.no_grad():
        conv.weight.mul_(0.01)
    x = images(2)
    expected = torch.nn.functional.conv2d(x, torch.where(conv.weight >= 0, 1.0, -1.0), padding=1)
    assert torch.allclose(conv(x), expected)


def test_train_baseline_on_real_mnist(mnist_root):
    result = train_baseline("bcnn-centered", "0v1", epochs=1, data_root=mnist_root, progress=False,
                            limit=512)
    assert result["epochs"] == 1 and len(result["history"]) == 1
    assert 0.0 <= result["test_acc"] <= 1.0 and result["train_seconds"] > 0
    assert result["train_samples"] == 512
    with pytest.raises(HyBNNError, match="Unknown task"):
        train_baseline("fp-cnn", "3v11", epochs=1, data_root=mnist_root)
