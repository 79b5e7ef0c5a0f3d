"""The ITQ code rotation: fitted without labels, folded into the encoder's FC layer, recorded in the manifest."""

from __future__ import annotations

import json

import pytest
import torch

from common.encoder.artifact import MANIFEST_FILE, encoder_matches, load_encoder_artifact, save_encoder_artifact
from common.encoder.rotation import fit_code_rotation, fold_code_rotation, itq_rotation
from common.encoder.vae import VAEConfig, VAETrainConfig, images_to_tensor, train_vae
from common.errors import HyBNNError
from tests.test_any_dataset import squares16  # noqa: F401  (a fixture)
from tests.test_vae import fake_images


def correlated(n: int = 2000, k: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g, dtype=torch.float64)
    return torch.randn(n, k, generator=g, dtype=torch.float64) @ mixing + 3.0


def quantization_error(v: torch.Tensor, rotation: torch.Tensor) -> float:
    projected = v @ rotation
    return float(((torch.where(projected >= 0, 1.0, -1.0).double() - projected) ** 2).sum())


def test_itq_is_orthogonal_and_lowers_the_quantization_error() -> None:
    v = correlated()
    v = (v - v.mean(0)) / v.std(0)
    rotation = itq_rotation(v)
    assert torch.allclose(rotation.T @ rotation, torch.eye(12, dtype=torch.float64), atol=1e-9)
    start = itq_rotation(v, iterations=0)  # the random rotation ITQ starts from
    assert quantization_error(v, rotation) < 0.95 * quantization_error(v, start)
    assert quantization_error(v, rotation) < quantization_error(v, torch.eye(12, dtype=torch.float64))


def test_rotated_logits_are_centred_and_the_fit_is_reproducible() -> None:
    logits = correlated()
    matrix, mean = fit_code_rotation(logits, seed=3)
    rotated = (logits - mean) @ matrix
    assert rotated.mean(0).abs().max() < 1e-9
    again, _ = fit_code_rotation(logits, seed=3)
    assert torch.equal(matrix, again)


def test_fold_gives_the_rotated_logits() -> None:
    torch.manual_seed(0)
    fc = torch.nn.Linear(20, 12)
    x = torch.randn(500, 20)
    with torch.no_grad():
        before = fc(x).double()
    matrix, mean = fit_code_rotation(before)
    fold_code_rotation(fc, matrix, mean)
    with torch.no_grad():
        after = fc(x).double()
    assert torch.allclose(after, (before - mean) @ matrix, atol=1e-4)


def test_fit_and_fold_refuse_wrong_shapes() -> None:
    with pytest.raises(HyBNNError, match="N >= 2"):
        fit_code_rotation(torch.zeros(1, 4))
    with pytest.raises(HyBNNError, match="rotation"):
        fold_code_rotation(torch.nn.Linear(5, 4), torch.eye(3, dtype=torch.float64), torch.zeros(3))


def test_config_records_the_rotation_and_old_dicts_mean_none() -> None:
    with pytest.raises(HyBNNError, match="itq"):
        VAEConfig(code_rotation="pca")
    plain = VAEConfig().to_dict()
    assert "code_rotation" not in plain  # the dict earlier encoders were written with
    assert VAEConfig.from_dict(plain).code_rotation == "none"
    itq = VAEConfig(code_rotation="itq")
    assert itq.to_dict()["code_rotation"] == "itq" and VAEConfig.from_dict(itq.to_dict()) == itq


def test_train_vae_folds_the_rotation_fitted_on_the_training_images(tmp_path) -> None:
    images = fake_images(96)
    train = VAETrainConfig(epochs=2, batch_size=32, lr=3e-3)
    small = dict(latent_bits=16, channels=(4, 8))
    plain, _ = train_vae(images, VAEConfig(**small), train, progress=False)
    rotated, _ = train_vae(images, VAEConfig(**small, code_rotation="itq"), train, progress=False)
    x = images_to_tensor(images)
    with torch.no_grad():
        before, after = plain.encoder(x).double(), rotated.encoder(x).double()
    matrix, mean = fit_code_rotation(before, seed=train.seed)
    assert torch.allclose(after, (before - mean) @ matrix, atol=1e-3)
    assert not torch.allclose(after, before, atol=1e-2)

    artifact = save_encoder_artifact(rotated, tmp_path / "enc", data_sha256="ab" * 32,
                                     train_config=train.to_dict(), history=[])
    manifest = json.loads((tmp_path / "enc" / MANIFEST_FILE).read_text())
    assert manifest["architecture"]["code_rotation"] == "itq"
    assert load_encoder_artifact(tmp_path / "enc").config.code_rotation == "itq"
    assert artifact.config == VAEConfig(**small, code_rotation="itq")
    assert encoder_matches(tmp_path / "enc", VAEConfig(**small, code_rotation="itq"), "ab" * 32)
    assert not encoder_matches(tmp_path / "enc", VAEConfig(**small), "ab" * 32)


def test_pretrain_records_the_encoder_options(tmp_path, squares16) -> None:
    from simulation.cli import main

    out = tmp_path / "enc"
    assert main(["pretrain", "--dataset", squares16, "--data-root", str(tmp_path / "data"), "--epochs", "1",
                 "--variant", "deterministic-ste", "--code-rotation", "itq", "--input-shift", "1",
                 "--input-rotation", "5", "--input-mask", "0.1", "--out", str(out)]) == 0
    artifact = load_encoder_artifact(out)
    assert artifact.config.variant == "deterministic-ste" and artifact.config.code_rotation == "itq"
    assert artifact.manifest["train_config"]["input_shift"] == 1
    assert artifact.manifest["train_config"]["input_rotation"] == 5
    assert artifact.manifest["train_config"]["input_mask"] == 0.1
