"""Feature extraction (stage 2): image -> frozen encoder -> sign -> 200 bits, packed.

A code is ``bit_i = (logit_i >= 0)`` (``sign(0) = +1``; bit 1 means +1), packed with
:func:`common.packing.pack_bits`: bit ``i`` lands in byte ``i // 8`` at bit
``7 - i % 8`` (most significant first). 200 bits take 25 bytes per sample.

Codes are cached on disk under ``<data_root>/features/<encoder sha256>/<split>.npz`` for
MNIST (whose files are pinned by their sha256, so the encoder's hash is the whole key)
and under ``<data_root>/features/<encoder sha256>/<data set fingerprint>/<split>.npz``
for every other data set. The key is (encoder, data), so a new encoder never reuses
the codes of an old one, nor one data set the codes of another. A cache file is written
atomically and records what made it: the encoder's sha256, the fingerprint of the images
and labels it encoded (:func:`common.data.mnist.dataset_sha256`), the manifest's architecture
(which the encoder's sha256 covers too, checked again here) and the sha256 of its
codes and labels. One that cannot be read, holds the wrong shape or dtype, names another
encoder or other data (a file copied from another encoder's folder), was computed under
another architecture, or whose contents no longer match its recorded hash (a changed file),
is not used: the codes are computed again and replace it, with a logged warning that says
which check failed. A cache that cannot be written (a read-only data root,
a full disk) is skipped with a warning: the codes are still returned.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm.auto import tqdm

from common.data.mnist import dataset_sha256, load_mnist
from common.errors import HyBNNError
from common.fileio import atomic_write_bytes, make_dir
from common.packing import pack_bits, packed_length
from common.encoder.vae import MNIST_SHAPE, Encoder, images_to_tensor

if TYPE_CHECKING:
    from common.encoder.artifact import EncoderArtifact

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 5
"""Version 2 added the content hash, 3 the architecture, 4 the image shape in the architecture
and data sets other than MNIST keyed by their fingerprint, 5 the encoder's sha256 and the
encoded data's fingerprint inside the file; older caches are rebuilt once."""
DEFAULT_BATCH_SIZE = 1024


class InferenceEncoder(nn.Module):
    """An :class:`~common.encoder.vae.Encoder` rearranged for fast CPU inference, same function.

    Each BatchNorm is folded into the conv before it (eval statistics), the
    activations run in place, and the tensors use the channels-last layout, which
    oneDNN's convolutions prefer. On 2 CPU cores this is about twice as fast as the
    training form. Logits agree with the training form to float32 rounding (~1e-7),
    so a bit can differ only for a logit within rounding of 0; every code in the
    project goes through :func:`encode_images`, so they all agree with each other.
    """

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        modules = list(encoder.conv)
        pending_conv: nn.Conv2d | None = None
        for module in modules:
            if isinstance(module, nn.Conv2d):
                pending_conv = module
            elif isinstance(module, nn.BatchNorm2d) and pending_conv is not None:
                layers.append(fuse_conv_bn_eval(copy.deepcopy(pending_conv).eval(),
                                                copy.deepcopy(module).eval()))
                pending_conv = None
            elif isinstance(module, nn.LeakyReLU):
                layers.append(nn.LeakyReLU(module.negative_slope, inplace=True))
            else:  # an unexpected layer: keep it as it is
                if pending_conv is not None:
                    layers.append(copy.deepcopy(pending_conv))
                    pending_conv = None
                layers.append(copy.deepcopy(module))
        if pending_conv is not None:
            layers.append(copy.deepcopy(pending_conv))
        self.conv = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        self.fc = copy.deepcopy(encoder.fc)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.contiguous(memory_format=torch.channels_last))
        # flatten in (C, H, W) order, as the training form does
        return self.fc(h.contiguous().flatten(1))


def encode_images(
    encoder: nn.Module,
    images_uint8: np.ndarray,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> np.ndarray:
    """Packed binary codes ``uint8 (N, ceil(latent_bits/8))`` of uint8 images ``(N,H,W[,C])``.

    Runs the encoder in eval mode under ``torch.inference_mode`` (no autograd
    bookkeeping), one batch at a time so memory stays flat for any ``N``. An
    :class:`~common.encoder.vae.Encoder` runs as its :class:`InferenceEncoder` (same function,
    about twice as fast); any other module runs as given.
    """
    was_training = encoder.training
    encoder.eval()
    images = np.asarray(images_uint8)
    chunks: list[np.ndarray] = []
    config = getattr(encoder, "config", None)
    shape = tuple(getattr(config, "image_shape", MNIST_SHAPE))
    try:
        model = InferenceEncoder(encoder) if isinstance(encoder, Encoder) else encoder
        with torch.inference_mode():
            starts = range(0, len(images), batch_size)
            for begin in tqdm(starts, desc="encode", disable=not progress, leave=False, unit="batch"):
                logits = model(images_to_tensor(images[begin : begin + batch_size], shape))
                chunks.append(pack_bits((logits >= 0).numpy()))
    finally:
        encoder.train(was_training)
    if not chunks:
        n_bits = int(getattr(getattr(encoder, "config", None), "latent_bits", 200))
        return np.zeros((0, packed_length(n_bits)), dtype=np.uint8)
    return np.concatenate(chunks)


def cache_path(artifact: "EncoderArtifact", data_root: Path | str, split: str,
               data_fingerprint: str | None = None) -> Path:
    """Where the codes of ``split`` under ``artifact`` are cached (``data_fingerprint``:
    of a data set other than MNIST)."""
    folder = Path(data_root) / "features" / artifact.sha256
    if data_fingerprint:
        folder = folder / data_fingerprint
    return folder / f"{split}.npz"


def check_encoder_shape(artifact: "EncoderArtifact", dataset) -> None:
    """Refuse a data set whose images are not the shape the encoder was built for."""
    need = tuple(artifact.config.image_shape)
    if tuple(dataset.shape) != need:
        from common.data.datasets import SIZE_SUFFIX

        sized = SIZE_SUFFIX.match(dataset.name)
        as_options = (f"--dataset {sized.group(1)} --image-size {sized.group(2)}x{sized.group(3)}" if sized
                      else f"--dataset {dataset.name}")
        trained = ", ".join(artifact.manifest.get("datasets", ["mnist"]))
        raise HyBNNError(
            f"The encoder {artifact.path} (trained on {trained}) takes images of {need[0]}x{need[1]} "
            f"with {need[2]} channel(s), but data set {dataset.name!r} has {dataset.shape[0]}x"
            f"{dataset.shape[1]} with {dataset.shape[2]}. Images are never resized silently: pass "
            f"--image-size {need[0]}x{need[1]} to resize them (the channels must agree), or train an "
            f"encoder for this data set with `hybnn pretrain {as_options}`.")


def cache_digest(codes: np.ndarray, labels: np.ndarray) -> str:
    """The sha256 a cache file records: its uint8 codes' bytes, then its int64 labels' bytes."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(codes, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def cache_architecture(artifact: "EncoderArtifact") -> str:
    """The architecture the codes were computed with, as the cache records it. The weights file's
    sha256, which names the cache's folder, covers it as well; a cache file that records another
    architecture (written by hand or by another tool) is still rebuilt."""
    return json.dumps(artifact.config.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class CacheKey:
    """What a cache file must have been made from to be used: the encoder (its sha256 and the
    manifest's architecture) and the data it encoded (the images' and labels' sha256)."""

    encoder_sha256: str
    architecture: str
    data_sha256: str


def _read_cache(path: Path, n: int, n_bytes: int, labels: np.ndarray, key: CacheKey) -> np.ndarray | None:
    """The cached codes, or ``None`` (with a warning) if the file is unusable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            codes = data["codes"]
            cached_labels = data["labels"]
            version = int(data["version"])
            recorded = {name: str(data[name]) if name in data.files else None
                        for name in ("sha256", "architecture", "encoder_sha256", "data_sha256")}
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("Feature cache %s is unreadable (%s); rebuilding it.", path, exc)
        return None
    problem = None
    if version != CACHE_FORMAT_VERSION:
        problem = f"format version {version}, expected {CACHE_FORMAT_VERSION}"
    elif recorded["encoder_sha256"] != key.encoder_sha256:
        problem = (f"it was computed by the encoder with sha256 {recorded['encoder_sha256']}, not by this "
                   f"folder's encoder {key.encoder_sha256}: it was copied or moved here")
    elif recorded["data_sha256"] != key.data_sha256:
        problem = (f"it encodes the data with sha256 {recorded['data_sha256']}, but the data set's images "
                   f"and labels now have {key.data_sha256}")
    elif codes.dtype != np.uint8 or codes.shape != (n, n_bytes):
        problem = f"codes are {codes.dtype} {codes.shape}, expected uint8 {(n, n_bytes)}"
    elif cached_labels.shape != labels.shape or not np.array_equal(cached_labels, labels):
        problem = "its labels differ from the data set's"
    elif recorded["architecture"] != key.architecture:
        problem = (f"it was computed with the encoder architecture {recorded['architecture']}, "
                   f"the encoder's manifest now says {key.architecture}")
    elif recorded["sha256"] != cache_digest(codes, cached_labels):
        problem = (f"its contents have sha256 {cache_digest(codes, cached_labels)}, but it records "
                   f"{recorded['sha256']}: the file was changed after it was written")
    if problem:
        log.warning("Feature cache %s is stale or corrupt (%s); not using it, rebuilding it.", path, problem)
        return None
    return codes


def _write_cache(path: Path, codes: np.ndarray, labels: np.ndarray, key: CacheKey) -> None:
    """Write the cache; if that fails, say so and go on without it (it only saves time)."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, codes=codes, labels=labels, version=np.int64(CACHE_FORMAT_VERSION),
             sha256=np.str_(cache_digest(codes, labels)), architecture=np.str_(key.architecture),
             encoder_sha256=np.str_(key.encoder_sha256), data_sha256=np.str_(key.data_sha256))
    try:
        make_dir(path.parent, "the feature cache folder")
        atomic_write_bytes(path, buffer.getvalue())
    except HyBNNError as exc:
        log.warning("Feature cache not written, so the codes will be computed again next "
                    "time: %s", exc)


def load_codes(
    artifact: "EncoderArtifact",
    data_root: Path | str,
    split: str,
    *,
    progress: bool = True,
    dataset: str = "mnist",
) -> tuple[np.ndarray, np.ndarray]:
    """``(codes uint8 (N, 25), labels int64 (N,))`` of ``dataset``'s ``split`` under ``artifact``.

    Reads the cache if it is valid, otherwise encodes the images and writes the cache.
    A data set of another image shape than the encoder's is refused.
    """
    from common.data.datasets import get_dataset

    data = get_dataset(dataset)
    check_encoder_shape(artifact, data)
    if data.is_mnist:
        images, labels = load_mnist(data_root, split)
        fingerprint = None
    else:
        images, labels = data.load(data_root, split)
        fingerprint = data.fingerprint(data_root)
    n_bytes = packed_length(artifact.config.latent_bits)
    path = cache_path(artifact, data_root, split, fingerprint)
    key = CacheKey(artifact.sha256, cache_architecture(artifact), dataset_sha256(images, labels))
    if path.is_file():
        codes = _read_cache(path, len(labels), n_bytes, labels, key)
        if codes is not None:
            return codes, labels
    elif path.exists() or path.is_symlink():  # a folder, a pipe (reading it would block), a dead link
        log.warning("Feature cache %s is not a regular file; computing the codes and replacing it.", path)
    codes = encode_images(artifact.encoder, images, progress=progress)
    _write_cache(path, codes, labels, key)
    return codes, labels
