"""Checkpoints of a federated run, and resuming one from its last saved round.

After every round the ServerApp saves, under ``<out-dir>/checkpoint/``:

* ``global-rNNNN.safetensors``: the global model's payload (the arrays of the
  ``ArrayRecord`` the clients receive next, :mod:`common.federated.codec`), as numpy arrays;
* ``state.json``: the round it follows, the run's identity (task, encoder sha256, the
  fingerprint of the data set it trains and evaluates on, codec version, BNN shape) and every setting that decides the model (seed, rounds,
  learning rate and its schedule, partition, ...), the sha256 of the arrays file, and
  the run's record so far (server.json's rounds), which the resumed run goes on with.

Both are written atomically, the arrays first, so ``state.json`` always names a
complete arrays file. Nothing is pickled. Reading one back checks every field it holds by
type and range (:func:`check_record` for the record of the rounds), so a damaged or edited
checkpoint is a :class:`HyBNNError` before any training, never a crash after it. The clients' randomness in a round depends
only on (seed, round, partition) and the learning rate only on the round, so a run
resumed from round ``k`` goes on exactly as the uninterrupted run would have.

Flower's ``Strategy.start`` always counts rounds from 1; :class:`RoundOffset` is the one
place that turns its rounds into the run's rounds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from common.errors import HyBNNError
from common.fileio import atomic_write_bytes

CHECKPOINT_DIR = "checkpoint"
STATE_NAME = "state.json"
FORMAT = "hybnn-fed-checkpoint/1"
STAGING_LOCK_NAME = ".lock"
"""In an unpublished run folder (``.run-*``): locked (flock) by the process whose run it is, while it lives."""

DETERMINING_SETTINGS = (
    "task", "num_server_rounds", "local_epochs", "lr", "lr_schedule", "batch_size", "aggregation",
    "vote_latent_scale", "mean_latent_scale", "bn_dtype", "uplink_codec", "partition", "dirichlet_alpha", "seed",
    "min_available_nodes", "dataset", "input_dropout", "lr_in_round", "flip_blocks",
    "flip_block_rounds", "flip_margin",
)
"""The run-config settings a resumed run must share with the checkpoint: they decide the model
(the flip settings only with the flip uplink, the one codec that reads them)."""
FLIP_ONLY_SETTINGS = ("flip_blocks", "flip_block_rounds", "flip_margin")
"""Read only with the flip uplink: a sign-codec run's identity ignores them."""
SETTING_DEFAULTS = {"dataset": "mnist", "mean_latent_scale": 1.0, "input_dropout": 0.0, "lr_in_round": "constant",
                    "flip_blocks": 1, "flip_block_rounds": 0,
                    "flip_margin": 0.0}
"""What a checkpoint that predates a setting ran with (checkpoints before ``dataset`` were MNIST's,
before ``mean_latent_scale`` the clients restarted from the mean itself, before ``input_dropout``
the clients trained without it, before ``lr_in_round`` at a constant rate within a round, and
before ``flip_blocks`` every weight in every round, before ``flip_block_rounds`` blocks in every round
from round 2, before ``flip_margin`` no flip put back)."""


@dataclass(frozen=True)
class Checkpoint:
    """A run's state after ``round``: the global model's payload and what produced it."""

    round: int
    payload: dict[str, np.ndarray]
    state: dict
    directory: Path


def identity(settings: dict, encoder_sha256: str, codec_version: int, bnn: dict,
             data_fingerprint: str | None = None) -> dict:
    """What a checkpoint and the run resuming it must agree on, as JSON has it (tuples become lists).
    ``data_fingerprint``: :meth:`common.data.datasets.Dataset.fingerprint` of the run's data set, so a
    data file changed behind the same path is not resumed on."""
    return json.loads(json.dumps({
        "settings": {key: settings[key] for key in DETERMINING_SETTINGS},
        "encoder_sha256": encoder_sha256,
        "data_fingerprint": data_fingerprint,
        "codec_version": codec_version,
        "bnn": bnn,
    }))


def save_checkpoint(out_dir: Path, server_round: int, payload: dict[str, np.ndarray], ident: dict,
                    record: dict | None = None) -> Path:
    """Save the global model after ``server_round``; older arrays files are removed after."""
    directory = Path(out_dir) / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    data = save_arrays({key: np.ascontiguousarray(value) for key, value in payload.items()})
    name = f"global-r{server_round:04d}.safetensors"
    atomic_write_bytes(directory / name, data)
    state = {"format": FORMAT, "round": server_round, "arrays": name,
             "arrays_sha256": hashlib.sha256(data).hexdigest(), "saved_at": time.time(), **ident,
             "record": record or {}}
    atomic_write_bytes(directory / STATE_NAME, json.dumps(state, indent=2).encode())
    for old in directory.glob("global-r*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory


def read_state(run_dir: Path) -> dict | None:
    """``state.json`` of the checkpoint in ``run_dir``, ``None`` if there is none or it is unreadable."""
    try:
        state = json.loads((Path(run_dir) / CHECKPOINT_DIR / STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("format") == FORMAT else None


def saved_at(state: dict) -> float:
    """When a checkpoint was saved (seconds since the epoch); 0 for a value that is not a finite number."""
    value = state.get("saved_at")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0
    return float(value)


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The checkpoint in ``run_dir``; a :class:`HyBNNError` says what is missing or damaged."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    state_path = directory / STATE_NAME
    if not state_path.exists():
        raise HyBNNError(f"No checkpoint to resume from: {state_path} does not exist. A run saves one "
                         "after its first aggregated round.")
    state = read_state(run_dir)
    if state is None:
        raise HyBNNError(f"{state_path} is not a FedHyBNN checkpoint ({FORMAT}).")
    server_round, name = state.get("round"), state.get("arrays")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        raise HyBNNError(f"{state_path} names round {server_round!r}; a checkpoint is saved after a round "
                         "1, 2, ..., so the file was edited or damaged.")
    if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
        raise HyBNNError(f"{state_path} names the arrays file {name!r}; it must be a file name inside "
                         f"{directory}, so the file was edited or damaged.")
    arrays_path = directory / name
    try:
        data = arrays_path.read_bytes()
    except OSError as exc:
        raise HyBNNError(f"The checkpoint in {directory} is incomplete ({exc}).") from exc
    if hashlib.sha256(data).hexdigest() != state.get("arrays_sha256"):
        raise HyBNNError(f"The checkpoint arrays {arrays_path} do not match the sha256 in {state_path}; "
                         "the file is damaged.")
    try:
        payload = load_arrays(data)
    except (SafetensorError, ValueError) as exc:
        raise HyBNNError(f"The checkpoint arrays {arrays_path} do not load ({exc}).") from exc
    return Checkpoint(round=server_round, payload=payload, state=state, directory=directory)


ROUND_FIELDS = {
    # name: (required, what it must be)
    "test_acc": (True, "fraction"), "test_loss": (True, "number"), "uplink_bytes": (True, "count"),
    "downlink_bytes": (True, "count"), "clients": (True, "records"), "dropped": (True, "records"),
    "capped": (False, "records"), "connected": (False, "count"), "sampled": (False, "list"),
    "sampled_partitions": (False, "list"), "replied": (False, "list"), "seconds": (False, "number"),
    "uplink_bits_per_binary_weight": (False, "number"), "sign_bits_per_binary_weight": (False, "number"),
    "sign_flip_fraction": (False, "fraction"),
}
"""The fields of a round in a checkpoint's record that the resumed run reads, and their kind."""


def _is_kind(value, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "fraction":
        return number and 0 <= value <= 1
    if kind == "number":
        return number and value >= 0
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "records":
        return isinstance(value, list) and all(isinstance(item, dict) for item in value)
    return isinstance(value, list)


KIND_WORDS = {"fraction": "a number from 0 to 1", "number": "a finite number >= 0", "count": "a whole number >= 0",
              "records": "a list of JSON objects", "list": "a list"}


def check_record(record, server_round: int, state_path: Path) -> None:
    """Refuse a checkpoint's record of rounds 1..``server_round`` that the resumed run could not go on
    with: each field by type and range, so that it fails here, not when the results are written."""
    def refuse(what: str) -> None:
        raise HyBNNError(f"{state_path} holds {what}, so the file was edited or damaged; the run cannot be "
                         "resumed from it. Start it afresh with another --out, or resume an undamaged copy.")

    if not isinstance(record, dict):
        refuse(f"a record of type {type(record).__name__}, not a JSON object")
    rounds = record.get("rounds")
    if not isinstance(rounds, list) or [r.get("round") if isinstance(r, dict) else None for r in rounds] \
            != list(range(1, server_round + 1)):
        refuse(f"no record of rounds 1 to {server_round} (its 'rounds' entry is not that list)")
    for entry in rounds:
        for name, (required, kind) in ROUND_FIELDS.items():
            if name not in entry:
                if required:
                    refuse(f"a record of round {entry['round']} without its {name!r}")
                continue
            value = entry[name]
            if not (_is_kind(value, kind) or (not required and value is None)):
                refuse(f"{name!r} = {value!r} in the record of round {entry['round']}; it must be {KIND_WORDS[kind]}")
        for client in entry["clients"]:
            reported = client.get("reported", {})
            if not _is_kind(client.get("node_id"), "count") or not isinstance(reported, dict) \
                    or not _is_kind(reported.get("partition_id", 0), "count") \
                    or any(reported.get(key) is not None and not _is_kind(reported[key], "number")
                           for key in ("train_acc", "train_loss")):
                refuse(f"the client {client!r} in the record of round {entry['round']}; a client is a node_id "
                       "(a whole number) and what it reported (partition_id, train_acc, train_loss)")
    initial = record.get("initial", {})
    if not isinstance(initial, dict) or any(not _is_kind(initial[key], kind) for key, kind in
                                            (("test_acc", "fraction"), ("test_loss", "number")) if key in initial):
        refuse(f"the initial evaluation {initial!r}; it must be a JSON object of test_acc (0 to 1) and test_loss")
    resumed = record.get("resumed_after_rounds", [])
    if not isinstance(resumed, list) or any(not _is_kind(value, "count") or not 1 <= value < server_round
                                            for value in resumed):
        refuse(f"resumed_after_rounds = {resumed!r}; it must be a list of rounds from 1 to {server_round - 1}")


def check_payload(checkpoint: Checkpoint, layout) -> None:
    """Refuse checkpoint arrays that are not a global model of this BNN (``layout``, :mod:`common.federated.codec`)."""
    from common.federated.codec import CodecError, decode

    try:
        decode(checkpoint.payload, layout)
    except CodecError as exc:
        raise HyBNNError(f"The checkpoint arrays in {checkpoint.directory} are not a global model of this "
                         f"run's BNN ({exc}).") from exc


def check_matches(state: dict, ident: dict) -> None:
    """Refuse a checkpoint taken by another run: every difference is named."""
    differences = []
    for key in ("encoder_sha256", "data_fingerprint", "codec_version", "bnn"):
        if key == "data_fingerprint" and "data_fingerprint" not in state:
            continue  # saved before checkpoints recorded it: the run's settings still name the data set
        if state.get(key) != ident[key]:
            differences.append(f"{key.replace('_', ' ')}: checkpoint {state.get(key)!r}, this run {ident[key]!r}")
    saved = state.get("settings")
    saved = saved if isinstance(saved, dict) else {}
    for key, value in ident["settings"].items():
        if key in FLIP_ONLY_SETTINGS and ident["settings"].get("uplink_codec") != "flips":
            continue  # the sign codec ignores it
        recorded = saved.get(key, SETTING_DEFAULTS.get(key))
        if recorded != value:
            differences.append(f"{key.replace('_', '-')}: checkpoint {recorded!r}, this run {value!r}")
    if differences:
        raise HyBNNError("The checkpoint belongs to another run and cannot be resumed by this one ("
                         + "; ".join(differences) + "). Resume with the options of the run that saved it.")
    if int(state["round"]) >= int(ident["settings"]["num_server_rounds"]):
        raise HyBNNError(f"The checkpoint is from round {state['round']}, the last of "
                         f"{ident['settings']['num_server_rounds']}: the run is complete, nothing to resume.")


def run_in_progress(staging: Path) -> bool:
    """Whether a live process holds the lock of the staging folder ``staging`` (its run goes on)."""
    try:
        fd = os.open(Path(staging) / STAGING_LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def latest_run_dir(directory: Path) -> Path:
    """The run folder under ``directory`` (itself or an unpublished ``.run-*`` folder in it)
    whose checkpoint was saved last: a run cut off before publishing its results keeps its
    checkpoint in its staging folder. The staging folder of a run still going on is not one."""
    directory = Path(directory)
    candidates = [directory, *(path for path in sorted(directory.glob(".run-*")) if not run_in_progress(path))]
    saved = [(saved_at(state), path) for path in candidates
             if (state := read_state(path)) is not None]
    if not saved:
        raise HyBNNError(f"No checkpoint to resume from in {directory} (looked for {CHECKPOINT_DIR}/{STATE_NAME} "
                         "there and in its unpublished .run-* folders).")
    return max(saved)[1]


class RoundOffset:
    """Mixin for a Flower strategy: rounds ``1..n`` of ``Strategy.start`` become ``offset+1..offset+n``.

    ``start(num_rounds=N)`` runs rounds ``offset+1..N``; ``evaluate_fn`` gets the run's
    round, and the evaluation of the starting model (Flower's round 0) is skipped on a
    resumed run, whose starting model is the last round's.
    """

    round_offset: int = 0

    def start(self, *, num_rounds: int, evaluate_fn: Callable | None = None, **kwargs):
        offset = self.round_offset

        def shifted_evaluate(server_round: int, arrays):
            if server_round == 0 and offset:
                return None
            return evaluate_fn(server_round + offset if server_round else 0, arrays)

        return super().start(num_rounds=num_rounds - offset,
                             evaluate_fn=shifted_evaluate if evaluate_fn else None, **kwargs)

    def configure_train(self, server_round, arrays, config, grid):
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return super().aggregate_train(server_round + self.round_offset, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return super().aggregate_evaluate(server_round + self.round_offset, replies)
