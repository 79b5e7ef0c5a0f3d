"""The frozen encoder artifact: encoder weights (safetensors) + a JSON manifest.

Layout of an artifact directory::

    DIR/encoder.safetensors   the encoder's tensors only (never pickle)
    DIR/manifest.json         format version, architecture (with the input shape), the data
                              set(s) trained on and their fingerprints, data hash, training
                              config, the weights' sha256, creation time

The sha256 of ``encoder.safetensors`` is the encoder's identity: features are cached
under it (:mod:`common.encoder.features`) and a federated client refuses an encoder whose hash
differs from the one the server names.

Files are written to temporary names in the same directory and renamed into place,
weights first and manifest last. The manifest names the weights' hash, so a crash
between the two renames leaves an artifact that fails its hash check loudly instead
of one that loads silently wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from common.data.mnist import sha256_file
from common.errors import HyBNNError
from common.fileio import atomic_write_bytes, make_dir
from common.encoder.vae import BinaryVAE, Encoder, VAEConfig

FORMAT = "hybnn-encoder"
FORMAT_VERSION = 1
WEIGHTS_FILE = "encoder.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_KEYS = (
    "format",
    "format_version",
    "architecture",
    "latent_bits",
    "variant",
    "data_sha256",
    "train_config",
    "weights_file",
    "weights_sha256",
    "created",
)


@dataclass
class EncoderArtifact:
    """A loaded, frozen encoder.

    ``encoder`` is in eval mode with ``requires_grad=False``; it maps float images
    ``(N,C,H,W)`` in [0,1] (``config.image_shape``; MNIST's 28 x 28 x 1 for manifests
    without one) to logits ``(N, latent_bits)``. ``sha256`` is the hash of
    ``encoder.safetensors``; ``path`` is the artifact directory.
    """

    encoder: Encoder
    manifest: dict
    sha256: str
    path: Path

    @property
    def config(self) -> VAEConfig:
        return VAEConfig.from_dict(self.manifest["architecture"])


def _rebuild_hint(out_dir: Path) -> str:
    return f"run `hybnn pretrain --out {out_dir}` to rebuild it"


def _encoder_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, detached copies of the encoder's tensors (safetensors needs both)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_encoder_artifact(
    vae: BinaryVAE | Encoder,
    out_dir: Path | str,
    *,
    data_sha256: str,
    train_config: dict,
    history: list,
    datasets: list[str] | None = None,
    data_fingerprints: dict[str, str] | None = None,
) -> "EncoderArtifact":
    """Write ``out_dir/encoder.safetensors`` and ``out_dir/manifest.json``; return the loaded artifact.

    ``datasets`` names the data set(s) the encoder was trained on (default ``["mnist"]``),
    ``data_fingerprints`` their fingerprints (:meth:`common.data.datasets.Dataset.fingerprint`);
    the manifest records both and the input shape ``[H, W, C]``.
    Only the encoder is saved (the decoder is not needed after pretraining). Each file
    is written to a temporary name and renamed, so an existing artifact is replaced
    whole or not at all (see the module docstring for the order).
    """
    out_dir = make_dir(out_dir)
    encoder = vae.encoder if isinstance(vae, BinaryVAE) else vae
    config: VAEConfig = encoder.config

    weights = save(_encoder_state(encoder), metadata={"format": FORMAT})
    weights_sha = hashlib.sha256(weights).hexdigest()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": config.to_dict(),
        "latent_bits": config.latent_bits,
        "variant": config.variant,
        "data_sha256": data_sha256,
        "datasets": list(datasets or ["mnist"]),
        "data_fingerprints": dict(data_fingerprints or {}),
        "input_shape": list(config.image_shape),
        "train_config": dict(train_config),
        "history": list(history),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": weights_sha,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
    }
    atomic_write_bytes(out_dir / WEIGHTS_FILE, weights)
    atomic_write_bytes(out_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return load_encoder_artifact(out_dir, expected_sha256=weights_sha)


def _artifact_dir(path: Path | str) -> Path:
    path = Path(path)
    if path.name == MANIFEST_FILE or (path.suffix == ".json" and not path.is_dir()):
        return path.parent
    return path


def read_manifest(path: Path | str) -> dict:
    """The manifest of the artifact at ``path`` (directory or manifest file), checked for keys."""
    art_dir = _artifact_dir(path)
    manifest_path = art_dir / MANIFEST_FILE
    hint = _rebuild_hint(art_dir)
    if not manifest_path.is_file():
        where = f"the directory {art_dir} does not exist" if not art_dir.exists() else (
            f"{art_dir} has no {MANIFEST_FILE}")
        raise HyBNNError(
            f"No encoder artifact at {manifest_path}: {where}. An encoder artifact is a "
            f"directory holding {WEIGHTS_FILE} and {MANIFEST_FILE}; {hint}, or pass the "
            "path of an existing one."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HyBNNError(
            f"The encoder manifest {manifest_path} is not valid JSON ({exc}). The file is "
            f"damaged or was not written by hybnn; {hint}."
        ) from exc
    if not isinstance(manifest, dict):
        raise HyBNNError(
            f"The encoder manifest {manifest_path} holds a {type(manifest).__name__}, not a "
            f"JSON object; {hint}."
        )
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise HyBNNError(
            f"The encoder manifest {manifest_path} lacks the keys {', '.join(missing)}. It was "
            f"written by another version of hybnn or edited by hand; {hint}."
        )
    if manifest["format"] != FORMAT or manifest["format_version"] != FORMAT_VERSION:
        raise HyBNNError(
            f"The encoder manifest {manifest_path} has format {manifest['format']!r} version "
            f"{manifest['format_version']!r}; this hybnn reads {FORMAT!r} version "
            f"{FORMAT_VERSION}. {hint[0].upper() + hint[1:]}."
        )
    try:
        config = VAEConfig.from_dict(manifest["architecture"])
    except (HyBNNError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HyBNNError(
            f"The encoder manifest {manifest_path} has an unusable architecture entry "
            f"({exc}); {hint}."
        ) from exc
    if manifest["latent_bits"] != config.latent_bits or isinstance(manifest["latent_bits"], bool):
        raise HyBNNError(
            f"The encoder manifest {manifest_path} says latent_bits {manifest['latent_bits']!r}, but its "
            f"architecture has {config.latent_bits}: it was edited by hand or damaged; {hint}."
        )
    weights_file = manifest["weights_file"]
    if not isinstance(weights_file, str) or Path(weights_file).name != weights_file \
            or weights_file in ("", ".", ".."):
        raise HyBNNError(
            f"The encoder manifest {manifest_path} names the weights file {weights_file!r}; it must "
            f"be a plain file name in the artifact's folder (normally {WEIGHTS_FILE}); {hint}."
        )
    return manifest


def load_encoder_artifact(path: Path | str, expected_sha256: str | None = None) -> EncoderArtifact:
    """Load and check the encoder artifact at ``path`` (its directory or its manifest.json).

    Checks, in order: the manifest exists, is JSON and has the expected keys; the
    weights file exists; its sha256 equals the manifest's; it equals ``expected_sha256``
    when one is given; its tensors have exactly the names and shapes of the
    manifest's architecture. Every failure is a :class:`HyBNNError` naming the file.
    """
    art_dir = _artifact_dir(path)
    hint = _rebuild_hint(art_dir)
    manifest = read_manifest(art_dir)
    weights_path = art_dir / manifest["weights_file"]
    if not weights_path.is_file():
        raise HyBNNError(
            f"The encoder weights {weights_path} named by {art_dir / MANIFEST_FILE} are missing; "
            f"{hint}."
        )
    actual = sha256_file(weights_path)
    if actual != manifest["weights_sha256"]:
        raise HyBNNError(
            f"The encoder weights {weights_path} have sha256 {actual}, but "
            f"{art_dir / MANIFEST_FILE} says {manifest['weights_sha256']}. The file is "
            f"truncated, damaged or was replaced; {hint}."
        )
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise HyBNNError(
            f"The encoder weights {weights_path} have sha256 {actual}, but this run expects "
            f"{expected_sha256}. This is a different encoder from the one the run was set up "
            "with: point the run at the encoder with the expected hash, or update the "
            "expected hash in the run config if the new encoder is intended."
        )
    config = VAEConfig.from_dict(manifest["architecture"])
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise HyBNNError(
            f"The encoder weights {weights_path} are not a readable safetensors file ({exc}); "
            f"{hint}."
        ) from exc
    try:  # shapes only, no memory: a manifest may name an architecture too large to build
        with torch.device("meta"):
            expected_shapes = {k: tuple(v.shape) for k, v in Encoder(config).state_dict().items()}
    except (RuntimeError, ValueError, TypeError) as exc:
        raise HyBNNError(
            f"The encoder manifest {art_dir / MANIFEST_FILE} names an architecture that cannot be "
            f"built ({exc}); {hint}."
        ) from exc
    got_shapes = {k: tuple(v.shape) for k, v in state.items()}
    if got_shapes != expected_shapes:
        diff = sorted(
            f"{k}: file {got_shapes.get(k, 'absent')} vs config {expected_shapes.get(k, 'absent')}"
            for k in set(expected_shapes) | set(got_shapes)
            if got_shapes.get(k) != expected_shapes.get(k)
        )
        raise HyBNNError(
            f"The encoder weights {weights_path} do not match the architecture in "
            f"{art_dir / MANIFEST_FILE} ({'; '.join(diff[:4])}"
            f"{'; ...' if len(diff) > 4 else ''}); {hint}."
        )
    encoder = Encoder(config)  # as large as the weights file, whose shapes match it
    encoder.load_state_dict(state, strict=True)
    encoder.eval()
    encoder.requires_grad_(False)
    return EncoderArtifact(encoder=encoder, manifest=manifest, sha256=actual, path=art_dir)


def encoder_matches(
    path: Path | str,
    vae_config: VAEConfig,
    data_sha256: str,
    train_config: dict | None = None,
) -> bool:
    """Whether ``path`` holds a valid artifact built from this config and data.

    ``reproduce`` uses it to reuse an encoder instead of retraining. ``train_config``,
    when given, must match too. Never raises: anything unreadable is "no match".
    """
    try:
        manifest = read_manifest(path)
        if VAEConfig.from_dict(manifest["architecture"]) != vae_config:
            return False
        if manifest["data_sha256"] != data_sha256:
            return False
        if train_config is not None and manifest["train_config"] != dict(train_config):
            return False
        load_encoder_artifact(path)
    except HyBNNError:
        return False
    return True
