"""Continual learning on the frozen encoder (common/bnn/continual.py and `hybnn continual`)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from common.errors import HyBNNError
from tests.conftest import REPO_ROOT, fixed_encoder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, mnist_root):
    """The fixed untrained encoder (its MNIST codes are cached once for every test) and the data root."""
    from common.encoder.artifact import load_encoder_artifact

    return load_encoder_artifact(fixed_encoder(tmp_path_factory.mktemp("enc"))), mnist_root


@pytest.fixture(scope="module")
def pairs(encoder):
    from common.bnn.continual import resolve_tasks, task_data
    from common.encoder.features import load_codes

    artifact, root = encoder
    codes = {s: load_codes(artifact, root, s, progress=False) for s in ("train", "test")}
    return task_data(codes, resolve_tasks(["0v1", "2v3", "4v5"], "mnist"))


def test_task_lists_split_on_commas_or_semicolons():
    from common.bnn.continual import split_task_list

    assert split_task_list("0v1,2v3, 4v5") == ["0v1", "2v3", "4v5"]
    assert split_task_list("0,2v1,3;4v5") == ["0,2v1,3", "4v5"]


@pytest.mark.parametrize("specs, scenarios, message", [
    ([], ("task",), "task list is empty"),
    (["0v1", ""], ("task",), "empty entry"),
    (["0v1", "2v3", "1v0"], ("task",), "repeats task '0v1'"),
    (["0v1", "1v2"], ("class",), "share class"),
    (["0v1", "3v12"], ("task",), "Unknown task '3v12'"),
])
def test_bad_task_sequences_are_refused(specs, scenarios, message):
    from common.bnn.continual import resolve_tasks

    with pytest.raises(HyBNNError, match=message):
        resolve_tasks(specs, "mnist", scenarios)


def test_overlapping_tasks_are_fine_when_the_task_is_known():
    from common.bnn.continual import resolve_tasks

    assert [t.name for t in resolve_tasks(["0v1", "1v2"], "mnist", ("task",))] == ["0v1", "1v2"]


@pytest.mark.parametrize("kwargs, message", [
    ({"replay_codes": (0, -5)}, "Replay buffer size -5"),
    ({"replay_codes": (500, 500)}, "twice"),
    ({"tasks": ()}, "task list is empty"),
    ({"epochs": 0}, "epochs"),
    ({"later_lr": -1.0}, "learning rate"),
    ({"distill": float("nan")}, "distillation weight"),
    ({"replay_flip": 0.7}, "bit-flip probability"),
    ({"input_dropout": 1.0}, "input dropout"),
    ({"input_dropout": True}, "input dropout"),
])
def test_bad_configs_are_refused(kwargs, message):
    from common.bnn.continual import ContinualConfig

    with pytest.raises(HyBNNError, match=message):
        ContinualConfig(**kwargs)


def test_input_dropout_is_part_of_the_class_recipe_only():
    from common.bnn.continual import ContinualConfig

    config = ContinualConfig(input_dropout=0.3, later_lr=0.01)
    assert config.train_config(0, "class").input_dropout == 0.3
    assert config.train_config(2, "class").lr == 0.01
    assert config.train_config(2, "task").input_dropout == 0.0  # the paper's recipe


def test_metrics_of_a_known_matrix():
    from common.bnn.continual import summarize

    m = [[0.9, 0.1, 0.0],
         [0.5, 0.8, 0.2],
         [0.7, 0.4, 0.6]]
    s = summarize(m)
    assert s["final_avg_acc"] == pytest.approx((0.7 + 0.4 + 0.6) / 3)
    assert s["avg_acc_after_each_task"] == pytest.approx([0.9, 0.65, (0.7 + 0.4 + 0.6) / 3])
    # forgetting: best earlier minus final, over tasks 0 and 1: (0.9-0.7 + 0.8-0.4)/2
    assert s["forgetting"] == pytest.approx(0.3)
    # backward transfer: final minus just-trained: (0.7-0.9 + 0.4-0.8)/2
    assert s["backward_transfer"] == pytest.approx(-0.3)
    assert summarize([[0.9, 0.8]])["forgetting"] == 0.0  # joint: one row


@pytest.mark.parametrize("strategy", ["reservoir", "balanced"])
def test_replay_buffers_keep_at_most_their_capacity_of_real_examples(strategy):
    from common.bnn.continual import ReplayBuffer

    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(60, strategy, code_bytes=25, seed=0)
    stream_codes, stream_labels = [], []
    for t in range(3):
        codes = rng.integers(0, 256, size=(500, 25), dtype=np.uint8)
        labels = rng.integers(0, 2, size=500) + 2 * t
        buffer.add_task(codes, labels)
        stream_codes.append(codes)
        stream_labels.append(labels)
        assert len(buffer) == 60 and buffer.nbytes == 60 * 26
    seen = {bytes(c): int(l) for c, l in zip(np.concatenate(stream_codes), np.concatenate(stream_labels))}
    assert all(seen[bytes(c)] == l for c, l in zip(buffer.codes, buffer.labels))  # real pairs, labels kept
    counts = np.bincount(buffer.labels, minlength=6)
    if strategy == "balanced":
        assert counts.tolist() == [10] * 6
    else:
        assert (counts > 0).all()  # in expectation 10 per class; every class is present
    replay_codes, replay_labels = buffer.balanced_replay(np.repeat([6, 7], 250))
    assert np.bincount(replay_labels).min() >= 0.5 * 250 and len(replay_codes) == len(replay_labels)
    assert len(ReplayBuffer(0, strategy, 25, 0)) == 0


def test_task_incremental_methods(pairs):
    from common.bnn.continual import ContinualConfig, run_task_incremental

    config = ContinualConfig(epochs=2, task_epochs=2)
    runs = {m: run_task_incremental(pairs, m, config, 200, progress=False)
            for m in ("finetune", "shared-multihead", "frozen-heads")}
    for run in runs.values():
        matrix = np.asarray(run["acc_matrix"])
        assert matrix.shape == (3, 3)
        assert (np.diag(matrix) > 0.85).all()  # each task learnt when it is trained
    assert runs["frozen-heads"]["forgetting"] == 0.0  # frozen once trained: nothing to forget
    # one shared head relabelled task after task forgets far more than one head per task
    assert runs["finetune"]["forgetting"] > runs["shared-multihead"]["forgetting"] + 0.1
    assert runs["frozen-heads"]["model_weights"] == 3 * runs["finetune"]["model_weights"]


def test_class_incremental_replay_beats_fine_tuning(pairs):
    from common.bnn.continual import ContinualConfig, run_class_incremental

    # two epochs on the small test encoder: too short a budget for input dropout's regularisation
    config = ContinualConfig(epochs=2, class_hidden=(128,), input_dropout=0.0)
    finetune = run_class_incremental(pairs, "finetune", config, 200, progress=False)
    replay = run_class_incremental(pairs, "replay", config, 200, replay_codes=1000, strategy="balanced",
                                   progress=False)
    joint = run_class_incremental(pairs, "joint", config, 200, progress=False)
    assert np.asarray(finetune["acc_matrix"])[-1, :2].max() < 0.2  # the earlier classes are overwritten
    assert replay["final_all_classes_acc"] > finetune["final_all_classes_acc"] + 0.3
    assert replay["replay_codes"] == 1000 and replay["replay_bytes"] == 1000 * 26
    assert len(joint["acc_matrix"]) == 1 and joint["final_avg_acc"] > 0.8


def test_cli_defaults_match_the_library():
    from common.bnn.continual import ContinualConfig
    from simulation.cli import build_parser

    args = build_parser().parse_args(["continual", "--out", "x"])
    config = ContinualConfig()
    for name in ("lr", "later_lr", "distill", "batch_size", "replay_flip", "input_dropout", "task_epochs"):
        assert getattr(args, name) == getattr(config, name), name
    assert args.class_epochs == config.epochs and args.epochs is None
    assert args.replay_codes == list(config.replay_codes)


def hybnn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulation.cli", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cli_end_to_end_writes_results_and_keeps_an_earlier_run(encoder, tmp_path):
    artifact, root = encoder
    out = tmp_path / "out"
    common = ["continual", "--encoder", str(artifact.path), "--data-root", str(root), "--out", str(out),
              "--tasks", "0v1,2v3", "--epochs", "1", "--replay-codes", "0", "200",
              "--replay-strategy", "reservoir", "--class-hidden", "64"]
    proc = hybnn(*common)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["encoder"]["sha256"] == artifact.sha256
    methods = [(r["scenario"], r["method"]) for r in results["runs"]]
    assert methods == [("task", "finetune"), ("task", "shared-multihead"), ("task", "frozen-heads"),
                       ("class", "joint"), ("class", "finetune"), ("class", "replay-reservoir")]
    for run in results["runs"]:
        for key in ("scenario", "method", "replay_codes", "replay_bytes", "acc_matrix", "final_avg_acc",
                    "forgetting"):
            assert key in run, key
        assert all(0.0 <= v <= 1.0 for row in run["acc_matrix"] for v in row)
    assert results["runs"][-1]["replay_bytes"] == 200 * 26
    for png in ("acc_matrix.png", "final_acc_vs_replay_bytes.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert "| class | replay-reservoir | 200 | 5,200 |" in (out / "report.md").read_text()

    earlier = (out / "results.json").read_bytes()
    proc = hybnn(*common[:-4], "--scenario", "task")
    assert proc.returncode == 0, proc.stderr
    kept = [d for d in out.iterdir() if d.name.startswith("replaced-")]
    assert len(kept) == 1 and (kept[0] / "results.json").read_bytes() == earlier
    assert "kept in" in proc.stdout


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "0v1,2v3,0v1"], "repeats task"),
    (["--tasks", "0v1,1v2", "--scenario", "class"], "share class"),
    (["--replay-codes", "-1"], "Replay buffer size -1"),
    (["--tasks", "0v1,3v12"], "Unknown task '3v12'"),
    (["--tasks", ","], "empty entry"),
])
def test_cli_bad_input_exits_2(encoder, tmp_path, extra, message):
    artifact, root = encoder
    proc = hybnn("continual", "--encoder", str(artifact.path), "--data-root", str(root),
                 "--out", str(tmp_path / "o"), *extra)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "results.json").exists()


def test_cli_refuses_an_encoder_of_another_input_shape(tmp_path, mnist_root):
    import torch

    from common.encoder.artifact import save_encoder_artifact
    from common.encoder.vae import BinaryVAE, VAEConfig

    torch.manual_seed(0)
    save_encoder_artifact(BinaryVAE(VAEConfig(image_shape=(32, 32, 3))).eval(), tmp_path / "enc",
                          data_sha256="0" * 64, train_config={}, history=[])
    proc = hybnn("continual", "--encoder", str(tmp_path / "enc"), "--data-root", str(mnist_root),
                 "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "takes images of 32x32" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("widths", [dict(class_hidden=(10**9,)), dict(task_hidden=(128, 10**12))])
def test_an_impossible_width_is_refused_before_any_code_is_read(widths, tmp_path, monkeypatch):
    import common.encoder.features
    from common.bnn.continual import ContinualConfig, run_continual
    from common.encoder.artifact import load_encoder_artifact

    def reached(*_args, **_kwargs):
        raise AssertionError("codes were read")

    monkeypatch.setattr(common.encoder.features, "load_codes", reached)
    artifact = load_encoder_artifact(fixed_encoder(tmp_path / "enc"))
    with pytest.raises(HyBNNError, match="of memory, but only") as refused:
        run_continual(artifact, tmp_path, ContinualConfig(tasks=("0v1", "2v3"), **widths), progress=False)
    assert "Pass smaller --hidden widths" in str(refused.value) and "\n" not in str(refused.value)
