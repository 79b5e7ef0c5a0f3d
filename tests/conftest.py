"""Shared fixtures. Tests that need real MNIST share the repository's data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def flower_task_identity():
    """Flower stamps messages with the identity of the running task; give a test one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def fixed_encoder(path: Path) -> Path:
    """An untrained encoder with fixed weights: the same artifact (and sha256) in every
    test that uses it, so its MNIST codes are computed once and then read from the cache."""
    import torch

    from common.encoder.artifact import save_encoder_artifact
    from common.encoder.vae import BinaryVAE, VAEConfig

    torch.manual_seed(1234)
    save_encoder_artifact(BinaryVAE(VAEConfig()).eval(), path, data_sha256="0" * 64, train_config={}, history=[])
    return path


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The data root with real MNIST, fetched once (from local files or the pinned mirror)."""
    from common.data.mnist import ensure_mnist

    root = Path(os.environ.get("HYBNN_DATA_ROOT", REPO_ROOT / "data"))
    ensure_mnist(root)
    return root


@pytest.fixture(scope="session")
def mnist_encoder(mnist_root, tmp_path_factory):
    """A real (briefly trained) encoder artifact with MNIST's codes cached: ``(artifact, data_root)``.

    One VAE epoch on 2,048 training images: its codes carry real signal, enough to
    train and check BNNs on the whole MNIST test set of every task within seconds.
    ``$HYBNN_TEST_ENCODER`` names a better artifact to use instead.
    """
    from common.data.mnist import dataset_sha256, load_mnist
    from common.encoder.artifact import load_encoder_artifact, save_encoder_artifact
    from common.encoder.features import load_codes
    from common.encoder.vae import VAEConfig, VAETrainConfig, train_vae

    if os.environ.get("HYBNN_TEST_ENCODER"):
        artifact = load_encoder_artifact(os.environ["HYBNN_TEST_ENCODER"])
    else:
        images, labels = load_mnist(mnist_root, "train")
        train_config = VAETrainConfig(epochs=1, seed=0)
        vae, history = train_vae(images[:2048], VAEConfig(), train_config, progress=False)
        artifact = save_encoder_artifact(
            vae, tmp_path_factory.mktemp("encoder"), data_sha256=dataset_sha256(images[:2048], labels[:2048]),
            train_config=train_config.to_dict(), history=history)
    for split in ("train", "test"):
        load_codes(artifact, mnist_root, split, progress=False)
    return artifact, mnist_root


SKIP_FIXES = {
    "nginx": "apt-get install -y --no-install-recommends nginx (or make test-deps as root)",
    "Fashion-MNIST": "apt-get install -y --no-install-recommends dataset-fashion-mnist (or make test-deps as root)",
    "C compiler": "apt-get install -y gcc",
    "HYBNN_HEAVY_TESTS": "HYBNN_HEAVY_TESTS=1 make test (or that variable before pytest): minutes of real processes",
}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Name every skipped test loudly at the end, with the command that lets it run."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.section(f"{len(skipped)} test(s) did NOT run", sep="!", red=True, bold=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        fix = next((f for key, f in SKIP_FIXES.items() if key.lower() in reason.lower()), None)
        terminalreporter.write_line(f"SKIPPED {report.nodeid}: {reason}" + (f"\n    to run it: {fix}" if fix else ""))
