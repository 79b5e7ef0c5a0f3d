"""Feature extraction: packed codes, and the on-disk cache keyed by the encoder's hash."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import common.encoder.features as features
from common.encoder.artifact import EncoderArtifact, save_encoder_artifact
from common.encoder.features import cache_path, encode_images, load_codes
from common.packing import unpack_bits
from common.encoder.vae import BinaryVAE, VAEConfig, images_to_tensor


def fake_mnist(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n).astype(np.int64))


@pytest.fixture()
def fake_data(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Replace MNIST with a small fake set and count how often it is read."""
    calls = {"encode": 0}
    data = fake_mnist()
    monkeypatch.setattr(features, "load_mnist", lambda root, split: data)
    real_encode = features.encode_images

    def counting_encode(*args, **kwargs):
        calls["encode"] += 1
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(features, "encode_images", counting_encode)
    return calls


def make_artifact(path: Path, seed: int = 0) -> EncoderArtifact:
    torch.manual_seed(seed)
    return save_encoder_artifact(BinaryVAE(VAEConfig()).eval(), path, data_sha256="0" * 64,
                                 train_config={}, history=[])


def test_default_codes_are_25_bytes_and_match_the_logit_signs() -> None:
    torch.manual_seed(0)
    encoder = BinaryVAE(VAEConfig()).encoder.eval()
    imgs, _ = fake_mnist(10)
    codes = encode_images(encoder, imgs, batch_size=3, progress=False)
    assert codes.dtype == np.uint8 and codes.shape == (10, 25)
    with torch.no_grad():
        logits = encoder(images_to_tensor(imgs))
    assert np.array_equal(unpack_bits(codes, 200).astype(bool), (logits >= 0).numpy())


def test_encode_images_restores_training_mode_and_handles_empty() -> None:
    encoder = BinaryVAE(VAEConfig()).encoder.train()
    assert encode_images(encoder, np.zeros((0, 28, 28), np.uint8), progress=False).shape == (0, 25)
    assert encoder.training


def test_cache_is_keyed_by_encoder_hash(tmp_path: Path, fake_data: dict) -> None:
    art_a = make_artifact(tmp_path / "a", seed=0)
    art_b = make_artifact(tmp_path / "b", seed=1)
    codes_a, labels = load_codes(art_a, tmp_path / "data", "train", progress=False)
    assert codes_a.shape == (40, 25) and labels.dtype == np.int64
    assert cache_path(art_a, tmp_path / "data", "train") == (
        tmp_path / "data" / "features" / art_a.sha256 / "train.npz")
    assert cache_path(art_a, tmp_path / "data", "train").exists()
    assert fake_data["encode"] == 1

    again, _ = load_codes(art_a, tmp_path / "data", "train", progress=False)
    assert np.array_equal(again, codes_a) and fake_data["encode"] == 1  # from the cache

    codes_b, _ = load_codes(art_b, tmp_path / "data", "train", progress=False)
    assert fake_data["encode"] == 2  # a new encoder never reuses old codes
    assert not np.array_equal(codes_b, codes_a)
    assert cache_path(art_b, tmp_path / "data", "train").exists()


def write_cache_file(path: Path, codes: np.ndarray, labels: np.ndarray, digest: str | None = None) -> None:
    """A cache file in the current format, made by the encoder of its folder from the fake data;
    ``digest`` defaults to the one of its contents."""
    from common.data.mnist import dataset_sha256

    architecture = json.dumps(VAEConfig().to_dict(), sort_keys=True)  # make_artifact's
    np.savez(path, codes=codes, labels=labels, version=np.int64(features.CACHE_FORMAT_VERSION),
             sha256=np.str_(digest or features.cache_digest(codes, labels)), architecture=np.str_(architecture),
             encoder_sha256=np.str_(path.parent.name), data_sha256=np.str_(dataset_sha256(*fake_mnist())))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-shape", "wrong-dtype",
                                    "rewritten-codes", "no-hash", "old-version"])
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path: Path, fake_data: dict, damage: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    art = make_artifact(tmp_path / "a")
    codes, labels = load_codes(art, tmp_path / "data", "test", progress=False)
    path = cache_path(art, tmp_path / "data", "test")
    if damage == "garbage":
        path.write_bytes(b"not a numpy file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    elif damage == "wrong-shape":
        write_cache_file(path, codes[:, :10], labels)
    elif damage == "wrong-dtype":
        write_cache_file(path, codes.astype(np.int32), labels)
    elif damage == "rewritten-codes":  # right shape, dtype and labels; the recorded hash is the old one
        write_cache_file(path, codes ^ np.uint8(0xFF), labels, digest=features.cache_digest(codes, labels))
    elif damage == "no-hash":
        np.savez(path, codes=codes ^ np.uint8(1), labels=labels, version=np.int64(features.CACHE_FORMAT_VERSION))
    else:
        np.savez(path, codes=codes, labels=labels, version=np.int64(1))
    with caplog.at_level(logging.WARNING, logger="common.encoder.features"):
        rebuilt, _ = load_codes(art, tmp_path / "data", "test", progress=False)
    assert np.array_equal(rebuilt, codes)
    assert fake_data["encode"] == 2
    assert str(path) in caplog.text and "rebuilding" in caplog.text
    if damage == "rewritten-codes":
        assert "was changed after it was written" in caplog.text
    # The rebuilt file is good again.
    assert np.array_equal(load_codes(art, tmp_path / "data", "test", progress=False)[0], codes)
    assert fake_data["encode"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["test.npz"]


def test_a_cache_file_copied_from_another_encoders_folder_is_not_used(
        tmp_path: Path, fake_data: dict, caplog: pytest.LogCaptureFixture) -> None:
    """Same architecture, same data, a valid file: only the encoder's sha256 inside it tells it apart."""
    art_a = make_artifact(tmp_path / "a", seed=0)
    art_b = make_artifact(tmp_path / "b", seed=1)
    codes_a, _ = load_codes(art_a, tmp_path / "data", "test", progress=False)
    path_a, path_b = (cache_path(art, tmp_path / "data", "test") for art in (art_a, art_b))
    path_b.parent.mkdir(parents=True)
    path_b.write_bytes(path_a.read_bytes())
    with caplog.at_level(logging.WARNING, logger="common.encoder.features"):
        codes_b, _ = load_codes(art_b, tmp_path / "data", "test", progress=False)
    assert fake_data["encode"] == 2  # recomputed, not read
    assert not np.array_equal(codes_b, codes_a)
    assert str(path_b) in caplog.text and art_a.sha256 in caplog.text and "copied or moved" in caplog.text
    assert np.array_equal(load_codes(art_a, tmp_path / "data", "test", progress=False)[0], codes_a)
    assert fake_data["encode"] == 2  # A's own file is untouched and still used


def test_a_cache_file_of_other_data_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 fake_data: dict, caplog: pytest.LogCaptureFixture) -> None:
    """The data behind the same path changed (same labels, other images): the codes are recomputed."""
    art = make_artifact(tmp_path / "a")
    codes, labels = load_codes(art, tmp_path / "data", "test", progress=False)
    images, _ = fake_mnist()
    monkeypatch.setattr(features, "load_mnist", lambda root, split: (255 - images, labels))
    with caplog.at_level(logging.WARNING, logger="common.encoder.features"):
        recoded, _ = load_codes(art, tmp_path / "data", "test", progress=False)
    assert fake_data["encode"] == 2 and not np.array_equal(recoded, codes)
    assert "encodes the data with sha256" in caplog.text


def test_inference_encoder_matches_the_training_form() -> None:
    from common.encoder.features import InferenceEncoder

    torch.manual_seed(0)
    encoder = BinaryVAE(VAEConfig()).encoder
    encoder.train()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for _ in range(3):
            encoder(torch.rand(64, 1, 28, 28))
    encoder.eval()
    x = images_to_tensor(fake_mnist(64)[0])
    with torch.no_grad():
        assert torch.allclose(InferenceEncoder(encoder)(x), encoder(x), atol=1e-5)


def test_an_unwritable_cache_is_skipped_with_a_warning(tmp_path: Path, fake_data: dict,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A data root where the cache cannot go (here: its folder is a file) still gives the codes."""
    art = make_artifact(tmp_path / "a")
    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / "features").write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="common.encoder.features"):
        codes, _ = load_codes(art, data_root, "test", progress=False)
    assert codes.shape == (40, 25)
    assert "Feature cache not written" in caplog.text and "features" in caplog.text
    assert (data_root / "features").read_text().startswith("a file")


def test_another_slope_over_the_same_tensors_is_another_encoder(tmp_path: Path, fake_data: dict) -> None:
    """The same tensors, another activation slope: other codes, so another sha256 and cache folder; a cache
    file in that folder that records another architecture is rebuilt."""
    torch.manual_seed(0)
    plain = save_encoder_artifact(BinaryVAE(VAEConfig()).eval(), tmp_path / "a", data_sha256="0" * 64,
                                  train_config={}, history=[])
    torch.manual_seed(0)
    steep = save_encoder_artifact(BinaryVAE(VAEConfig(leaky_slope=0.9)).eval(), tmp_path / "b",
                                  data_sha256="0" * 64, train_config={}, history=[])
    assert all(torch.equal(a, b) for a, b in zip(plain.encoder.state_dict().values(),
                                                 steep.encoder.state_dict().values()))
    assert steep.sha256 != plain.sha256
    assert cache_path(steep, tmp_path / "data", "test") != cache_path(plain, tmp_path / "data", "test")
    codes, labels = load_codes(plain, tmp_path / "data", "test", progress=False)
    recoded, _ = load_codes(steep, tmp_path / "data", "test", progress=False)
    assert fake_data["encode"] == 2
    assert not np.array_equal(recoded, codes)

    images, _ = fake_mnist()
    features._write_cache(cache_path(steep, tmp_path / "data", "test"), codes, labels,
                          features.CacheKey(steep.sha256, features.cache_architecture(plain),
                                            features.dataset_sha256(images, labels)))
    again, _ = load_codes(steep, tmp_path / "data", "test", progress=False)
    assert fake_data["encode"] == 3 and np.array_equal(again, recoded)


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), -0.1, 1.0])
def test_a_manifest_slope_outside_its_range_is_refused(tmp_path: Path, slope: float) -> None:
    from common.encoder.artifact import load_encoder_artifact
    from common.errors import HyBNNError

    make_artifact(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["architecture"]["leaky_slope"] = slope
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HyBNNError, match="leaky_slope"):
        load_encoder_artifact(tmp_path / "a")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "folder", "dead-link"])
def test_a_cache_that_is_not_a_regular_file_is_replaced_not_read(tmp_path: Path, fake_data: dict, kind: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Reading a pipe would block for ever; a folder or a dead link is not a cache either."""
    import os

    art = make_artifact(tmp_path / "a")
    path = cache_path(art, tmp_path / "data", "test")
    path.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "gone")
    with caplog.at_level(logging.WARNING, logger="common.encoder.features"):
        codes, _ = load_codes(art, tmp_path / "data", "test", progress=False)
    assert codes.shape[1] == 25 and fake_data["encode"] == 1
    assert str(path) in caplog.text
    if kind != "folder":  # a folder cannot be replaced by a file; the codes are returned all the same
        assert path.is_file() and not path.is_symlink()
