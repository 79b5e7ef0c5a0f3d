"""Saving and loading a trained BNN: safetensors weights plus a JSON sidecar.

``model.safetensors`` holds the state dict (latent weights and batch-norm state);
``model.json`` holds the :class:`~common.bnn.model.BNNConfig`, the weights' sha256 and
free-form metadata (task, encoder sha256, accuracy, ...).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save

from common.bnn.model import BNN, BNNConfig
from common.errors import HyBNNError
from common.fileio import atomic_write_bytes, make_dir

WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
FORMAT = "hybnn-bnn/1"


def save_bnn(model: BNN, out_dir: Path | str, meta: dict | None = None) -> Path:
    """Write ``model`` to ``out_dir`` (created if needed); return the directory."""
    out_dir = make_dir(out_dir)
    weights = save({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    sidecar = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "meta": meta or {},
    }
    atomic_write_bytes(out_dir / WEIGHTS_NAME, weights)
    atomic_write_bytes(out_dir / META_NAME, json.dumps(sidecar, indent=2).encode())
    return out_dir


def load_bnn(path: Path | str) -> tuple[BNN, dict]:
    """Load a BNN saved by :func:`save_bnn`; return ``(model in eval mode, sidecar dict)``."""
    path = Path(path)
    out_dir = path.parent if path.is_file() else path
    fix = "Train it again with `hybnn train`, or point --model at a directory written by it."
    sidecar_path = out_dir / META_NAME
    weights = out_dir / WEIGHTS_NAME
    if not sidecar_path.is_file() or not weights.is_file():
        raise HyBNNError(f"{out_dir} is not a saved BNN (it needs {META_NAME} and {WEIGHTS_NAME}). {fix}")
    try:
        sidecar = json.loads(sidecar_path.read_text())
        if sidecar.get("format") != FORMAT:
            raise ValueError(f"format is {sidecar.get('format')!r}, expected {FORMAT!r}")
        config = BNNConfig.from_dict(sidecar["config"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, HyBNNError) as exc:
        raise HyBNNError(f"{sidecar_path} is not a valid BNN description ({exc}). {fix}") from exc
    try:
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    except OSError as exc:
        raise HyBNNError(f"{weights} could not be read ({exc.strerror or exc}). {fix}") from exc
    if digest != sidecar.get("weights_sha256"):
        raise HyBNNError(
            f"{weights} has sha256 {digest}, but {sidecar_path} records "
            f"{sidecar.get('weights_sha256')}: the file is corrupt or was replaced. {fix}"
        )
    try:
        model = BNN(config)
    except HyBNNError as exc:
        raise HyBNNError(f"{sidecar_path}: {exc}") from exc
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise HyBNNError(f"{weights} does not hold a BNN of shape {config} ({exc}). {fix}") from exc
    model.eval()
    return model, sidecar
