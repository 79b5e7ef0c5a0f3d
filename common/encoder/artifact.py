"""The frozen encoder artifact: encoder weights (safetensors) + a JSON manifest.

Layout of an artifact directory::

    DIR/encoder.safetensors   the encoder's tensors only (never pickle)
    DIR/manifest.json         format version, architecture (with the input shape), the data
                              set(s) trained on and their fingerprints, data hash, training
                              config, the weights' sha256, creation time

The sha256 of ``encoder.safetensors`` is the encoder's identity: features are cached
under it (:mod:`common.encoder.features`), checkpoints, models and exports name it, and a
federated client refuses an encoder whose hash differs from the one the server names. The
weights file also records, in one safetensors metadata entry (``hybnn-encoder``, canonical
JSON), every manifest field that decides what the encoder computes or which encoder a run
may reuse (:data:`RECORDED_KEYS`), so its sha256 covers them; on load the manifest must agree
with that record, field by field. Artifacts written before the record existed are refused
with a message naming ``hybnn upgrade-encoder`` (:func:`upgrade_encoder_artifact`), which
rewrites the weights file with it, tensors unchanged.

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from common.data.mnist import sha256_file
from common.errors import HyBNNError
from common.fileio import atomic_write_bytes, keeping_earlier, make_dir
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
METADATA_KEY = "hybnn-encoder"
"""The weights file's one metadata entry: canonical JSON of :func:`recorded_fields`. One entry, not
several: safetensors writes several in a random order, so the same encoder would get another sha256
on every save."""
METADATA_VERSION = 1
RECORDED_KEYS = ("architecture", "data_sha256", "datasets", "data_fingerprints", "train_config")
"""The manifest entries the weights file records. ``architecture`` builds the encoder and shapes its
input (image size and channels, latent bits, conv widths, activation slope; the variant, KL weight
and code rotation it was trained with); the training data and config decide whether ``reproduce``
reuses it. ``history``, ``created`` and ``torch_version`` describe the run and stay outside."""
ARCHITECTURE_COPIES = {"latent_bits": "latent_bits", "variant": "variant", "input_shape": "image_shape"}
"""Manifest keys that repeat an architecture field for a quick look; they must agree with the record."""


class EncoderUpgradeNeeded(HyBNNError):
    """An artifact written before the weights file recorded its manifest fields: ``hybnn upgrade-encoder``
    rewrites it."""


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


def _canonical(value: object) -> str:
    """The one JSON spelling of ``value`` (sorted keys, no spaces, no NaN), so equal fields give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def recorded_fields(manifest: dict) -> dict:
    """What the weights file records of ``manifest`` (:data:`RECORDED_KEYS`), normalised: the architecture
    with every field spelt out (defaults of older manifests included), as plain JSON values."""
    config = VAEConfig.from_dict(manifest["architecture"])
    fields = {
        "format": FORMAT,
        "version": METADATA_VERSION,
        "architecture": {**config.to_dict(), "code_rotation": config.code_rotation},
        "data_sha256": manifest["data_sha256"],
        # manifests written before other data sets existed hold MNIST encoders
        "datasets": manifest.get("datasets", ["mnist"]),
        "data_fingerprints": manifest.get("data_fingerprints", {}),
        "train_config": manifest["train_config"],
    }
    return json.loads(_canonical(fields))


def _weights_bytes(state: dict[str, torch.Tensor], manifest: dict, manifest_path: Path) -> bytes:
    """The safetensors file of ``state`` with the record of ``manifest`` in its metadata."""
    try:
        record = _canonical(recorded_fields(manifest))
    except (TypeError, ValueError) as exc:  # NaN, or a value JSON cannot hold
        raise HyBNNError(f"The encoder manifest {manifest_path} holds a value that cannot be recorded "
                         f"({exc}); {_rebuild_hint(manifest_path.parent)}.") from exc
    return save(state, metadata={METADATA_KEY: record})


def _read_record(weights_path: Path, hint: str) -> dict | None:
    """The record in the weights file's metadata, or ``None`` when it has none (an earlier artifact)."""
    try:
        with safe_open(str(weights_path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise HyBNNError(f"The encoder weights {weights_path} are not a readable safetensors file "
                         f"({exc}); {hint}.") from exc
    if METADATA_KEY not in metadata:
        return None
    try:
        record = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError) as exc:
        record = exc
    if not isinstance(record, dict) or record.get("format") != FORMAT \
            or record.get("version") != METADATA_VERSION:
        raise HyBNNError(
            f"The encoder weights {weights_path} hold a {METADATA_KEY!r} metadata entry that this hybnn "
            f"cannot read (not a JSON object of format {FORMAT!r} version {METADATA_VERSION}); {hint}.")
    return record


def _record_differences(manifest: dict, record: dict) -> list[str]:
    """``field: the manifest says A, the weights file records B`` for each field on which they differ."""
    try:
        wanted = recorded_fields(manifest)
    except (TypeError, ValueError) as exc:
        return [f"the manifest holds a value that cannot be compared ({exc})"]
    pairs: list[tuple[str, object, object]] = []
    missing = object()
    for key in sorted(set(wanted) | set(record)):
        ours, theirs = wanted.get(key, missing), record.get(key, missing)
        if isinstance(ours, dict) and isinstance(theirs, dict):
            pairs += [(f"{key}.{sub}", ours.get(sub, missing), theirs.get(sub, missing))
                      for sub in sorted(set(ours) | set(theirs))]
        else:
            pairs.append((key, ours, theirs))
    architecture = record.get("architecture") if isinstance(record.get("architecture"), dict) else {}
    pairs += [(key, manifest[key], architecture.get(field, missing))
              for key, field in ARCHITECTURE_COPIES.items() if key in manifest]

    def spelt(value: object) -> str:
        return "nothing" if value is missing else _canonical(value)

    return [f"{name}: the manifest says {spelt(ours)}, the weights file records {spelt(theirs)}"
            for name, ours, theirs in pairs if ours is missing or theirs is missing
            or _canonical(ours) != _canonical(theirs)]


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
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
    }
    weights = _weights_bytes(_encoder_state(encoder), manifest, out_dir / MANIFEST_FILE)
    weights_sha = hashlib.sha256(weights).hexdigest()
    manifest["weights_sha256"] = weights_sha
    atomic_write_bytes(out_dir / WEIGHTS_FILE, weights)
    atomic_write_bytes(out_dir / MANIFEST_FILE, _manifest_bytes(manifest))
    return load_encoder_artifact(out_dir, expected_sha256=weights_sha)


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def artifact_dir(path: Path | str) -> Path:
    """The artifact's folder, given the folder or its manifest."""
    path = Path(path)
    if path.name == MANIFEST_FILE or (path.suffix == ".json" and not path.is_dir()):
        return path.parent
    return path


def read_manifest(path: Path | str) -> dict:
    """The manifest of the artifact at ``path`` (directory or manifest file), checked for keys."""
    art_dir = artifact_dir(path)
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


@dataclass
class _CheckedWeights:
    path: Path
    sha256: str
    state: dict[str, torch.Tensor]
    record: dict | None
    """The weights file's record of the manifest; ``None`` for an artifact written before it existed."""


def _check_weights(art_dir: Path, manifest: dict) -> _CheckedWeights:
    """The weights named by ``manifest``, checked: present, of the manifest's sha256, readable, in
    agreement with the manifest's fields (when they record them) and of its architecture's shapes."""
    hint = _rebuild_hint(art_dir)
    manifest_path = art_dir / MANIFEST_FILE
    weights_path = art_dir / manifest["weights_file"]
    if not weights_path.is_file():
        raise HyBNNError(
            f"The encoder weights {weights_path} named by {manifest_path} are missing; "
            f"{hint}."
        )
    actual = sha256_file(weights_path)
    if actual != manifest["weights_sha256"]:
        raise HyBNNError(
            f"The encoder weights {weights_path} have sha256 {actual}, but "
            f"{manifest_path} says {manifest['weights_sha256']}. The file is "
            f"truncated, damaged or was replaced; {hint}."
        )
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise HyBNNError(
            f"The encoder weights {weights_path} are not a readable safetensors file ({exc}); "
            f"{hint}."
        ) from exc
    record = _read_record(weights_path, hint)
    if record is not None:
        differences = _record_differences(manifest, record)
        if differences:
            raise HyBNNError(
                f"The encoder manifest {manifest_path} disagrees with the weights file {weights_path} on "
                f"{'; '.join(differences[:3])}{f' (and {len(differences) - 3} more)' if len(differences) > 3 else ''}. "
                "The encoder's sha256 covers the weights file's record, not the manifest: the manifest "
                "was edited or belongs to another encoder. "
                f"Put the manifest's value back, or {hint}."
            )
    config = VAEConfig.from_dict(manifest["architecture"])
    try:  # shapes only, no memory: a manifest may name an architecture too large to build
        with torch.device("meta"):
            expected_shapes = {k: tuple(v.shape) for k, v in Encoder(config).state_dict().items()}
    except (RuntimeError, ValueError, TypeError) as exc:
        raise HyBNNError(
            f"The encoder manifest {manifest_path} names an architecture that cannot be "
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
            f"{manifest_path} ({'; '.join(diff[:4])}"
            f"{'; ...' if len(diff) > 4 else ''}); {hint}."
        )
    return _CheckedWeights(path=weights_path, sha256=actual, state=state, record=record)


def _upgrade_error(art_dir: Path, weights_path: Path) -> EncoderUpgradeNeeded:
    return EncoderUpgradeNeeded(
        f"The encoder {art_dir} was written by an earlier hybnn: its weights file {weights_path} does not "
        "record the manifest fields that decide what the encoder computes (architecture, image shape, "
        "training data and config), so its sha256 does not cover them and an edited manifest would go "
        f"unnoticed. Run `hybnn upgrade-encoder {art_dir}` to rewrite the weights file with them (the "
        f"tensors and the codes stay the same, the sha256 changes, the earlier files are kept in "
        f"{art_dir}/replaced-TIME/), or {_rebuild_hint(art_dir)}."
    )


def load_encoder_artifact(path: Path | str, expected_sha256: str | None = None) -> EncoderArtifact:
    """Load and check the encoder artifact at ``path`` (its directory or its manifest.json).

    Checks, in order: the manifest exists, is JSON and has the expected keys; the
    weights file exists; its sha256 equals the manifest's; it is a safetensors file;
    the manifest's fields agree with the weights file's record of them (:data:`RECORDED_KEYS`);
    its tensors have exactly the names and shapes of the manifest's architecture; it has
    that record (:class:`EncoderUpgradeNeeded` otherwise); its sha256 equals
    ``expected_sha256`` when one is given. Every failure is a :class:`HyBNNError` naming the file.
    """
    art_dir = artifact_dir(path)
    manifest = read_manifest(art_dir)
    weights = _check_weights(art_dir, manifest)
    if weights.record is None:
        raise _upgrade_error(art_dir, weights.path)
    if expected_sha256 is not None and weights.sha256 != expected_sha256.lower():
        raise HyBNNError(
            f"The encoder weights {weights.path} have sha256 {weights.sha256}, but this run expects "
            f"{expected_sha256}. This is a different encoder from the one the run was set up "
            "with: point the run at the encoder with the expected hash, or update the "
            "expected hash in the run config if the new encoder is intended."
        )
    encoder = Encoder(VAEConfig.from_dict(manifest["architecture"]))  # as large as the weights file
    encoder.load_state_dict(weights.state, strict=True)
    encoder.eval()
    encoder.requires_grad_(False)
    return EncoderArtifact(encoder=encoder, manifest=manifest, sha256=weights.sha256, path=art_dir)


def encoder_matches(
    path: Path | str,
    vae_config: VAEConfig,
    data_sha256: str,
    train_config: dict | None = None,
) -> bool:
    """Whether ``path`` holds a valid artifact built from this config and data.

    ``reproduce`` uses it to reuse an encoder instead of retraining. ``train_config``,
    when given, must match too. Anything unreadable is "no match"; the one error it raises is
    :class:`EncoderUpgradeNeeded`, for an artifact that matches but was written before its weights
    file recorded its fields: ``hybnn upgrade-encoder`` takes a second, training anew takes minutes.
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
    except EncoderUpgradeNeeded:
        raise
    except HyBNNError:
        return False
    return True


@dataclass(frozen=True)
class EncoderUpgrade:
    """What :func:`upgrade_encoder_artifact` did."""

    old_sha256: str
    new_sha256: str
    path: Path
    """The upgraded artifact's folder."""
    kept: Path | None
    """Where the earlier files in ``path`` were moved (``None``: there were none)."""
    upgraded: bool
    """``False``: the weights file already recorded its fields, and nothing was written."""


def _same_tensors(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> bool:
    """The same names, dtypes, shapes and bytes (bit for bit, NaN included)."""
    return old.keys() == new.keys() and all(
        old[k].dtype == new[k].dtype and old[k].shape == new[k].shape
        and old[k].contiguous().numpy().tobytes() == new[k].contiguous().numpy().tobytes() for k in old)


def upgrade_encoder_artifact(path: Path | str, out: Path | str | None = None) -> EncoderUpgrade:
    """Rewrite an artifact written before the weights file recorded its manifest fields.

    The tensors are copied unchanged into a new weights file that records the manifest's fields
    (:data:`RECORDED_KEYS`), and the manifest is written again with the new sha256 and
    ``upgraded_from_sha256``, the old one. Into ``out`` (default: in place); earlier files of
    those names there are moved to ``replaced-<time>/`` (:func:`common.fileio.keeping_earlier`),
    and moved back if the new artifact does not load with the same tensors. The artifact is
    checked as :func:`load_encoder_artifact` checks it first; one that records its fields
    already is left as it is.
    """
    source = artifact_dir(path)
    manifest = read_manifest(source)
    weights = _check_weights(source, manifest)
    if weights.record is not None:
        return EncoderUpgrade(weights.sha256, weights.sha256, source, kept=None, upgraded=False)
    data = _weights_bytes(weights.state, manifest, source / MANIFEST_FILE)
    new_sha = hashlib.sha256(data).hexdigest()
    upgraded = {**manifest, "weights_sha256": new_sha, "upgraded_from_sha256": weights.sha256}
    target = make_dir(source if out is None else out, "the upgraded encoder's folder")
    with keeping_earlier(target, (manifest["weights_file"], MANIFEST_FILE)) as kept:
        atomic_write_bytes(target / manifest["weights_file"], data)
        atomic_write_bytes(target / MANIFEST_FILE, _manifest_bytes(upgraded))
        load_encoder_artifact(target, expected_sha256=new_sha)
        if not _same_tensors(weights.state, load_file(str(target / manifest["weights_file"]))):
            raise HyBNNError(f"The upgraded weights in {target} do not hold the same tensors as {weights.path}; "
                             "the earlier files are back in place. This is a bug: please report it.")
    return EncoderUpgrade(weights.sha256, new_sha, target, kept=kept, upgraded=True)
