"""``--resume`` of an edited or damaged checkpoint: refused before the run starts, never a traceback."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import fixed_encoder

from common.errors import HyBNNError


ROUND_1 = {"round": 1, "test_acc": 0.9, "test_loss": 0.3, "uplink_bytes": 100, "downlink_bytes": 120,
           "clients": [{"node_id": 1, "uplink_bytes": 100,
                                                                   "reported": {"partition_id": 0, "train_acc": 0.8}}], "dropped": [], "capped": [], "connected": 2,
           "sampled": [1, 2], "sampled_partitions": [0, 1], "replied": [1], "seconds": 1.5,
           "uplink_bits_per_binary_weight": 1.0, "sign_bits_per_binary_weight": 1.0, "sign_flip_fraction": None}
"""A round as the ServerApp records it."""


def _npz_data(path: Path, seed: int = 0) -> Path:
    """A small data set of 28 x 28 images, classes 0 and 1."""
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), y_train=np.arange(20) % 2,
             x_test=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), y_test=np.arange(10) % 2)
    return path


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A run config, and a function that saves a real checkpoint after round 1 into a folder."""
    from common.data.datasets import get_dataset
    from common.federated import codec
    from common.bnn.model import BNN, BNNConfig
    from common.encoder.artifact import load_encoder_artifact
    from server import resume
    from server.server_app import ServerSettings

    encoder = fixed_encoder(tmp_path_factory.mktemp("enc") / "encoder")
    data = _npz_data(tmp_path_factory.mktemp("data") / "pairs.npz")
    run_config = {"task": "0v1", "num-server-rounds": 3, "encoder-path": str(encoder), "dataset": f"npz:{data}"}
    artifact = load_encoder_artifact(encoder)
    config = BNNConfig.for_task(int(artifact.config.latent_bits), 2)
    layout = codec.layout_for(config)
    bnn = {"config": config.to_dict(), "binary_weights": layout.n_binary, "bn_numbers": layout.n_bn}
    settings = ServerSettings.from_run_config(run_config)
    ident = resume.identity(asdict(settings), artifact.sha256, codec.CODEC_VERSION, bnn,
                            get_dataset(settings.dataset).fingerprint(settings.data_root))
    model = BNN(config)
    payload = codec.encode_signs(codec.binary_latents(model), codec.bn_vector(model, layout))

    def save(folder: Path, payload=payload, record=None) -> Path:
        resume.save_checkpoint(folder, 1, payload, ident,
                               record=record or {"initial": {"test_acc": 0.5, "test_loss": 0.7}, "rounds": [ROUND_1]})
        return folder

    return run_config, save


def _edit_state(folder: Path, **changes) -> Path:
    state_path = folder / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state.update(changes)
    state_path.write_text(json.dumps(state))
    return folder


def _resume(folder: Path, run_config: dict) -> int:
    from simulation import runs

    return runs.check_resumable(runs.resume_source(folder), run_config)


def test_genuine_checkpoint_resumes(genuine, tmp_path):
    run_config, save = genuine
    assert _resume(save(tmp_path / "run"), run_config) == 1


@pytest.mark.parametrize("edited_round", [0, -2, True, 1.5, "1", None])
def test_edited_round_is_refused(genuine, tmp_path, edited_round):
    # A round below 1 would shift the run's rounds (round -2 of 3 ran 5 more rounds).
    run_config, save = genuine
    folder = _edit_state(save(tmp_path / "run"), round=edited_round)
    with pytest.raises(HyBNNError, match="names round"):
        _resume(folder, run_config)


@pytest.mark.parametrize("name", ["../../../../etc/passwd", ".", "", 7])
def test_arrays_name_outside_the_checkpoint_is_refused_unread(genuine, tmp_path, name):
    run_config, save = genuine
    folder = _edit_state(save(tmp_path / "run"), arrays=name)
    with pytest.raises(HyBNNError, match="names the arrays file"):
        _resume(folder, run_config)


def test_arrays_of_another_shape_with_a_matching_sha256_are_refused(genuine, tmp_path):
    from safetensors.numpy import save as save_arrays

    run_config, save = genuine
    folder = save(tmp_path / "run")
    state = json.loads((folder / "checkpoint" / "state.json").read_text())
    data = save_arrays({"bnn": np.zeros(5, dtype=np.uint8)})
    (folder / "checkpoint" / state["arrays"]).write_bytes(data)
    _edit_state(folder, arrays_sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(HyBNNError, match="not a global model of this run's BNN"):
        _resume(folder, run_config)


@pytest.mark.parametrize("changes", [{"saved_at": "yesterday"}, {"saved_at": [1]}])
def test_unreadable_saved_time_does_not_crash_the_search(genuine, tmp_path, changes):
    run_config, save = genuine
    folder = _edit_state(save(tmp_path / "run"), **changes)
    assert _resume(folder, run_config) == 1


@pytest.mark.parametrize("changes", [{"settings": [1]}, {"record": {"rounds": "abc"}}, {"record": [1]},
                                     {"record": {"rounds": [{"round": 1}]}}])
def test_malformed_state_fields_are_refused(genuine, tmp_path, changes):
    run_config, save = genuine
    folder = _edit_state(save(tmp_path / "run"), **changes)
    with pytest.raises(HyBNNError):
        _resume(folder, run_config)


@pytest.mark.parametrize("field, value", [
    ("test_acc", "0.9"), ("test_acc", 1.5), ("test_acc", float("nan")), ("test_loss", None), ("test_loss", -1),
    ("uplink_bytes", "100"), ("uplink_bytes", 1.5), ("uplink_bytes", True), ("downlink_bytes", -1),
    ("clients", "abc"), ("clients", [1]), ("dropped", {"a": 1}), ("capped", 3), ("sampled", 2),
    ("seconds", "soon"), ("sign_flip_fraction", 2.0), ("connected", "2"),
    ("clients", [{"uplink_bytes": 1}]), ("clients", [{"node_id": 1, "reported": {"partition_id": "a"}}]),
    ("clients", [{"node_id": 1, "reported": {"train_acc": "high"}}]), ("clients", [{"node_id": 1, "reported": 3}]),
])
def test_a_round_record_of_the_wrong_type_or_range_is_refused_before_training(genuine, tmp_path, field, value):
    """Each of these passed the checks and crashed when the results were written, after training."""
    run_config, save = genuine
    folder = save(tmp_path / "run", record={"initial": {}, "rounds": [{**ROUND_1, field: value}]})
    what = "the client" if field == "clients" and isinstance(value, list) and value != [1] else f"'{field}' = "
    with pytest.raises(HyBNNError, match=f"{what}.* in the record of round 1"):
        _resume(folder, run_config)


@pytest.mark.parametrize("record_changes", [{"initial": "abc"}, {"initial": {"test_acc": "x"}},
                                            {"resumed_after_rounds": 5}, {"resumed_after_rounds": [1]},
                                            {"resumed_after_rounds": ["1"]}])
def test_a_malformed_initial_or_resumed_record_is_refused(genuine, tmp_path, record_changes):
    run_config, save = genuine
    folder = save(tmp_path / "run", record={"initial": {}, "rounds": [ROUND_1], **record_changes})
    with pytest.raises(HyBNNError, match="edited or damaged"):
        _resume(folder, run_config)


def test_a_data_file_changed_behind_the_same_path_is_not_resumed_on(genuine, tmp_path):
    """The checkpoint records the data set's fingerprint; the run's settings only name its path."""
    run_config, save = genuine
    folder = save(tmp_path / "run")
    data = tmp_path / "pairs.npz"
    _npz_data(data)
    moved = {**run_config, "dataset": f"npz:{data}"}
    # the same content under another path is the same data; the path is a setting of its own
    with pytest.raises(HyBNNError, match="dataset"):
        _resume(folder, moved)
    original = Path(run_config["dataset"][4:])
    saved = original.read_bytes()
    try:
        _npz_data(original, seed=1)
        with pytest.raises(HyBNNError, match="data fingerprint: checkpoint"):
            _resume(folder, run_config)
    finally:
        original.write_bytes(saved)
    assert _resume(folder, run_config) == 1
