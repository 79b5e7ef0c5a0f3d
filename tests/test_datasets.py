"""Data sets (built-in, npz, folder), task specs, the shape-aware VAE, and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import datasets
from common.data.datasets import DatasetSpec, Source, get_dataset
from common.errors import HyBNNError
from common.data.tasks import get_task, select_task, task_for_dataset
from tests.conftest import REPO_ROOT, fixed_encoder


def hybnn(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulation.cli", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def refused(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The one-paragraph error of a refused command, checked for ``expected`` parts."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert "\n" not in message, message
    for part in expected:
        assert part in message, message
    return message


def make_npz(path: Path, shape=(16, 16, 3), n_train=60, n_test=20, classes=("cat", "dog", "owl"),
             **overrides) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train) % len(classes),
        "x_test": rng.integers(0, 256, size=(n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test) % len(classes),
        "class_names": np.array(classes),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def make_folder(root: Path, classes=("ant", "bee"), per_class=3, size=(12, 10), mode="L") -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
                Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    return root


# ------------------------------------------------------------------ built-in data sets
def test_mnist_entry_is_mnist(mnist_root):
    from common.data.mnist import load_mnist

    data = get_dataset("mnist")
    assert data.shape == (28, 28, 1) and data.class_names == tuple("0123456789")
    images, labels = data.load(mnist_root, "test")
    ref_images, ref_labels = load_mnist(mnist_root, "test")
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)


@pytest.mark.skipif(not datasets.FASHION_DEBIAN_DIR.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    data = get_dataset("fashion-mnist")
    x_train, y_train, x_test, y_test = data.load_all(tmp_path)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert np.bincount(y_train).tolist() == [6000] * 10 and np.bincount(y_test).tolist() == [1000] * 10
    assert data.class_names[6] == "Shirt"
    assert task_for_dataset("Shirt v T-shirt", data).groups == ((6,), (0,))


def test_fashion_mnist_local_files_come_first_and_wrong_ones_are_refused(tmp_path, monkeypatch):
    from common.data.mnist import write_idx

    raw = datasets.fashion_raw_dir(tmp_path)
    raw.mkdir(parents=True)
    labels = np.repeat(np.arange(10), 3).astype(np.uint8)  # 3 per class: not Fashion-MNIST's counts
    for name, array in zip(datasets.FASHION_FILES, (np.zeros((30, 28, 28), np.uint8), labels,
                                                    np.zeros((30, 28, 28), np.uint8), labels)):
        write_idx(raw / name, array)
    monkeypatch.setattr(datasets, "_fashion_debian", lambda root: pytest.fail("the local files come first"))
    with pytest.raises(HyBNNError, match=r"class counts \(3, 3") as info:
        get_dataset("fashion-mnist").load_all(tmp_path)
    assert "not the standard fashion-mnist files" in str(info.value)


def test_a_damaged_gz_file_is_refused_naming_it(tmp_path, monkeypatch):
    import gzip

    from common.data.mnist import write_idx

    raw = datasets.fashion_raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for name in datasets.FASHION_FILES:
        write_idx(tmp_path / name, np.zeros((4, 28, 28) if "images" in name else (4,), np.uint8))
        data = (tmp_path / name).read_bytes()
        (raw / f"{name}.gz").write_bytes(gzip.compress(data[:-5] if name.startswith("t10k-images") else data))
    monkeypatch.setattr(datasets, "_fashion_debian", lambda root: pytest.fail("a wrong local file is refused"))
    with pytest.raises(HyBNNError, match=r"t10k-images-idx3-ubyte.gz \(uncompressed\) is not a valid uint8 "
                                         r"IDX file: it is truncated") as info:
        get_dataset("fashion-mnist").load_all(tmp_path)
    assert f"Delete the Fashion-MNIST files under {raw}" in str(info.value)


def test_fashion_mnist_missing_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_DEBIAN_DIR", tmp_path / "no-package")

    def offline(root):
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets, "_fashion_torchvision", offline)
    with pytest.raises(HyBNNError) as info:
        get_dataset("fashion-mnist").load_all(tmp_path / "data")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in message and "network unreachable" in message


# ------------------------------------------------------------------ the user's npz and folder
def test_npz_dataset_loads_with_its_shape_and_class_names(tmp_path):
    path = make_npz(tmp_path / "pets.npz")
    data = get_dataset(f"npz:{path}")
    assert data.shape == (16, 16, 3) and data.class_names == ("cat", "dog", "owl")
    x, y = data.load(tmp_path, "train")
    assert x.shape == (60, 16, 16, 3) and y.dtype == np.int64
    assert task_for_dataset("cat,dog v owl", data).groups == ((0, 1), (2,))
    small = get_dataset(f"npz:{path}@8x8")
    assert small.shape == (8, 8, 3) and small.load(tmp_path, "test")[0].shape == (20, 8, 8, 3)
    assert small.fingerprint(tmp_path) != data.fingerprint(tmp_path)


def test_npz_without_class_names_numbers_its_classes(tmp_path):
    path = make_npz(tmp_path / "d.npz", shape=(10, 10), class_names=None)
    data = get_dataset(f"npz:{path}")
    assert data.shape == (10, 10, 1) and data.class_names == ("0", "1", "2")


@pytest.mark.parametrize("overrides, expected", [
    ({"y_test": None}, ["lacks the array(s) y_test"]),
    ({"y_train": np.full(60, 7)}, ["y_train", "hold 7", "0..2"]),
    ({"x_train": np.zeros((60, 16, 16, 3), np.float32)}, ["x_train", "float32, not uint8", "astype('uint8')"]),
    ({"y_test": np.arange(19) % 3}, ["20 test images (x_test) but 19 labels (y_test)"]),
    ({"x_test": np.zeros((20, 8, 8, 3), np.uint8)}, ["x_test", "(8, 8, 3)", "(16, 16, 3)"]),
])
def test_bad_npz_is_a_clear_error_naming_the_file_and_array(tmp_path, overrides, expected):
    path = make_npz(tmp_path / "bad.npz", **overrides)
    message = refused(hybnn("data", "--dataset", f"npz:{path}", "--data-root", tmp_path), *expected)
    assert str(path) in message and "docs/datasets.md" in message


def test_folder_dataset_loads_in_imagefolder_layout(tmp_path):
    root = make_folder(tmp_path / "bugs", classes=("ant", "bee", "wasp"))
    data = get_dataset(f"folder:{root}")
    assert data.shape == (10, 12, 1) and data.class_names == ("ant", "bee", "wasp")
    x, y = data.load(tmp_path, "test")
    assert x.shape == (9, 10, 12) and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    rgb = get_dataset(f"folder:{make_folder(tmp_path / 'rgb', mode='RGB')}")
    assert rgb.shape == (10, 12, 3)


def test_bad_folders_are_clear_errors(tmp_path):
    empty = make_folder(tmp_path / "empty")
    for p in (empty / "test" / "bee").iterdir():
        p.unlink()
    refused(hybnn("data", "--dataset", f"folder:{empty}"), f"{empty / 'test' / 'bee'} is empty",
            "remove the class from both")

    stray = make_folder(tmp_path / "stray")
    (stray / "train" / "ant" / "notes.txt").write_text("not an image")
    refused(hybnn("data", "--dataset", f"folder:{stray}"),
            f"{stray / 'train' / 'ant' / 'notes.txt'} is not an image", "Move it out")

    mixed = make_folder(tmp_path / "mixed")
    make_folder(tmp_path / "other", size=(20, 20))
    (tmp_path / "other" / "train" / "ant" / "0.png").replace(mixed / "train" / "ant" / "big.png")
    refused(hybnn("data", "--dataset", f"folder:{mixed}"), "different sizes", "--image-size")
    ok = hybnn("data", "--dataset", f"folder:{mixed}", "--image-size", "16x16")
    assert ok.returncode == 0 and "(16, 16, 1)" in ok.stdout, ok.stderr
    (mixed / "test" / "bee" / "notes.txt").write_text("not an image")
    refused(hybnn("data", "--dataset", f"folder:{mixed}", "--image-size", "16x16"),
            f"{mixed / 'test' / 'bee' / 'notes.txt'} is not an image", "Move it out")


def test_paths_of_user_data_sets_are_made_absolute_for_other_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert datasets.absolute_dataset("npz:d.npz@8x8") == f"npz:{tmp_path / 'd.npz'}@8x8"
    assert datasets.absolute_dataset("folder:imgs") == f"folder:{tmp_path / 'imgs'}"
    assert datasets.absolute_dataset("fashion-mnist") == "fashion-mnist"


def test_unknown_dataset_lists_the_forms():
    with pytest.raises(HyBNNError, match=r"Unknown data set 'cifar'.*npz:PATH.*folder:PATH"):
        get_dataset("cifar")


# ------------------------------------------------------------------ tasks
def test_task_specs_select_and_relabel_by_group():
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 8])
    task = get_task("0,2,4,6,8v1,3,5,7,9")
    _, ys = select_task(np.arange(12), labels, task)
    assert ys.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0]
    xs, ys = select_task(np.arange(12), labels, get_task("3,5,8"))
    assert xs.tolist() == [3, 5, 8, 10, 11] and ys.tolist() == [0, 1, 2, 0, 2]
    assert get_task("3v8").class_names == ("3", "8") and get_task("3v8").num_classes == 2
    assert get_task("all10").num_classes == 10


@pytest.mark.parametrize("spec, expected", [
    ("3v12", "names the class '12'"), ("3v3", "in two groups"), ("3v", "empty group"),
    ("3,,5v1", "empty group"), ("7", "one class"),
])
def test_bad_task_specs(spec, expected):
    with pytest.raises(HyBNNError, match=expected):
        get_task(spec)


def test_task_names_resolve_against_the_datasets_classes():
    names = datasets.FASHION_NAMES
    assert get_task("Pullover,Coat,Shirt", names).groups == ((2,), (4,), (6,))
    assert get_task("sandal,sneaker,ankle boot v bag", names).groups == ((5, 7, 9), (8,))
    with pytest.raises(HyBNNError, match="'cat', which data set 'mnist'"):
        get_task("cat v dog")


# ------------------------------------------------------------------ the shape-aware encoder
@pytest.mark.parametrize("shape", [(16, 16, 3), (20, 12, 1), (28, 28, 1)])
def test_vae_follows_the_image_shape(shape):
    from common.encoder.vae import BinaryVAE, VAEConfig, images_to_tensor

    config = VAEConfig(image_shape=shape)
    vae = BinaryVAE(config).eval()
    images = np.random.default_rng(0).integers(0, 256, size=(3, *shape), dtype=np.uint8)
    x = images_to_tensor(images if shape[2] > 1 else images[..., 0], shape)
    assert x.shape == (3, shape[2], shape[0], shape[1])
    pixels, logits = vae(x)
    assert pixels.shape == x.shape and logits.shape == (3, 200)
    assert VAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_old_manifest_without_an_image_shape_is_an_mnist_encoder():
    from common.encoder.vae import VAEConfig

    d = VAEConfig().to_dict()
    del d["image_shape"]
    assert VAEConfig.from_dict(d).image_shape == (28, 28, 1)


def test_encoder_of_another_shape_refuses_and_says_what_it_needs(tmp_path):
    encoder = fixed_encoder(tmp_path / "mnist-encoder")
    npz = make_npz(tmp_path / "pets.npz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("keep me")
    message = refused(hybnn("train", "--task", "cat v dog", "--dataset", f"npz:{npz}", "--encoder", encoder,
                            "--data-root", tmp_path, "--out", out),
                      "takes images of 28x28 with 1 channel(s)", "16x16 with 3", "--image-size 28x28",
                      f"hybnn pretrain --dataset npz:{npz}")
    assert str(encoder) in message
    assert [p.name for p in out.iterdir()] == ["earlier.txt"] and (out / "earlier.txt").read_text() == "keep me"


def test_task_naming_a_missing_class_is_refused_through_the_cli(tmp_path):
    npz = make_npz(tmp_path / "pets.npz")
    refused(hybnn("baseline", "--model", "fp-cnn", "--task", "cat v fox", "--dataset", f"npz:{npz}",
                  "--data-root", tmp_path),
            "Unknown task 'cat v fox'", "'fox'", "0=cat, 1=dog, 2=owl")


def test_feature_cache_is_keyed_by_encoder_and_data(tmp_path):
    from common.encoder.artifact import load_encoder_artifact
    from common.encoder.features import cache_path, load_codes

    artifact = load_encoder_artifact(fixed_encoder(tmp_path / "enc"))
    a = make_npz(tmp_path / "a.npz", shape=(28, 28), class_names=None)
    b = make_npz(tmp_path / "b.npz", shape=(28, 28), class_names=None, y_test=np.arange(20) % 2)
    codes_a, _ = load_codes(artifact, tmp_path, "test", progress=False, dataset=f"npz:{a}")
    codes_b, labels_b = load_codes(artifact, tmp_path, "test", progress=False, dataset=f"npz:{b}")
    fp_a, fp_b = get_dataset(f"npz:{a}").fingerprint(tmp_path), get_dataset(f"npz:{b}").fingerprint(tmp_path)
    assert fp_a != fp_b
    path_a, path_b = cache_path(artifact, tmp_path, "test", fp_a), cache_path(artifact, tmp_path, "test", fp_b)
    assert path_a.parent.parent == path_b.parent.parent == tmp_path / "features" / artifact.sha256
    assert path_a.exists() and path_b.exists() and path_a != path_b
    assert labels_b.tolist() == (np.arange(20) % 2).tolist()
    assert np.array_equal(codes_a, codes_b)  # same images (same seed), each cached on its own


def test_register_refuses_builtin_names_and_bad_specs():
    source = Source("nothing", lambda root: None)
    with pytest.raises(HyBNNError, match="built-in"):
        datasets.register_dataset(DatasetSpec("mnist", (28, 28, 1), tuple("0123456789"), (source,)))
    with pytest.raises(HyBNNError, match="at least 2"):
        DatasetSpec("one", (8, 8, 1), ("only",), (source,))
    with pytest.raises(HyBNNError, match="1 \\(grey\\) or 3 \\(RGB\\)"):
        DatasetSpec("four", (8, 8, 4), ("a", "b"), (source,))


@pytest.mark.skipif(not datasets.FASHION_DEBIAN_DIR.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)")
def test_union_of_mnist_and_fashion_mnist_for_pretraining(mnist_root):
    images, parts, data_sha = datasets.pretrain_images("mnist+fashion-mnist", mnist_root)
    assert [d.name for d in parts] == ["mnist", "fashion-mnist"] and images.shape == (120000, 28, 28)
    mnist_images, _ = get_dataset("mnist").load(mnist_root, "train")
    assert np.array_equal(images[:60000], mnist_images)
    assert len(data_sha) == 64


def test_union_needs_one_shape(tmp_path):
    a = make_npz(tmp_path / "a.npz", shape=(16, 16, 3))
    b = make_npz(tmp_path / "b.npz", shape=(12, 12, 3))
    with pytest.raises(HyBNNError, match="different image shapes"):
        datasets.pretrain_images(f"npz:{a}+npz:{b}", tmp_path)
    images, parts, _ = datasets.pretrain_images(f"npz:{a}+npz:{b}", tmp_path, image_size="8x8")
    assert images.shape == (120, 8, 8, 3) and [d.shape for d in parts] == [(8, 8, 3)] * 2


def test_a_registered_data_set_reaches_another_process_as_plain_arrays(tmp_path):
    """What ``hybnn federate`` hands its worker process: arrays in an .npz, no pickled code."""
    rng = np.random.default_rng(1)
    arrays = (rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8), np.arange(6) % 2,
              rng.integers(0, 256, (4, 5, 4, 3), dtype=np.uint8), np.arange(4) % 2)
    spec = DatasetSpec("carried54", (5, 4, 3), ("a", "b"), (Source("made here", lambda _root: arrays),))
    datasets.register_dataset(spec)
    try:
        carried = datasets.carry_registered("carried54@8x8", tmp_path, tmp_path / "carried")
        assert datasets.carry_registered("mnist", tmp_path, tmp_path / "carried") == []
        fingerprint = get_dataset("carried54@8x8").fingerprint(tmp_path)
    finally:
        datasets.unregister_dataset("carried54")
    (entry,) = carried
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(carried))
    script = ("import json, sys; from pathlib import Path; from common.data import datasets; "
              "datasets.receive_carried(json.loads(Path(sys.argv[1]).read_text())); "
              "print(datasets.get_dataset('carried54@8x8').fingerprint(sys.argv[2]))")
    got = subprocess.run([sys.executable, "-c", script, str(spec_file), str(tmp_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True)
    assert got.stdout.strip() == fingerprint
    # A carried file changed after it was written is refused, not read.
    path = Path(entry["path"])
    path.write_bytes(path.read_bytes() + b"\0")
    datasets.receive_carried(carried)
    try:
        with pytest.raises(HyBNNError, match="changed after it was written"):
            get_dataset("carried54").load(tmp_path / "other", "train")
    finally:
        datasets.unregister_dataset("carried54")
    with pytest.raises(HyBNNError, match="not a hybnn-carried-dataset/1 entry"):
        datasets.receive_carried([{"name": "x"}])


def test_deploy_local_refuses_a_data_set_registered_in_this_process(tmp_path):
    from simulation.deploy_local import DeployConfig, deploy_local

    spec = DatasetSpec("onlyhere", (5, 4, 1), ("a", "b"), (Source("made here", lambda _root: None),))
    datasets.register_dataset(spec)
    try:
        with pytest.raises(HyBNNError, match="registered in this process only.*npz:PATH"):
            deploy_local(DeployConfig(task="0v1", dataset="onlyhere", encoder=tmp_path / "none",
                                      data_root=tmp_path, out=tmp_path / "out"))
    finally:
        datasets.unregister_dataset("onlyhere")
    assert not (tmp_path / "out").exists()
