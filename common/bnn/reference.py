"""Centralized reference results kept on disk, keyed by everything that determines them.

``hybnn federate`` measures every federation against a centralized HyBNN trained on the
same codes with the same recipe. Training it again on every run repeats the same work
(the training loop is seeded, so it gives the same numbers), so its result is kept in
``<data root>/references/<key>.json``. The key is the sha256 of what fixes the result:
the task's training and test codes and labels themselves (so the encoder, the data set,
its files and the task are all in it), the BNN's shape, the training recipe (epochs,
learning rate, batch size, seed, dropout) and torch's version. Any change trains anew.

A file is input like any other: one whose key, fields or numbers do not check out is
ignored with a log line and the reference is trained again (and the file replaced).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from common.errors import HyBNNError
from common.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "hybnn-reference/1"
RESULT_FIELDS = {"test_acc": float, "test_loss": float, "epochs": int, "train_seconds": float,
                 "train_examples": int}


def reference_key(arrays: list[np.ndarray], bnn_config: dict, train_config: dict) -> str:
    """sha256 over the arrays' bytes, dtypes and shapes, the BNN config, the recipe and torch's version."""
    digest = hashlib.sha256(FORMAT.encode())
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps({"bnn": bnn_config, "train": train_config, "torch": torch.__version__},
                             sort_keys=True).encode())
    return digest.hexdigest()


def reference_path(data_root: Path | str, key: str) -> Path:
    return Path(data_root) / "references" / f"{key}.json"


def _valid(result: object) -> str | None:
    """Why ``result`` is not a reference result, or None."""
    if not isinstance(result, dict):
        return "its result is not a record"
    for name, kind in RESULT_FIELDS.items():
        value = result.get(name)
        if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
            return f"{name} is not a whole number"
        if kind is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and math.isfinite(value)):
            return f"{name} is not a finite number"
    if not 0.0 <= result["test_acc"] <= 1.0:
        return "test_acc is outside [0, 1]"
    if result["test_loss"] < 0 or result["train_seconds"] < 0:
        return "a loss or a time is negative"
    if result["epochs"] < 1 or result["train_examples"] < 1:
        return "epochs or train_examples is below 1"
    return None


def load_reference(data_root: Path | str, key: str, epochs: int) -> dict | None:
    """The kept result for ``key``, or None (none kept, or one that does not check out)."""
    path = reference_path(data_root, key)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("Ignoring the centralized reference %s: it could not be read (%s); training it again.",
                    path, exc)
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("key") != key:
        why = "it is not a reference of this format" if not isinstance(record, dict) or \
            record.get("format") != FORMAT else "its key does not match its name"
    else:
        result = record.get("result")
        why = _valid(result) or (None if result["epochs"] == epochs else "its epochs differ")
    if why:
        log.warning("Ignoring the centralized reference %s: %s; training it again.", path, why)
        return None
    return {name: record["result"][name] for name in RESULT_FIELDS}


def save_reference(data_root: Path | str, key: str, result: dict) -> Path | None:
    """Keep ``result`` for ``key``; a folder that cannot be written costs only a log line."""
    path = reference_path(data_root, key)
    record = {"format": FORMAT, "key": key, "result": {name: result[name] for name in RESULT_FIELDS}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    except (OSError, HyBNNError) as exc:
        log.warning("Could not keep the centralized reference in %s (%s); the next run trains it again.",
                    path, exc)
        return None
    return path
