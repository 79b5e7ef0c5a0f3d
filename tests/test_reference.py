"""The federated run's centralized reference is kept by what determines it and reused."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from simulation.federate import FederateConfig, centralized_reference


@pytest.fixture
def data_root(mnist_encoder, tmp_path: Path) -> Path:
    """A private copy of the data root's MNIST files and cached codes, so references start empty."""
    artifact, root = mnist_encoder
    copy = tmp_path / "data"
    shutil.copytree(root / "MNIST", copy / "MNIST")
    shutil.copytree(root / "features" / artifact.sha256, copy / "features" / artifact.sha256)
    return copy


def _config(artifact, data_root: Path, **changes) -> FederateConfig:
    values = dict(encoder=artifact.path, data_root=data_root, task="4v5", rounds=2, local_epochs=1,
                  batch_size=256, progress=False)
    return FederateConfig(**{**values, **changes})


def test_the_second_run_reuses_the_reference_and_a_change_trains_anew(mnist_encoder, data_root, caplog):
    artifact, _ = mnist_encoder
    first = centralized_reference(artifact, _config(artifact, data_root))
    assert first["reused"] is False and Path(first["reference_file"]).is_file()
    second = centralized_reference(artifact, _config(artifact, data_root))
    assert second["reused"] is True
    assert second["test_acc"] == first["test_acc"] and second["train_seconds"] == first["train_seconds"]

    for change in ({"seed": 1}, {"lr": 0.05}, {"task": "2v3"}, {"rounds": 3}):
        other = centralized_reference(artifact, _config(artifact, data_root, **change))
        assert other["reused"] is False, change
    assert len(list((data_root / "references").glob("*.json"))) == 5


@pytest.mark.parametrize("tamper", [
    lambda r: r["result"].update(test_acc=2.0),
    lambda r: r["result"].update(epochs="2"),
    lambda r: r["result"].pop("test_loss"),
    lambda r: r.update(key="0" * 64),
    lambda r: r.update(result=[]),
])
def test_a_tampered_reference_is_ignored_and_trained_again(mnist_encoder, data_root, caplog, tamper):
    artifact, _ = mnist_encoder
    first = centralized_reference(artifact, _config(artifact, data_root))
    path = Path(first["reference_file"])
    record = json.loads(path.read_text())
    tamper(record)
    path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="common.bnn.reference"):
        again = centralized_reference(artifact, _config(artifact, data_root))
    assert again["reused"] is False and again["test_acc"] == first["test_acc"]
    assert "Ignoring the centralized reference" in caplog.text
    assert centralized_reference(artifact, _config(artifact, data_root))["reused"] is True


def test_a_reference_that_cannot_be_read_is_trained_again(mnist_encoder, data_root, caplog):
    artifact, _ = mnist_encoder
    path = Path(centralized_reference(artifact, _config(artifact, data_root))["reference_file"])
    path.write_bytes(b"\xff{")
    with caplog.at_level(logging.WARNING, logger="common.bnn.reference"):
        assert centralized_reference(artifact, _config(artifact, data_root))["reused"] is False
    assert "could not be read" in caplog.text
