"""Checkpoints, the round offset, publishing a run's folder, and resuming a run whose SuperLink was killed."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from tests.conftest import fixed_encoder

from common.errors import HyBNNError


def _identity(**changes):
    from server import resume
    from server.server_app import ServerSettings

    settings = {**asdict(ServerSettings(task="0v1", num_server_rounds=5)), **changes}
    return resume.identity(settings, "ab" * 32, 1, {"binary_weights": 10, "bn_numbers": 4})


def test_checkpoint_round_trip(tmp_path):
    from server import resume

    payload = {"bnn": np.arange(20, dtype=np.uint8)}
    resume.save_checkpoint(tmp_path, 1, payload, _identity())
    resume.save_checkpoint(tmp_path, 2, {"bnn": payload["bnn"][::-1].copy()}, _identity())
    checkpoint = resume.load_checkpoint(tmp_path)
    assert checkpoint.round == 2
    assert checkpoint.payload["bnn"].dtype == np.uint8
    np.testing.assert_array_equal(checkpoint.payload["bnn"], np.arange(20, dtype=np.uint8)[::-1])
    # Only the arrays state.json names are kept.
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["global-r0002.safetensors", "state.json"]
    resume.check_matches(checkpoint.state, _identity())


def test_damaged_or_foreign_checkpoints_are_refused(tmp_path):
    from server import resume

    resume.save_checkpoint(tmp_path, 2, {"bnn": np.zeros(8, dtype=np.uint8)}, _identity())
    state = resume.load_checkpoint(tmp_path).state
    with pytest.raises(HyBNNError, match=r"task: checkpoint '0v1', this run '4v5'.*seed: checkpoint 0, this run 7"):
        resume.check_matches(state, _identity(task="4v5", seed=7))
    other = _identity()
    other["encoder_sha256"] = "cd" * 32
    with pytest.raises(HyBNNError, match="encoder sha256"):
        resume.check_matches(state, other)
    with pytest.raises(HyBNNError, match="round 5, the last of 5"):
        resume.save_checkpoint(tmp_path, 5, {"bnn": np.zeros(8, dtype=np.uint8)}, _identity())
        resume.check_matches(resume.load_checkpoint(tmp_path).state, _identity())
    arrays = tmp_path / "checkpoint" / "global-r0005.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:-1] + b"\x01")
    with pytest.raises(HyBNNError, match="damaged"):
        resume.load_checkpoint(tmp_path)
    with pytest.raises(HyBNNError, match="No checkpoint"):
        resume.load_checkpoint(tmp_path / "elsewhere")


def test_round_offset_turns_flower_rounds_into_run_rounds():
    from server.resume import RoundOffset

    calls = []

    class Base:
        def start(self, *, num_rounds, evaluate_fn=None, **kwargs):
            for flower_round in range(0, num_rounds + 1):
                if flower_round:
                    self.configure_train(flower_round, None, None, None)
                    self.aggregate_train(flower_round, [])
                evaluate_fn(flower_round, None)

        def configure_train(self, server_round, arrays, config, grid):
            calls.append(("train", server_round))

        def aggregate_train(self, server_round, replies):
            calls.append(("aggregate", server_round))

    class Strategy(RoundOffset, Base):
        pass

    strategy = Strategy()
    strategy.round_offset = 2
    strategy.start(num_rounds=4, evaluate_fn=lambda r, a: calls.append(("evaluate", r)))
    assert calls == [("train", 3), ("aggregate", 3), ("evaluate", 3), ("train", 4), ("aggregate", 4), ("evaluate", 4)]


def test_publish_replaces_only_what_the_new_run_wrote(tmp_path):
    from simulation import runs

    out = tmp_path / "out"
    (out / "global").mkdir(parents=True)
    (out / "global" / "old.bin").write_text("old")
    (out / "results.json").write_text('{"run": "old"}')
    (out / "notes.txt").write_text("kept")
    staging = runs.staging_dir(out)
    assert staging.parent == out and staging.name.startswith(".run-")
    (staging / "global").mkdir()
    (staging / "global" / "new.bin").write_text("new")
    (staging / "results.json").write_text('{"run": "new"}')
    assert json.loads((out / "results.json").read_text())["run"] == "old"  # untouched while staging
    runs.publish(staging, out)
    assert json.loads((out / "results.json").read_text())["run"] == "new"
    assert [p.name for p in (out / "global").iterdir()] == ["new.bin"]
    assert (out / "notes.txt").read_text() == "kept"
    assert not staging.exists()


def test_resume_finds_an_unpublished_run(tmp_path):
    from server import resume
    from simulation import runs

    out = tmp_path / "out"
    resume.save_checkpoint(out, 1, {"bnn": np.zeros(8, dtype=np.uint8)}, _identity())
    cut_off = out / ".run-20260101-000000-1"
    resume.save_checkpoint(cut_off, 3, {"bnn": np.ones(8, dtype=np.uint8)}, _identity())
    assert runs.resume_source(out) == cut_off
    with pytest.raises(HyBNNError, match="No checkpoint to resume from"):
        runs.resume_source(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deploy_local_resumes_after_the_superlink_is_killed(tmp_path, mnist_root):
    """SuperLink killed after round 1 of 2, then --resume: the run ends as the uninterrupted one."""
    from simulation.deploy_local import DeployConfig, deploy_local

    common = dict(task="0v1", clients=2, rounds=2, local_epochs=1, encoder=fixed_encoder(tmp_path / "encoder"),
                  data_root=mnist_root, centralized_epochs=1, min_nodes=2, node_wait_s=30.0,
                  round_timeout_s=90.0, timeout_s=240.0, progress=False)
    whole = deploy_local(DeployConfig(**common, out=tmp_path / "whole"))
    assert whole["status"] == "finished"

    out = tmp_path / "cut"
    with pytest.raises(HyBNNError, match=r"stopped after round 1 of 2.*--resume"):
        deploy_local(DeployConfig(**common, out=out, kill_superlink_after_round=1))
    stopped = json.loads((out / "results.json").read_text())
    assert stopped["status"] == "stopped" and [r["round"] for r in stopped["rounds"]] == [1]

    with pytest.raises(HyBNNError, match="seed"):  # another run's checkpoint is refused before anything starts
        deploy_local(DeployConfig(**{**common, "seed": 1}, out=out, resume=out))

    resumed = deploy_local(DeployConfig(**common, out=out, resume=out))
    assert resumed["status"] == "finished"
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    server = json.loads((out / "server.json").read_text())
    assert server["resumed_after_rounds"] == [1]
    assert all(len(r["clients"]) == 2 for r in resumed["rounds"])
    for a, b in zip(whole["rounds"], resumed["rounds"]):
        assert abs(a["test_acc"] - b["test_acc"]) <= 0.002, (a["round"], a["test_acc"], b["test_acc"])
    # Clients' training depends only on (seed, round, partition): the same per-client losses.
    for a, b in zip(whole["rounds"][1:], resumed["rounds"][1:]):
        assert [round(c["reported"]["train_loss"], 4) for c in a["clients"]] == [round(c["reported"]["train_loss"], 4) for c in b["clients"]]
    assert not list(out.glob(".run-*"))


def test_a_checkpoint_of_another_data_set_is_refused(tmp_path):
    from server import resume

    resume.save_checkpoint(tmp_path, 2, {"bnn": np.zeros(8, dtype=np.uint8)}, _identity(dataset="fashion-mnist"))
    state = resume.load_checkpoint(tmp_path).state
    with pytest.raises(HyBNNError, match="dataset: checkpoint 'fashion-mnist', this run 'mnist'"):
        resume.check_matches(state, _identity())
    resume.check_matches(state, _identity(dataset="fashion-mnist"))
    # A checkpoint written before the data set was part of the identity was MNIST's.
    del state["settings"]["dataset"]
    resume.check_matches(state, _identity())
    with pytest.raises(HyBNNError, match="dataset: checkpoint 'mnist', this run 'fashion-mnist'"):
        resume.check_matches(state, _identity(dataset="fashion-mnist"))


@pytest.mark.parametrize("field, name, value, other, before, base", [
    ("flip_blocks", "flip-blocks", 4, 2, 1, {}),
    ("flip_block_rounds", "flip-block-rounds", 3, 0, 0, {"flip_blocks": 2}),
    ("flip_margin", "flip-margin", 0.01, 0.0, 0.0, {"flip_blocks": 1}),
])
def test_flip_settings_must_match_only_for_the_flip_uplink(tmp_path, field, name, value, other, before, base):
    """A flip-uplink checkpoint resumes only with the same flip setting; one written before the
    setting existed counts as what runs did then (``before``); the sign codec ignores flip settings."""
    from server import resume

    def flips(setting):
        return _identity(uplink_codec="flips", **base, **{field: setting})

    resume.save_checkpoint(tmp_path, 2, {"bnn": np.zeros(8, dtype=np.uint8)}, flips(value))
    state = resume.load_checkpoint(tmp_path).state
    resume.check_matches(state, flips(value))
    with pytest.raises(HyBNNError, match=f"{name}: checkpoint {value}, this run {other}"):
        resume.check_matches(state, flips(other))
    del state["settings"][field]
    resume.check_matches(state, flips(before))
    with pytest.raises(HyBNNError, match=f"{name}: checkpoint {before}, this run {value}"):
        resume.check_matches(state, flips(value))
    signs_dir = tmp_path / "signs"
    resume.save_checkpoint(signs_dir, 2, {"bnn": np.zeros(8, dtype=np.uint8)}, _identity(**{field: value}))
    resume.check_matches(resume.load_checkpoint(signs_dir).state, _identity(**{field: other}))
