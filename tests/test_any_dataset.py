"""A data set is one entry: a new one, of another shape, registered through the public
API alone, goes through pretrain, extract, train and a two-client federation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from common.data.datasets import DatasetSpec, Source, register_dataset, unregister_dataset

NAME = "squares16"
CLASSES = ("north-west", "north-east", "south-west", "south-east")


@pytest.fixture
def squares16():
    """16 x 16 RGB images: class c has a bright 8 x 8 square in quadrant c, in channel c % 3."""

    def make(_data_root):  # nested, so the simulation carries it to its clients by value
        rng = np.random.default_rng(0)

        def split(n):
            labels = np.arange(n) % 4
            images = rng.integers(0, 60, size=(n, 16, 16, 3), dtype=np.uint8)
            for i, c in enumerate(labels):
                row, col = divmod(int(c), 2)
                images[i, row * 8:row * 8 + 8, col * 8:col * 8 + 8, c % 3] = 230
            return images, labels

        return (*split(512), *split(128))

    register_dataset(DatasetSpec(NAME, (16, 16, 3), CLASSES, (Source("made by the test", make),)))
    yield NAME
    unregister_dataset(NAME)


@pytest.mark.slow
def test_a_registered_dataset_of_another_shape_runs_every_stage(tmp_path, squares16, capsys, monkeypatch):
    from common.bnn.store import load_bnn
    from common.data.datasets import get_dataset
    from common.encoder.artifact import load_encoder_artifact
    from common.encoder.features import cache_path
    from simulation.cli import main

    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    root, encoder = tmp_path / "data", tmp_path / "encoder"
    common = ["--dataset", squares16, "--data-root", str(root)]

    assert main(["pretrain", *common, "--epochs", "1", "--out", str(encoder)]) == 0
    artifact = load_encoder_artifact(encoder)
    fingerprint = get_dataset(squares16).fingerprint(root)
    assert artifact.manifest["datasets"] == [squares16]
    assert artifact.manifest["input_shape"] == [16, 16, 3]
    assert artifact.manifest["data_fingerprints"] == {squares16: fingerprint}
    assert artifact.config.image_shape == (16, 16, 3)

    assert main(["extract", *common, "--encoder", str(encoder)]) == 0
    assert "train: 512 codes of 25 bytes" in capsys.readouterr().out
    assert cache_path(artifact, root, "train", fingerprint).exists()

    bnn = tmp_path / "bnn"
    assert main(["train", *common, "--encoder", str(encoder), "--task", "north-west,north-east v south-west,south-east",
                 "--epochs", "3", "--out", str(bnn)]) == 0
    meta = load_bnn(bnn)[1]["meta"]
    assert meta["dataset"] == squares16 and meta["groups"] == [[0, 1], [2, 3]]
    assert meta["class_names"] == ["north-west+north-east", "south-west+south-east"]
    assert 0.0 <= meta["test_acc"] <= 1.0

    out = tmp_path / "federated"
    assert main(["federate", *common, "--encoder", str(encoder), "--task", "0v3", "--clients", "2",
                 "--rounds", "1", "--local-epochs", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dataset"] == squares16
    assert results["task"]["class_names"] == ["north-west", "south-east"]
    assert results["status"] == "finished" and len(results["rounds"]) == 1
    (only,) = results["rounds"]
    assert {c["reported"]["partition_id"] for c in only["clients"]} == {0, 1} and not only["dropped"]
    assert 0.0 <= only["test_acc"] <= 1.0
    server = json.loads((out / "server.json").read_text())
    assert server["run_config"]["dataset"] == squares16
    assert server["task"]["groups"] == [[0], [3]]
    global_meta = load_bnn(out / "global")[1]["meta"]
    assert global_meta["dataset"] == squares16 and global_meta["class_names"] == ["north-west", "south-east"]
