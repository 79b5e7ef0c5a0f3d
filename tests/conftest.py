"""Shared fixtures. Tests that need real MNIST share the repository's data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The data root with real MNIST, fetched once (from local files or the pinned mirror)."""
    from common.data import ensure_mnist

    root = Path(os.environ.get("HYBNN_DATA_ROOT", REPO_ROOT / "data"))
    ensure_mnist(root)
    return root
