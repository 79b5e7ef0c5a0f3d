"""The binary-latent VAE: shapes, the Bernoulli straight-through sample, the KL term, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.errors import HyBNNError
from common.encoder.vae import (BinaryVAE, VAEConfig, VAETrainConfig, bernoulli_ste, images_to_tensor,
                        kl_to_half, train_vae)


def fake_images(n: int, seed: int = 0) -> np.ndarray:
    """Blobs at a few positions, so there is something to reconstruct."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        r, c = rng.integers(2, 20, size=2)
        images[i, r : r + 7, c : c + 7] = 255
    return images


def test_default_config_is_the_paper_shape() -> None:
    config = VAEConfig()
    assert config.latent_bits == 200
    assert config.variant == "bernoulli-ste"
    assert config.kl_weight == 1.0
    assert config.spatial == 4 and config.flat_features == 2048
    model = BinaryVAE(config)
    assert model.encoder.fc.in_features == 2048 and model.encoder.fc.out_features == 200
    convs = [m for m in model.encoder.conv if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 32), (32, 64), (64, 128)]
    assert all(c.bias is None and c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs)


@pytest.mark.parametrize("variant", ["bernoulli-ste", "deterministic-ste"])
def test_forward_shapes(variant: str) -> None:
    model = BinaryVAE(VAEConfig(variant=variant))
    x = images_to_tensor(fake_images(5))
    pixel_logits, logits = model(x)
    assert pixel_logits.shape == (5, 1, 28, 28)
    assert logits.shape == (5, 200)
    parts = model.loss(x)
    assert set(parts) == {"loss", "recon", "kl"} and torch.isfinite(parts["loss"])


def test_eval_latent_is_deterministic_sign_with_zero_positive() -> None:
    model = BinaryVAE(VAEConfig()).eval()
    z = model.latent(torch.tensor([[-1.0, 0.0, 2.0]]))
    assert z.tolist() == [[-1.0, 1.0, 1.0]]


def test_bernoulli_ste_is_hard_forward_and_passes_sigmoid_gradient() -> None:
    logits = torch.zeros(1000, requires_grad=True)
    b = bernoulli_ste(logits, torch.Generator().manual_seed(0))
    assert set(b.detach().unique().tolist()) <= {0.0, 1.0}
    b.sum().backward()
    assert torch.allclose(logits.grad, torch.full((1000,), 0.25))  # sigmoid'(0)


def test_kl_to_half() -> None:
    assert torch.allclose(kl_to_half(torch.zeros(2, 200)), torch.zeros(2), atol=1e-6)
    big = kl_to_half(torch.full((1, 10), 50.0))
    assert torch.allclose(big, torch.tensor([10 * math.log(2.0)]), atol=1e-4)
    assert torch.isfinite(kl_to_half(torch.full((1, 3), -1e4))).all()


def test_unknown_variant_is_a_user_error() -> None:
    with pytest.raises(HyBNNError, match="bernoulli-ste"):
        VAEConfig(variant="gaussian")


def test_bad_images_are_a_user_error() -> None:
    with pytest.raises(HyBNNError, match="uint8"):
        images_to_tensor(np.zeros((2, 28, 28), dtype=np.float32))


def test_a_few_epochs_reduce_the_loss() -> None:
    config = VAEConfig(latent_bits=16, channels=(4, 8))
    images = fake_images(96)
    model, history = train_vae(images, config, VAETrainConfig(epochs=3, batch_size=32, lr=3e-3),
                               progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert set(history[0]) >= {"loss", "recon", "kl", "seconds"}
    assert history[-1]["loss"] < history[0]["loss"]
    assert not model.training


def test_random_shift_moves_each_image_within_the_bound() -> None:
    from common.encoder.vae import random_shift

    x = images_to_tensor(fake_images(64))
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape and torch.equal(random_shift(x, 0, torch.Generator()), x)
    offsets = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(shifted[i], torch.roll(torch.nn.functional.pad(x[i], (2,) * 4), (dy, dx), (1, 2))
                                [:, 2:-2, 2:-2])]
        assert found, f"image {i} is not a shift of its original by at most 2 pixels"
        offsets.add(found[0])
    assert len(offsets) > 5  # offsets differ between images


def test_input_shift_is_checked_and_recorded_only_when_on() -> None:
    with pytest.raises(HyBNNError, match="input_shift"):
        VAETrainConfig(input_shift=-1)
    assert "input_shift" not in VAETrainConfig().to_dict()  # the dict earlier encoders were written with
    assert VAETrainConfig(input_shift=2).to_dict()["input_shift"] == 2
    model, history = train_vae(fake_images(64), VAEConfig(latent_bits=16, channels=(4, 8)),
                               VAETrainConfig(epochs=2, batch_size=32, input_shift=2), progress=False)
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)


def test_random_rotation_turns_each_image_about_its_centre() -> None:
    from common.encoder.vae import random_rotation

    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 4:24, 13:15] = 1.0  # an upright bar through the centre
    turned = random_rotation(x, 30, torch.Generator().manual_seed(0))
    assert turned.shape == x.shape and torch.equal(random_rotation(x, 0, torch.Generator()), x)
    assert torch.allclose(turned.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.05)  # turned, not cut
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    angles = []
    for image in turned[:, 0]:
        w = image / image.sum()
        cy, cx = (w * rows).sum(), (w * cols).sum()
        assert abs(cy - 13.5) < 0.5 and abs(cx - 13.5) < 0.5  # about the centre
        # the bar's direction from its second moments, in degrees from upright
        syy, sxx = (w * (rows - cy) ** 2).sum(), (w * (cols - cx) ** 2).sum()
        sxy = (w * (rows - cy) * (cols - cx)).sum()
        angles.append(math.degrees(0.5 * math.atan2(2 * sxy, syy - sxx)))
    assert max(abs(a) for a in angles) <= 31 and max(angles) - min(angles) > 30  # within +-30, and they vary


def test_random_mask_zeroes_about_the_asked_fraction_of_pixels() -> None:
    from common.encoder.vae import random_mask

    x = torch.ones(64, 1, 28, 28)
    masked = random_mask(x, 0.25, torch.Generator().manual_seed(0))
    assert masked.shape == x.shape and set(masked.unique().tolist()) == {0.0, 1.0}
    assert abs((masked == 0).float().mean().item() - 0.25) < 0.01
    assert not torch.equal(masked[0], masked[1])  # each image its own mask
    assert torch.equal(random_mask(x, 0.0, torch.Generator()), x)


def test_input_mask_is_checked_and_recorded_only_when_on() -> None:
    for bad in (-0.1, 0.95, float("nan"), True, "0.2"):
        with pytest.raises(HyBNNError, match="input_mask"):
            VAETrainConfig(input_mask=bad)
    assert "input_mask" not in VAETrainConfig().to_dict()
    assert VAETrainConfig(input_mask=0.25).to_dict()["input_mask"] == 0.25


def test_input_rotation_is_checked_and_recorded_only_when_on() -> None:
    for bad in (-1, 46, 2.5, True):
        with pytest.raises(HyBNNError, match="input_rotation"):
            VAETrainConfig(input_rotation=bad)
    assert "input_rotation" not in VAETrainConfig().to_dict()
    assert VAETrainConfig(input_rotation=10).to_dict()["input_rotation"] == 10
    model, history = train_vae(fake_images(64), VAEConfig(latent_bits=16, channels=(4, 8)),
                               VAETrainConfig(epochs=1, batch_size=32, input_rotation=10, input_shift=1,
                                              input_mask=0.2),
                               progress=False)
    assert len(history) == 1 and math.isfinite(history[0]["loss"])
