"""The encoder's identity (the weights file's sha256) covers every manifest field that changes what it
computes: an edited manifest is refused naming the field, an earlier artifact is refused naming
`hybnn upgrade-encoder`, and the upgrade keeps the tensors, the codes and the earlier files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from common.encoder.artifact import (MANIFEST_FILE, METADATA_KEY, WEIGHTS_FILE, EncoderUpgradeNeeded,
                                     encoder_matches, load_encoder_artifact, save_encoder_artifact)
from common.encoder.features import encode_images
from common.encoder.vae import BinaryVAE, VAEConfig
from common.errors import HyBNNError

SMALL = VAEConfig(latent_bits=16, channels=(4, 8))
DATA_SHA = "ab" * 32
TRAIN = {"epochs": 3, "batch_size": 256, "lr": 0.002, "final_lr_fraction": 0.05, "seed": 0, "input_shift": 2}


def make_artifact(out: Path, config: VAEConfig = SMALL, seed: int = 0):
    torch.manual_seed(seed)
    vae = BinaryVAE(config)
    vae.train()
    with torch.no_grad():  # batch-norm statistics that are not the defaults, so a lost buffer changes the codes
        vae.encoder(torch.rand(64, config.in_channels, *config.image_shape[:2]))
    return save_encoder_artifact(vae.eval(), out, data_sha256=DATA_SHA, train_config=TRAIN,
                                 history=[{"epoch": 1, "loss": 1.0, "seconds": 2.0}],
                                 data_fingerprints={"mnist": "cd" * 32})


def edit_manifest(art_dir: Path, edit) -> None:
    path = art_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def rewrite_weights(art_dir: Path, metadata: dict[str, str] | None) -> str:
    """The same tensors under other metadata; the manifest's weights_sha256 follows. Returns the new sha256."""
    path = art_dir / WEIGHTS_FILE
    data = save(load_file(str(path)), metadata=metadata)
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    edit_manifest(art_dir, lambda m: m.update(weights_sha256=sha))
    return sha


def make_earlier_artifact(out: Path) -> str:
    """An artifact as hybnn wrote it before the weights file recorded the manifest; returns its sha256."""
    make_artifact(out)
    return rewrite_weights(out, {"format": "hybnn-encoder"})


def real_images(mnist_root: Path, n: int = 1000) -> np.ndarray:
    from common.data.mnist import load_mnist

    return load_mnist(mnist_root, "test")[0][:n]


def test_the_weights_file_records_the_manifest_fields_and_the_same_encoder_has_one_sha(tmp_path: Path) -> None:
    first, second = make_artifact(tmp_path / "a"), make_artifact(tmp_path / "b")
    assert first.sha256 == second.sha256  # one metadata entry: several are written in a random order
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / WEIGHTS_FILE), "pt") as f:
        record = json.loads(f.metadata()[METADATA_KEY])
    assert record["architecture"] == {**SMALL.to_dict(), "code_rotation": "none"}
    assert record["train_config"] == TRAIN and record["data_sha256"] == DATA_SHA
    assert record["datasets"] == ["mnist"] and record["data_fingerprints"] == {"mnist": "cd" * 32}
    assert "history" not in record and "created" not in record
    assert make_artifact(tmp_path / "c", VAEConfig(latent_bits=16, channels=(4, 8), leaky_slope=0.1)).sha256 \
        != first.sha256


@pytest.mark.parametrize("field, edit, values", [
    ("architecture.leaky_slope", lambda m: m["architecture"].update(leaky_slope=0.9), ("0.9", "0.2")),
    ("architecture.kl_weight", lambda m: m["architecture"].update(kl_weight=0.1), ("0.1", "1.0")),
    ("architecture.variant", lambda m: m["architecture"].update(variant="deterministic-ste"),
     ('"deterministic-ste"', '"bernoulli-ste"')),
    ("architecture.code_rotation", lambda m: m["architecture"].update(code_rotation="itq"), ('"itq"', '"none"')),
    ("architecture.image_shape", lambda m: m["architecture"].update(image_shape=[28, 28, 3]),
     ("[28,28,3]", "[28,28,1]")),
    ("architecture.channels", lambda m: m["architecture"].update(channels=[4, 9]), ("[4,9]", "[4,8]")),
    ("architecture.latent_bits", lambda m: (m["architecture"].update(latent_bits=24), m.update(latent_bits=24)),
     ("24", "16")),
    ("variant", lambda m: m.update(variant="deterministic-ste"), ('"deterministic-ste"', '"bernoulli-ste"')),
    ("input_shape", lambda m: m.update(input_shape=[32, 32, 1]), ("[32,32,1]", "[28,28,1]")),
    ("data_sha256", lambda m: m.update(data_sha256="ef" * 32), (f'"{"ef" * 32}"', f'"{DATA_SHA}"')),
    ("datasets", lambda m: m.update(datasets=["fashion-mnist"]), ('["fashion-mnist"]', '["mnist"]')),
    ("data_fingerprints.mnist", lambda m: m.update(data_fingerprints={"mnist": "00" * 32}),
     (f'"{"00" * 32}"', f'"{"cd" * 32}"')),
    ("train_config.epochs", lambda m: m["train_config"].update(epochs=20), ("20", "3")),
    ("train_config.input_shift", lambda m: m["train_config"].pop("input_shift"), ("nothing", "2")),
])
def test_an_edited_manifest_field_is_refused_naming_it_and_both_values(tmp_path: Path, field, edit, values) -> None:
    make_artifact(tmp_path / "enc")
    edit_manifest(tmp_path / "enc", edit)
    with pytest.raises(HyBNNError) as err:
        load_encoder_artifact(tmp_path / "enc")
    message = str(err.value)
    ours, theirs = values
    assert f"{field}: the manifest says {ours}, the weights file records {theirs}" in message, message
    assert str(tmp_path / "enc" / MANIFEST_FILE) in message and "Traceback" not in message


def test_fields_outside_the_record_may_change(tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path / "enc")
    edit_manifest(tmp_path / "enc", lambda m: m.update(history=[], created="then", torch_version="0", note="hi"))
    assert load_encoder_artifact(tmp_path / "enc", expected_sha256=artifact.sha256).manifest["note"] == "hi"


def test_an_edited_record_changes_the_sha256(tmp_path: Path, mnist_root: Path) -> None:
    """The same tensors with another slope recorded: another sha256, refused under the old manifest,
    and, with the manifest edited to match, another encoder with other codes and another cache folder."""
    from safetensors import safe_open

    from common.encoder.features import cache_path

    artifact = make_artifact(tmp_path / "enc")
    with safe_open(str(tmp_path / "enc" / WEIGHTS_FILE), "pt") as f:
        record = json.loads(f.metadata()[METADATA_KEY])
    record["architecture"]["leaky_slope"] = 0.9
    new_sha = rewrite_weights(tmp_path / "enc", {METADATA_KEY: json.dumps(record)})
    assert new_sha != artifact.sha256
    with pytest.raises(HyBNNError, match="architecture.leaky_slope: the manifest says 0.2, the weights file records 0.9"):
        load_encoder_artifact(tmp_path / "enc")
    edit_manifest(tmp_path / "enc", lambda m: m["architecture"].update(leaky_slope=0.9))
    edited = load_encoder_artifact(tmp_path / "enc")
    assert edited.sha256 == new_sha and edited.config.leaky_slope == 0.9
    assert cache_path(edited, tmp_path, "test") != cache_path(artifact, tmp_path, "test")
    images = real_images(mnist_root)
    assert not np.array_equal(encode_images(edited.encoder, images, progress=False),
                              encode_images(artifact.encoder, images, progress=False))


def test_a_record_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    make_artifact(tmp_path / "enc")
    rewrite_weights(tmp_path / "enc", {METADATA_KEY: "{not json"})
    with pytest.raises(HyBNNError, match=f"{WEIGHTS_FILE} hold a 'hybnn-encoder' metadata entry that this hybnn cannot read"):
        load_encoder_artifact(tmp_path / "enc")


def test_an_earlier_artifact_is_refused_naming_the_upgrade(tmp_path: Path) -> None:
    old_sha = make_earlier_artifact(tmp_path / "enc")
    for expected in (None, old_sha, "0" * 64):
        with pytest.raises(EncoderUpgradeNeeded) as err:
            load_encoder_artifact(tmp_path / "enc", expected_sha256=expected)
        assert f"hybnn upgrade-encoder {tmp_path / 'enc'}" in str(err.value)
    # reproduce would reuse it: it is told to upgrade it rather than train a new one for minutes
    with pytest.raises(EncoderUpgradeNeeded):
        encoder_matches(tmp_path / "enc", SMALL, DATA_SHA, TRAIN)
    assert not encoder_matches(tmp_path / "enc", SMALL, "ef" * 32, TRAIN)


def test_the_cli_refuses_an_earlier_artifact_with_the_upgrade_command(tmp_path: Path, capsys) -> None:
    from simulation.cli import main

    make_earlier_artifact(tmp_path / "enc")
    assert main(["extract", "--encoder", str(tmp_path / "enc"), "--data-root", str(tmp_path / "data")]) == 2
    assert f"`hybnn upgrade-encoder {tmp_path / 'enc'}`" in capsys.readouterr().err


def test_upgrade_keeps_tensors_codes_and_the_earlier_files(tmp_path: Path, mnist_root: Path, capsys) -> None:
    from simulation.cli import main

    art = tmp_path / "enc"
    old_sha = make_earlier_artifact(art)
    before = {name: (art / name).read_bytes() for name in (WEIGHTS_FILE, MANIFEST_FILE)}
    old_tensors = load_file(str(art / WEIGHTS_FILE))
    old_encoder = BinaryVAE(SMALL).encoder
    old_encoder.load_state_dict(old_tensors)

    assert main(["upgrade-encoder", str(art)]) == 0
    out = capsys.readouterr().out
    upgraded = load_encoder_artifact(art)
    assert upgraded.sha256 != old_sha
    assert f"sha256 {old_sha} (old) -> {upgraded.sha256} (new)" in out
    assert upgraded.manifest["upgraded_from_sha256"] == old_sha
    new_tensors = load_file(str(art / WEIGHTS_FILE))
    assert new_tensors.keys() == old_tensors.keys()
    assert all(new_tensors[k].dtype == old_tensors[k].dtype and torch.equal(new_tensors[k], old_tensors[k])
               for k in old_tensors)
    images = real_images(mnist_root)
    assert np.array_equal(encode_images(upgraded.encoder, images, progress=False),
                          encode_images(old_encoder, images, progress=False))
    kept = [p for p in art.iterdir() if p.name.startswith("replaced-")]
    assert len(kept) == 1 and f"kept in {kept[0]}" in out
    assert {name: (kept[0] / name).read_bytes() for name in before} == before
    # every other manifest field is as it was
    old_manifest = json.loads(before[MANIFEST_FILE])
    assert {k: v for k, v in upgraded.manifest.items() if k not in ("weights_sha256", "upgraded_from_sha256")} \
        == {k: v for k, v in old_manifest.items() if k != "weights_sha256"}

    assert main(["upgrade-encoder", str(art)]) == 0  # a second time: nothing to do
    assert "nothing was written" in capsys.readouterr().out
    assert load_encoder_artifact(art).sha256 == upgraded.sha256
    assert len([p for p in art.iterdir() if p.name.startswith("replaced-")]) == 1


def test_upgrade_into_another_folder_leaves_the_source_and_keeps_what_was_there(tmp_path: Path, capsys) -> None:
    from simulation.cli import main

    old_sha = make_earlier_artifact(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    other = make_artifact(tmp_path / "new", seed=1)
    assert main(["upgrade-encoder", str(tmp_path / "old" / MANIFEST_FILE), "--out", str(tmp_path / "new")]) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    upgraded = load_encoder_artifact(tmp_path / "new")
    assert upgraded.manifest["upgraded_from_sha256"] == old_sha
    kept = [p for p in (tmp_path / "new").iterdir() if p.name.startswith("replaced-")]
    assert len(kept) == 1 and load_encoder_artifact(kept[0]).sha256 == other.sha256
    assert f"sha256 {old_sha} (old) -> {upgraded.sha256} (new)" in capsys.readouterr().out


def test_a_damaged_artifact_is_not_upgraded(tmp_path: Path, capsys) -> None:
    from simulation.cli import main

    make_earlier_artifact(tmp_path / "enc")
    edit_manifest(tmp_path / "enc", lambda m: m.update(weights_sha256="0" * 64))
    before = {p.name: p.read_bytes() for p in (tmp_path / "enc").iterdir()}
    assert main(["upgrade-encoder", str(tmp_path / "enc")]) == 2
    assert "truncated, damaged or was replaced" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "enc").iterdir()} == before
    assert main(["upgrade-encoder", str(tmp_path / "enc" / MANIFEST_FILE)]) == 2  # its manifest, in place
    assert {p.name: p.read_bytes() for p in (tmp_path / "enc").iterdir()} == before


def test_caches_and_checkpoints_of_the_old_sha256_give_their_messages(tmp_path: Path, mnist_root: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A feature cache copied from the old sha256's folder is rebuilt (with the same codes), and a
    checkpoint taken with the old sha256 is refused, naming both."""
    import logging
    from dataclasses import asdict

    from common.data.mnist import dataset_sha256, load_mnist
    from common.encoder.artifact import upgrade_encoder_artifact
    from common.encoder.features import CacheKey, _write_cache, cache_architecture, cache_path, load_codes
    from server import resume
    from server.server_app import ServerSettings

    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / "MNIST").symlink_to(Path(mnist_root).resolve() / "MNIST")
    old_sha = make_earlier_artifact(tmp_path / "enc")
    old_encoder = BinaryVAE(SMALL).encoder
    old_encoder.load_state_dict(load_file(str(tmp_path / "enc" / WEIGHTS_FILE)))
    upgrade = upgrade_encoder_artifact(tmp_path / "enc")
    artifact = load_encoder_artifact(tmp_path / "enc")

    images, labels = load_mnist(data_root, "test")
    old_codes = encode_images(old_encoder, images, progress=False)
    old_cache = data_root / "features" / old_sha / "test.npz"  # as the earlier encoder's load_codes wrote it
    _write_cache(old_cache, old_codes, labels,
                 CacheKey(old_sha, cache_architecture(artifact), dataset_sha256(images, labels)))
    new_cache = cache_path(artifact, data_root, "test")
    assert new_cache != old_cache
    new_cache.parent.mkdir(parents=True)
    new_cache.write_bytes(old_cache.read_bytes())
    with caplog.at_level(logging.WARNING, logger="common.encoder.features"):
        codes, _ = load_codes(artifact, data_root, "test", progress=False)
    assert f"computed by the encoder with sha256 {old_sha}, not by this folder's encoder {artifact.sha256}" \
        in caplog.text
    assert np.array_equal(codes, old_codes)

    settings = asdict(ServerSettings(task="0v1", num_server_rounds=5))
    bnn = {"binary_weights": 10, "bn_numbers": 4}
    resume.save_checkpoint(tmp_path / "run", 2, {"bnn": np.zeros(8, dtype=np.uint8)},
                           resume.identity(settings, old_sha, 1, bnn))
    with pytest.raises(HyBNNError, match=f"encoder sha256: checkpoint '{old_sha}', this run '{upgrade.new_sha256}'"):
        resume.check_matches(resume.load_checkpoint(tmp_path / "run").state,
                             resume.identity(settings, upgrade.new_sha256, 1, bnn))


def test_help_lists_the_upgrade_command() -> None:
    import contextlib
    import io

    from simulation.cli import main

    for argv in (["--help"], ["upgrade-encoder", "--help"]):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
            main(argv)
        assert "upgrade-encoder" in buffer.getvalue()
    assert "--out NEW" in buffer.getvalue() and "replaced-TIME" in buffer.getvalue()


def test_the_paper_profile_asks_to_upgrade_its_earlier_encoder_and_then_reuses_it(tmp_path: Path, mnist_root: Path,
                                                                                monkeypatch) -> None:
    """An earlier artifact that matches the profile is not trained anew for minutes: reproduce names
    the upgrade, and reuses the upgraded encoder."""
    import common.encoder.vae as vae_module
    from common.encoder.artifact import upgrade_encoder_artifact
    from common.encoder.vae import VAETrainConfig
    from common.experiments.profiles import PROFILES
    from simulation.reproduce import encoder_training_images, ensure_encoder

    profile = PROFILES["paper"]
    _, _, data_sha = encoder_training_images("mnist", mnist_root)
    torch.manual_seed(0)
    save_encoder_artifact(BinaryVAE(VAEConfig()).eval(), tmp_path / "encoder-paper", data_sha256=data_sha,
                          train_config=VAETrainConfig(epochs=profile.vae_epochs,
                                                      input_shift=profile.vae_input_shift).to_dict(),
                          history=[])
    old_sha = rewrite_weights(tmp_path / "encoder-paper", {"format": "hybnn-encoder"})

    def no_training(*args, **kwargs):
        raise AssertionError("the matching encoder was trained anew")

    monkeypatch.setattr(vae_module, "train_vae", no_training)
    with pytest.raises(EncoderUpgradeNeeded, match="hybnn upgrade-encoder"):
        ensure_encoder(profile, tmp_path / "encoder-paper", mnist_root, say=lambda _: None)
    upgrade = upgrade_encoder_artifact(tmp_path / "encoder-paper")
    artifact, info = ensure_encoder(profile, tmp_path / "encoder-paper", mnist_root, say=lambda _: None)
    assert info["reused"] and artifact.sha256 == info["sha256"] == upgrade.new_sha256 != old_sha
