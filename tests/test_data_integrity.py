"""The user's data sets are read exactly or refused: class order, pixel modes, class names,
labels, tasks, memory and hostile image files. Tiny data sets made in tmp_path."""

from __future__ import annotations

import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from common.data import datasets
from common.data.datasets import get_dataset
from common.data.tasks import get_task, select_task, task_for_dataset
from common.errors import HyBNNError
from tests.test_datasets import hybnn, make_npz, refused


def cli(capsys, *args) -> subprocess.CompletedProcess:
    """``hybnn ARGS`` run in this process (each subprocess would import torch again)."""
    from simulation.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def image_folder(root: Path, classes, per_class: int = 2, make=None) -> Path:
    """``root/{train,test}/<class>/<i>.png``; ``make(class_index, i)`` gives a PIL image (default:
    6 x 6 grey, every pixel 20 x (class index + 1), so a class is known by its pixels)."""
    from PIL import Image

    for split in ("train", "test"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                im = make(c, i) if make else Image.fromarray(np.full((6, 6), 20 * (c + 1), np.uint8))
                im.save(d / f"{i}.png")
    return root


# ------------------------------------------------------------------ 1: class order
def test_numbered_class_folders_are_in_numeric_order_and_the_order_is_shown(tmp_path):
    names = [str(n) for n in range(1, 11)]
    root = image_folder(tmp_path / "num", names)
    ok = hybnn("data", "--dataset", f"folder:{root}")
    assert ok.returncode == 0, ok.stderr
    assert "classes (folder order, by number; index 0 first): 1, 2, 3, 4, 5, 6, 7, 8, 9, 10" in ok.stdout
    data = get_dataset(f"folder:{root}")
    assert data.class_names == tuple(names)
    task = task_for_dataset("1v2", data)
    assert task.class_names == ("1", "2")
    x, y = select_task(*data.load(tmp_path, "train"), task)
    assert sorted(set(x[:, 0, 0].tolist())) == [20, 40]  # the images of folders 1 and 2, not 10
    assert task_for_dataset("2v3", data).class_names == ("2", "3")  # a named pair is a spec too


def test_names_that_are_not_all_numbers_keep_text_order(tmp_path):
    assert datasets.natural_class_order(["b", "10", "a", "2"]) == ["10", "2", "a", "b"]
    assert datasets.natural_class_order(["10", "9", "010"]) == ["9", "010", "10"]
    root = image_folder(tmp_path / "zero-padded", ["01", "02", "10"])
    data = get_dataset(f"folder:{root}")
    assert data.class_names == ("01", "02", "10")
    assert task_for_dataset("1v10", data).groups == ((0,), (2,))  # numbers compare as numbers


# ------------------------------------------------------------------ 2: pixel modes
def test_16_bit_grey_pngs_are_scaled_exactly(tmp_path):
    from PIL import Image

    values = np.array([[0, 128, 129, 257, 1000, 32896, 65534, 65535]], np.uint16).repeat(2, 0)
    root = image_folder(tmp_path / "b16", ["a", "b"], make=lambda c, i: Image.fromarray(values))
    with Image.open(root / "train" / "a" / "0.png") as im:
        assert im.mode == "I;16"
    data = get_dataset(f"folder:{root}")
    assert data.shape == (2, 8, 1)
    x, _ = data.load(tmp_path, "train")
    assert x[0, 0].tolist() == [0, 0, 1, 1, 4, 128, 255, 255]  # round(v / 257)
    eight = np.arange(256, dtype=np.uint16).reshape(16, 16)
    again = image_folder(tmp_path / "roundtrip", ["a", "b"], make=lambda c, i: Image.fromarray(eight * 257))
    assert np.array_equal(get_dataset(f"folder:{again}").load(tmp_path, "test")[0][0], eight.astype(np.uint8))


def test_modes_are_converted_exactly_or_refused(tmp_path, capsys):
    from PIL import Image

    grey = np.arange(36, dtype=np.uint8).reshape(6, 6) * 7
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=2)
    opaque_la = Image.fromarray(np.stack([grey, np.full_like(grey, 255)], axis=2), "LA")
    root = image_folder(tmp_path / "la", ["a", "b"], make=lambda c, i: opaque_la)
    assert np.array_equal(get_dataset(f"folder:{root}").load(tmp_path, "train")[0][0], grey)

    opaque_rgba = Image.fromarray(np.concatenate([rgb, np.full((6, 6, 1), 255, np.uint8)], axis=2), "RGBA")
    root = image_folder(tmp_path / "rgba", ["a", "b"], make=lambda c, i: opaque_rgba)
    assert np.array_equal(get_dataset(f"folder:{root}").load(tmp_path, "train")[0][0], rgb)

    palette = Image.fromarray(rgb).quantize(colors=256)
    root = image_folder(tmp_path / "p", ["a", "b"], make=lambda c, i: palette)
    assert np.array_equal(get_dataset(f"folder:{root}").load(tmp_path, "train")[0][0],
                          np.asarray(palette.convert("RGB")))

    bits = Image.fromarray(grey > 100)
    root = image_folder(tmp_path / "one-bit", ["a", "b"], make=lambda c, i: bits)
    assert get_dataset(f"folder:{root}").load(tmp_path, "train")[0][0].tolist() == \
        np.where(grey > 100, 255, 0).tolist()

    see_through = Image.fromarray(np.concatenate([rgb, np.zeros((6, 6, 1), np.uint8)], axis=2), "RGBA")
    root = image_folder(tmp_path / "transparent", ["a", "b"], make=lambda c, i: see_through)
    refused(cli(capsys, "data", "--dataset", f"folder:{root}"), "transparent", "flatten it onto a background",
            str(root / "train" / "a" / "0.png"))


@pytest.mark.parametrize("mode, expected", [
    ("CMYK", "print colours (CMYK)"), ("F", "floating-point pixels"), ("I", "32-bit integer pixels"),
])
def test_modes_without_a_known_range_are_refused_naming_the_file(mode, expected, tmp_path, capsys):
    from PIL import Image

    root = image_folder(tmp_path / "ok", ["a", "b"])
    bad = root / "train" / "b" / "odd.tif"
    Image.new(mode, (6, 6)).save(bad)
    message = refused(cli(capsys, "data", "--dataset", f"folder:{root}"), str(bad), expected, "Image modes")
    assert "is not an image HyBNN can use" in message


# ------------------------------------------------------------------ 8: hostile image files
def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, capsys):
    from PIL import Image

    root = image_folder(tmp_path / "bomb", ["a", "b"])
    bomb = root / "train" / "a" / "huge.png"
    Image.new("1", (14000, 14000)).save(bomb)  # 196 M pixels in a small file
    refused(cli(capsys, "data", "--dataset", f"folder:{root}"), str(bomb), "decompression bomb")
    refused(cli(capsys, "data", "--dataset", f"folder:{root}", "--image-size", "6"), str(bomb), "decompression bomb")
    Image.new("L", (10000, 5000)).save(bomb)  # under Pillow's own limit, over HyBNN's
    refused(cli(capsys, "data", "--dataset", f"folder:{root}", "--image-size", "6"), str(bomb), "10000 x 5000",
            "40,000,000")


def test_truncated_and_corrupt_files_are_refused_naming_the_file(tmp_path, capsys):
    root = image_folder(tmp_path / "cut", ["a", "b"], make=lambda c, i: _noise())
    victim = root / "test" / "b" / "1.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    refused(cli(capsys, "data", "--dataset", f"folder:{root}"), str(victim), "could not be decoded")
    corrupt = bytearray(data)
    corrupt[40:60] = b"\xff" * 20  # inside the image data chunk: its checksum no longer holds
    victim.write_bytes(bytes(corrupt))
    refused(cli(capsys, "data", "--dataset", f"folder:{root}"), str(victim), "is not an image HyBNN can use")


def _noise():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8))


def test_an_animation_and_a_special_file_are_refused(tmp_path, capsys):
    import os

    from PIL import Image

    root = image_folder(tmp_path / "gif", ["a", "b"])
    frames = [Image.new("L", (6, 6), v) for v in (0, 255)]
    gif = root / "train" / "a" / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    refused(cli(capsys, "data", "--dataset", f"folder:{root}"), str(gif), "2 frames")
    gif.unlink()
    fifo = root / "train" / "a" / "pipe.png"
    os.mkfifo(fifo)
    refused(cli(capsys, "data", "--dataset", f"folder:{root}"), str(fifo), "special file")


# ------------------------------------------------------------------ class names
def test_npz_class_names_as_utf8_bytes_are_decoded(tmp_path):
    path = make_npz(tmp_path / "b.npz", class_names=np.array([b"zero", b"one", "caf\u00e9".encode()]))
    assert get_dataset(f"npz:{path}").class_names == ("zero", "one", "caf\u00e9")


@pytest.mark.parametrize("names, expected", [
    (np.array([b"zero", b"\xff\xfe", b"two"]), ["name 1", "not UTF-8"]),
    (np.array([0, 1, 2]), ["class_names", "int64", "array of strings"]),
    (np.array(["cat", "Cat", "owl"]), ["names a class twice", "'cat' and 'Cat'"]),
    (np.array(["caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9"), "owl"]), ["names a class twice"]),
    (np.array(["cat", "do\ng", "owl"]), ["control character"]),
    (np.array(["cat", "#1", "owl"]), ["'#1'", "#N means the class at index N"]),
    (np.array(["cat", "  ", "owl"]), ["empty or non-text class name"]),
])
def test_bad_class_names_are_refused(names, expected, tmp_path, capsys):
    path = make_npz(tmp_path / "n.npz", class_names=names)
    message = refused(cli(capsys, "data", "--dataset", f"npz:{path}", "--data-root", tmp_path), *expected)
    assert str(path) in message


def test_duplicate_class_folders_by_unicode_form_are_refused(tmp_path, capsys):
    root = image_folder(tmp_path / "uni", ["caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")])
    refused(cli(capsys, "data", "--dataset", f"folder:{root}"), "names a class twice")


# ------------------------------------------------------------------ labels
@pytest.mark.parametrize("labels, expected", [
    (np.array([10**9] + [0] * 59), ["y_train", "holds 1000000000 (at index 0)", "at most 65536 classes"]),
    (np.array([-1] + [0] * 59), ["y_train", "holds -1 (at index 0)"]),
    (np.arange(60, dtype=np.float64) % 3, ["y_train", "float64", "astype('int64')"]),
    (np.zeros(60, bool), ["y_train", "bool"]),
])
def test_bad_labels_are_refused_before_any_allocation(labels, expected, tmp_path, capsys):
    for names in (None, np.array(["cat", "dog", "owl"])):
        path = make_npz(tmp_path / "l.npz", y_train=labels, class_names=names)
        refused(cli(capsys, "data", "--dataset", f"npz:{path}", "--data-root", tmp_path), *expected)


def test_select_task_allocates_nothing_sized_by_a_label():
    labels = np.array([0, 1, 2**62, -7, 1, 0])
    x, y = select_task(np.arange(6), labels, get_task("0v1"))
    assert x.tolist() == [0, 1, 4, 5] and y.tolist() == [0, 1, 1, 0]


# ------------------------------------------------------------------ 4: names against indices
def test_a_class_name_wins_and_an_index_serves_where_no_name_matches():
    names = ("cat", "3", "dog", "owl")
    assert get_task("cat v owl", names).groups == ((0,), (3,))
    assert get_task("0v2", names).groups == ((0,), (2,))  # no class is called 0 or 2: indices
    assert get_task("#3 v dog", names).groups == ((3,), (2,))
    assert get_task("#1 v owl", names).groups == ((1,), (3,))
    with pytest.raises(HyBNNError, match=r"'3' is the name of class #1 and the index of class #3 \('owl'\). "
                                         r"Write #1 or #3"):
        get_task("3 v dog", names)
    with pytest.raises(HyBNNError, match="names the class '#4'"):
        get_task("#4 v dog", names)


def test_numbered_classes_take_numbers_as_names_only():
    names = tuple(str(n) for n in range(1, 11))
    assert get_task("9v10", names).class_names == ("9", "10")
    with pytest.raises(HyBNNError, match="names the class '0'"):
        get_task("0v1", names)
    assert get_task("#0v#1", names).class_names == ("1", "2")
    assert get_task("all10", names).class_names == names
    with pytest.raises(HyBNNError, match="2 classes have that number"):
        get_task("1v2", ("1", "01", "2"))
    assert get_task("3v8").groups == ((3,), (8,))  # MNIST: names are the indices


def test_a_name_part_shared_by_two_classes_is_refused():
    with pytest.raises(HyBNNError, match="part of the names 'a/top', 'b/top'"):
        get_task("top v c", ("a/top", "b/top", "c"))
    assert get_task("T-shirt v Shirt", datasets.FASHION_NAMES).groups == ((0,), (6,))


# ------------------------------------------------------------------ 5: a class without samples
@pytest.mark.parametrize("split, word", [("train", "training"), ("test", "test")])
def test_a_task_class_without_samples_is_refused_before_training(split, word, tmp_path, capsys):
    y = np.arange(60 if split == "train" else 20) % 3
    y[y == 2] = 1  # class 'owl' has no sample in this split
    path = make_npz(tmp_path / "gap.npz", shape=(8, 8), **{f"y_{split}": y})
    message = refused(cli(capsys, "baseline", "--model", "fp-cnn", "--dataset", f"npz:{path}", "--task", "cat v owl",
                            "--epochs", "1", "--data-root", tmp_path),
                      f"no {word} sample of class 'owl' (index 2)", f"npz:{path}")
    assert "epoch" not in message


# ------------------------------------------------------------------ 7: memory
def test_a_resize_that_cannot_fit_in_memory_is_refused_before_allocating(tmp_path, capsys):
    from common.resources import available_memory_bytes

    count = 200_000
    needed = count * 1024 * 1024
    if (available_memory_bytes() or 0) >= needed:
        pytest.skip("this machine has room for 200 GiB of images")
    path = make_npz(tmp_path / "tiny.npz", shape=(2, 2), n_train=count, n_test=10)
    message = refused(cli(capsys, "data", "--dataset", f"npz:{path}", "--image-size", "1024", "--data-root", tmp_path),
                      "200010 images resized to 1024x1024", "needs about", "smaller --image-size")
    assert "GiB" in message


def test_mnist_at_1024_pixels_is_refused_with_the_memory_it_needs(mnist_root, capsys):
    from common.resources import available_memory_bytes

    if (available_memory_bytes() or 0) >= 70000 * 1024 * 1024:
        pytest.skip("this machine has room for MNIST at 1024 x 1024")
    refused(cli(capsys, "data", "--image-size", "1024", "--data-root", mnist_root),
            "'mnist@1024x1024' (70000 images resized to 1024x1024", "needs about 68.4 GiB")


@pytest.mark.parametrize("size", ["1025", "0", "99999999999999999999x2", "-3"])
def test_image_size_is_bounded(size, tmp_path, capsys):
    path = make_npz(tmp_path / "d.npz", shape=(4, 4))
    refused(cli(capsys, "data", "--dataset", f"npz:{path}", "--image-size", size, "--data-root", tmp_path),
            "--image-size")


def test_a_compressed_npz_that_unpacks_past_memory_is_refused_from_its_headers(tmp_path, capsys):
    from common.resources import available_memory_bytes

    available = available_memory_bytes()
    if available is None or available > 2**40:
        pytest.skip("the available memory is unknown or over 1 TiB")
    path = tmp_path / "bomb.npz"
    count = available // (28 * 28) + 1
    y = np.zeros(4, np.int64)
    # a zero array built lazily: np.zeros maps pages on touch, and savez_compressed writes it small
    big = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=(count, 28, 28), strides=(0, 0, 0))
    _write_npz_header_only(path, {"x_train": big, "y_train": y, "x_test": np.zeros((4, 28, 28), np.uint8),
                                  "y_test": y})
    refused(cli(capsys, "data", "--dataset", f"npz:{path}", "--data-root", tmp_path), f"Reading the arrays of {path}",
            "needs about")


def _write_npz_header_only(path: Path, arrays: dict) -> None:
    """An npz whose members declare the arrays' shapes but hold only their headers: what a
    file that unpacks to more than memory looks like before it is read."""
    import io
    import zipfile

    from numpy.lib import format as npy

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, a in arrays.items():
            buffer = io.BytesIO()
            npy.write_array_header_1_0(buffer, npy.header_data_from_array_1_0(a))
            if a.nbytes < 2**20:
                buffer.write(np.ascontiguousarray(a).tobytes())
            zf.writestr(f"{name}.npy", buffer.getvalue())


def test_the_float_inputs_of_the_encoder_and_the_baselines_are_checked_before_allocating():
    from common.encoder.vae import images_to_tensor
    from common.experiments.baselines import images_to_inputs
    from common.resources import available_memory_bytes

    count = 200_000
    if (available_memory_bytes() or 0) >= count * 512 * 512 * 4:
        pytest.skip("this machine has room for 200 GiB of floats")
    # a view of one image, repeated: a real array of that shape, without its memory
    images = np.lib.stride_tricks.as_strided(np.zeros((512, 512), np.uint8), shape=(count, 512, 512),
                                             strides=(0, 512, 1))
    with pytest.raises(HyBNNError, match="200000 images of 512x512x1 as the encoder's float input needs about"):
        images_to_tensor(images, (512, 512, 1))
    with pytest.raises(HyBNNError, match="200000 images as the baseline's float input needs about"):
        images_to_inputs(images)
