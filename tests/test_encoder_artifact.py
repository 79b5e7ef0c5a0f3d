"""The frozen encoder artifact: round trip, and a clear error naming the file for every defect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common.encoder.artifact import (MANIFEST_FILE, MANIFEST_KEYS, WEIGHTS_FILE, EncoderArtifact,
                            encoder_matches, load_encoder_artifact, save_encoder_artifact)
from common.errors import HyBNNError
from common.encoder.features import encode_images
from common.encoder.vae import BinaryVAE, VAEConfig

SMALL = VAEConfig(latent_bits=16, channels=(4, 8))
DATA_SHA = "ab" * 32


def images(n: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def make_vae(config: VAEConfig = SMALL, seed: int = 0) -> BinaryVAE:
    torch.manual_seed(seed)
    vae = BinaryVAE(config)
    # Non-trivial batch-norm statistics, so a lost buffer would change the codes.
    vae.train()
    with torch.no_grad():
        vae.encoder(torch.rand(64, 1, 28, 28))
    return vae.eval()


@pytest.fixture()
def artifact(tmp_path: Path) -> EncoderArtifact:
    return save_encoder_artifact(make_vae(), tmp_path / "enc", data_sha256=DATA_SHA,
                                 train_config={"epochs": 1}, history=[{"epoch": 1, "loss": 1.0}])


def test_round_trip_gives_identical_codes(tmp_path: Path, artifact: EncoderArtifact) -> None:
    vae = make_vae()
    before = encode_images(vae.encoder, images(), progress=False)
    loaded = load_encoder_artifact(tmp_path / "enc")
    after = encode_images(loaded.encoder, images(), progress=False)
    assert np.array_equal(before, after)
    assert not loaded.encoder.training
    assert not any(p.requires_grad for p in loaded.encoder.parameters())
    assert loaded.sha256 == artifact.sha256 == loaded.manifest["weights_sha256"]
    assert loaded.path == tmp_path / "enc"


def test_manifest_contents(tmp_path: Path, artifact: EncoderArtifact) -> None:
    manifest = json.loads((tmp_path / "enc" / MANIFEST_FILE).read_text())
    assert set(MANIFEST_KEYS) <= set(manifest)
    assert manifest["variant"] == "bernoulli-ste" and manifest["latent_bits"] == 16
    assert manifest["architecture"] == SMALL.to_dict()
    assert manifest["data_sha256"] == DATA_SHA
    assert manifest["train_config"] == {"epochs": 1}
    # Encoder weights only: nothing of the decoder travels.
    from safetensors import safe_open
    with safe_open(str(tmp_path / "enc" / WEIGHTS_FILE), "pt") as f:
        assert not any(k.startswith("decoder") for k in f.keys())
        assert "fc.weight" in f.keys()


def test_manifest_path_is_accepted(tmp_path: Path, artifact: EncoderArtifact) -> None:
    assert load_encoder_artifact(tmp_path / "enc" / MANIFEST_FILE).sha256 == artifact.sha256


def test_no_temporary_files_are_left(tmp_path: Path, artifact: EncoderArtifact) -> None:
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == [WEIGHTS_FILE, MANIFEST_FILE]


def test_expected_hash(tmp_path: Path, artifact: EncoderArtifact) -> None:
    assert load_encoder_artifact(tmp_path / "enc", expected_sha256=artifact.sha256.upper())
    with pytest.raises(HyBNNError, match=WEIGHTS_FILE) as err:
        load_encoder_artifact(tmp_path / "enc", expected_sha256="0" * 64)
    assert "0" * 64 in str(err.value)


def test_missing_manifest(tmp_path: Path, artifact: EncoderArtifact) -> None:
    (tmp_path / "enc" / MANIFEST_FILE).unlink()
    with pytest.raises(HyBNNError, match=MANIFEST_FILE) as err:
        load_encoder_artifact(tmp_path / "enc")
    assert "hybnn pretrain --out" in str(err.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(HyBNNError, match="does not exist"):
        load_encoder_artifact(tmp_path / "nowhere")


def test_manifest_not_json(tmp_path: Path, artifact: EncoderArtifact) -> None:
    (tmp_path / "enc" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(HyBNNError, match="manifest.json.*not valid JSON"):
        load_encoder_artifact(tmp_path / "enc")


def test_manifest_missing_keys(tmp_path: Path, artifact: EncoderArtifact) -> None:
    path = tmp_path / "enc" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    del manifest["weights_sha256"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(HyBNNError, match="manifest.json lacks the keys weights_sha256"):
        load_encoder_artifact(tmp_path / "enc")


def test_missing_weights(tmp_path: Path, artifact: EncoderArtifact) -> None:
    (tmp_path / "enc" / WEIGHTS_FILE).unlink()
    with pytest.raises(HyBNNError, match=f"{WEIGHTS_FILE}.*missing"):
        load_encoder_artifact(tmp_path / "enc")


def test_truncated_weights(tmp_path: Path, artifact: EncoderArtifact) -> None:
    path = tmp_path / "enc" / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(HyBNNError, match=f"{WEIGHTS_FILE} have sha256 .*truncated"):
        load_encoder_artifact(tmp_path / "enc")


def test_corrupt_weights_with_matching_hash_are_rejected_as_unreadable(
        tmp_path: Path, artifact: EncoderArtifact) -> None:
    # A garbage file whose hash the manifest was (wrongly) updated to: the parser catches it.
    path = tmp_path / "enc" / WEIGHTS_FILE
    path.write_bytes(b"\x00garbage" * 10)
    _rewrite_manifest_hash(tmp_path / "enc")
    with pytest.raises(HyBNNError, match=f"{WEIGHTS_FILE} are not a readable safetensors"):
        load_encoder_artifact(tmp_path / "enc")


def test_mismatched_weights_shapes(tmp_path: Path, artifact: EncoderArtifact) -> None:
    # Weights of a different architecture under this manifest (hash updated to match).
    other = make_vae(VAEConfig(latent_bits=24, channels=(4, 8)))
    save_file({k: v.contiguous() for k, v in other.encoder.state_dict().items()},
              str(tmp_path / "enc" / WEIGHTS_FILE))
    _rewrite_manifest_hash(tmp_path / "enc")
    with pytest.raises(HyBNNError, match=f"{WEIGHTS_FILE} do not match the architecture") as err:
        load_encoder_artifact(tmp_path / "enc")
    assert "fc.weight" in str(err.value)


def test_resave_replaces_the_artifact_whole(tmp_path: Path, artifact: EncoderArtifact) -> None:
    second = save_encoder_artifact(make_vae(seed=1), tmp_path / "enc", data_sha256=DATA_SHA,
                                   train_config={"epochs": 2}, history=[])
    assert second.sha256 != artifact.sha256
    assert load_encoder_artifact(tmp_path / "enc").manifest["train_config"] == {"epochs": 2}


def test_failed_save_keeps_the_old_artifact(tmp_path: Path, artifact: EncoderArtifact,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import common.encoder.artifact as enc

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(enc, "save", broken_save)
    with pytest.raises(OSError):
        save_encoder_artifact(make_vae(seed=1), tmp_path / "enc", data_sha256=DATA_SHA,
                              train_config={}, history=[])
    assert load_encoder_artifact(tmp_path / "enc").sha256 == artifact.sha256
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == [WEIGHTS_FILE, MANIFEST_FILE]


def test_encoder_matches(tmp_path: Path, artifact: EncoderArtifact) -> None:
    assert encoder_matches(tmp_path / "enc", SMALL, DATA_SHA)
    assert encoder_matches(tmp_path / "enc", SMALL, DATA_SHA, {"epochs": 1})
    assert not encoder_matches(tmp_path / "enc", SMALL, DATA_SHA, {"epochs": 2})
    assert not encoder_matches(tmp_path / "enc", SMALL, "cd" * 32)
    assert not encoder_matches(tmp_path / "enc", VAEConfig(latent_bits=16, channels=(4, 8),
                                                           kl_weight=0.5), DATA_SHA)
    assert not encoder_matches(tmp_path / "nowhere", SMALL, DATA_SHA)
    (tmp_path / "enc" / WEIGHTS_FILE).write_bytes(b"x")
    assert not encoder_matches(tmp_path / "enc", SMALL, DATA_SHA)


def _rewrite_manifest_hash(art_dir: Path) -> None:
    import hashlib

    path = art_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["weights_sha256"] = hashlib.sha256((art_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest))
