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


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A run config, and a function that saves a real checkpoint after round 1 into a folder."""
    from common.federated import codec
    from common.bnn.model import BNN, BNNConfig
    from common.encoder.artifact import load_encoder_artifact
    from server import resume
    from server.server_app import ServerSettings

    encoder = fixed_encoder(tmp_path_factory.mktemp("enc") / "encoder")
    run_config = {"task": "0v1", "num-server-rounds": 3, "encoder-path": str(encoder)}
    artifact = load_encoder_artifact(encoder)
    config = BNNConfig.for_task(int(artifact.config.latent_bits), 2)
    layout = codec.layout_for(config)
    bnn = {"config": config.to_dict(), "binary_weights": layout.n_binary, "bn_numbers": layout.n_bn}
    ident = resume.identity(asdict(ServerSettings.from_run_config(run_config)), artifact.sha256,
                            codec.CODEC_VERSION, bnn)
    model = BNN(config)
    payload = codec.encode_signs(codec.binary_latents(model), codec.bn_vector(model, layout))

    def save(folder: Path, payload=payload) -> Path:
        resume.save_checkpoint(folder, 1, payload, ident, record={"initial": {}, "rounds": [{"round": 1}]})
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


@pytest.mark.parametrize("changes", [{"settings": [1]}, {"record": {"rounds": "abc"}}, {"record": [1]}])
def test_malformed_state_fields_are_refused(genuine, tmp_path, changes):
    run_config, save = genuine
    folder = _edit_state(save(tmp_path / "run"), **changes)
    with pytest.raises(HyBNNError):
        _resume(folder, run_config)
