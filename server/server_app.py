"""The FedHyBNN ServerApp: PackedFedAvg plus central evaluation of the global BNN.

The server holds the frozen encoder too (``encoder-path`` in the run config): it
checks the encoder's sha256 against ``encoder-sha256`` (when set), tells the clients
that hash, and evaluates the global BNN on the task's test codes after every round.
It writes, after every round, so that a stopped run leaves what it reached:

* ``<out-dir>/server.json``: run config, encoder hash, per round the global test
  accuracy and loss, the bytes each client sent and received, dropped replies;
* ``<out-dir>/global/``: the global BNN (:func:`common.bnn_io.save_bnn`), its latent
  weights being the vote or the mean the clients restart from.

Run config keys are kebab-case, declared with their defaults in pyproject.toml's
``[tool.flwr.app.config]``; relative paths are taken from the ServerApp's working
directory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common import aggregation as agg
from common import codec, flipcodec
from common.bnn import BNN, BNNConfig, codes_to_inputs
from common.errors import HyBNNError
from common.fileio import atomic_write_bytes
from common.tasks import select_task, task_for_dataset
from common.training import evaluate
from server.strategy import PackedFedAvg, RoundLog
from server.wire import record_nbytes, record_to_payload

SERVER_RESULTS = "server.json"

app = ServerApp()


@dataclass(frozen=True)
class ServerSettings:
    """The run config, typed. Field ``x_y`` is run-config key ``x-y``."""

    task: str = "4v5"
    dataset: str = "mnist"
    num_server_rounds: int = 20
    local_epochs: int = 2
    lr: float = 0.03
    lr_schedule: str = "cosine"
    """``cosine``: the clients' learning rate falls from ``lr`` to ``lr/100`` over the rounds."""
    batch_size: int = 64
    aggregation: str = agg.DEFAULT_MODE
    vote_latent_scale: float = agg.DEFAULT_VOTE_LATENT_SCALE
    bn_dtype: str = "float16"
    uplink_codec: str = "signs"
    """``signs``: every sign bit each round; ``flips``: only the signs changed against the global."""
    encoder_sha256: str = ""
    encoder_path: str = "artifacts/encoder"
    data_root: str = "data"
    out_dir: str = "runs/fedhybnn"
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    seed: int = 0
    min_available_nodes: int = 3
    min_train_nodes: int = 1
    node_wait_s: float = 120.0
    round_timeout_s: float = 600.0

    @classmethod
    def from_run_config(cls, run_config: dict) -> "ServerSettings":
        """Typed settings; unknown keys are ignored, wrong types are a :class:`HyBNNError`."""
        values = {}
        for name, default in asdict(cls()).items():
            key = name.replace("_", "-")
            if key not in run_config:
                continue
            raw = run_config[key]
            try:
                values[name] = type(default)(raw) if not isinstance(default, bool) else bool(raw)
            except (TypeError, ValueError) as exc:
                raise HyBNNError(f"Run config {key}={raw!r} is not a {type(default).__name__} ({exc}).") from exc
        settings = cls(**values)
        task_for_dataset(settings.task, settings.dataset)
        agg.check_mode(settings.aggregation)
        if settings.bn_dtype not in codec.BN_DTYPES:
            raise HyBNNError(f"Run config bn-dtype={settings.bn_dtype!r}; use one of {', '.join(codec.BN_DTYPES)}.")
        if settings.uplink_codec not in flipcodec.UPLINK_CODECS:
            raise HyBNNError(f"Run config uplink-codec={settings.uplink_codec!r}; "
                             f"use one of {', '.join(flipcodec.UPLINK_CODECS)}.")
        if settings.lr_schedule not in ("cosine", "constant"):
            raise HyBNNError(f"Run config lr-schedule={settings.lr_schedule!r}; use cosine or constant.")
        if settings.num_server_rounds < 1 or settings.local_epochs < 1 or settings.batch_size < 2:
            raise HyBNNError("Run config num-server-rounds and local-epochs must be >= 1, batch-size >= 2.")
        return settings

    def lr_for_round(self, server_round: int) -> float:
        """The clients' learning rate in round ``server_round`` (1-based)."""
        if self.lr_schedule == "constant" or self.num_server_rounds == 1:
            return self.lr
        progress = (server_round - 1) / (self.num_server_rounds - 1)
        return self.lr * (0.01 + 0.99 * (1 + math.cos(math.pi * progress)) / 2)

    def train_config(self, encoder_sha256: str) -> ConfigRecord:
        """What every client gets with the global model each round."""
        return ConfigRecord({
            "task": self.task,
            "local-epochs": self.local_epochs,
            "lr": self.lr,
            "batch-size": self.batch_size,
            "encoder-sha256": encoder_sha256,
            "bn-dtype": self.bn_dtype,
            "uplink-codec": self.uplink_codec,
            "vote-latent-scale": self.vote_latent_scale,
            "codec-version": codec.CODEC_VERSION,
        })


def global_model(record: ArrayRecord, layout: codec.Layout, settings: ServerSettings) -> BNN:
    """The BNN a global record stands for: its latent weights are what clients start from."""
    weights, bn = codec.decode(record_to_payload(record), layout)
    kind = codec.payload_kind(record_to_payload(record))
    model = BNN(layout.config)
    codec.load_into_model(model, layout, agg.client_start_latent(weights, kind, settings.vote_latent_scale), bn)
    model.eval()
    return model


def _mean(values) -> float | None:
    """The mean of ``values``, ``None`` for none (a round with no usable reply)."""
    values = list(values)
    return float(np.mean(values)) if values else None


def float_fedavg_record(config: BNNConfig) -> ArrayRecord:
    """What Flower's stock FedAvg sends for this BNN: its float32 state dict, as is."""
    return ArrayRecord(BNN(config).state_dict())


def run_server(grid: Grid, settings: ServerSettings) -> dict:
    """The whole federated run; returns what it wrote to ``server.json``."""
    from common.bnn_io import save_bnn
    from common.encoder import load_encoder_artifact
    from common.features import load_codes

    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # evaluating a tiny BNN; leave the cores to the clients
    task = task_for_dataset(settings.task, settings.dataset)
    artifact = load_encoder_artifact(settings.encoder_path, expected_sha256=settings.encoder_sha256 or None)
    log(INFO, "Encoder %s, sha256 %s; clients must hold the same.", artifact.path, artifact.sha256)
    codes, labels = load_codes(artifact, settings.data_root, "test", progress=False, dataset=settings.dataset)
    codes, labels = select_task(codes, labels, task)
    bits = int(artifact.config.latent_bits)
    x_test, y_test = codes_to_inputs(codes, bits), torch.from_numpy(labels)

    config = BNNConfig.for_task(bits, task.num_classes)
    layout = codec.layout_for(config)
    torch.manual_seed(settings.seed)
    initial = BNN(config)
    results: dict = {
        "run_config": asdict(settings),
        "task": task.to_dict(),
        "encoder_sha256": artifact.sha256,
        "codec_version": codec.CODEC_VERSION,
        "bnn": {"binary_weights": layout.n_binary, "bn_numbers": layout.n_bn},
        "float_fedavg_uplink_bytes": record_nbytes(float_fedavg_record(config)),
        "initial": {},
        "rounds": [],
        "status": "running",
    }
    pending: dict[int, RoundLog] = {}
    started = time.perf_counter()

    def write() -> None:
        atomic_write_bytes(out_dir / SERVER_RESULTS, json.dumps(results, indent=2).encode())

    def on_round(round_log: RoundLog) -> None:
        pending[round_log.round] = round_log

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = global_model(arrays, layout, settings)
        metrics = evaluate(model, x_test, y_test)
        if server_round == 0:
            results["initial"] = {"test_acc": metrics["acc"], "test_loss": metrics["loss"]}
        else:
            round_log = pending.pop(server_round, None) or strategy.rounds.get(server_round, RoundLog(server_round))
            clients = round_log.clients
            results["rounds"].append({
                "round": server_round,
                "test_acc": metrics["acc"],
                "test_loss": metrics["loss"],
                "uplink_bytes": max((c["uplink_bytes"] for c in clients), default=0),
                "uplink_bits_per_binary_weight": _mean(c["uplink_bits_per_binary_weight"] for c in clients),
                "sign_bits_per_binary_weight": _mean(c["sign_bits_per_binary_weight"] for c in clients),
                "sign_flip_fraction": _mean(c["sign_flips"] / layout.n_binary for c in clients
                                            if c.get("sign_flips") is not None),
                "downlink_bytes": round_log.downlink_bytes,
                "clients": clients,
                "dropped": round_log.dropped,
                "seconds": time.perf_counter() - started,
            })
            save_bnn(model, out_dir / "global", meta={
                "task": task.name, "dataset": settings.dataset, "class_names": list(task.class_names),
                "encoder_sha256": artifact.sha256, "round": server_round,
                "test_acc": metrics["acc"], "aggregation": settings.aggregation})
            log(INFO, "Round %d: global test accuracy %.4f (%d clients, %d left out)",
                server_round, metrics["acc"], len(clients), len(round_log.dropped))
        write()
        return MetricRecord({"test-acc": metrics["acc"], "test-loss": metrics["loss"]})

    strategy = PackedFedAvg(
        layout,
        mode=settings.aggregation,
        bn_dtype=settings.bn_dtype,
        min_train_nodes=settings.min_train_nodes,
        min_available_nodes=settings.min_available_nodes,
        node_wait_s=settings.node_wait_s,
        on_round=on_round,
        lr_for_round=settings.lr_for_round,
    )
    initial_arrays = strategy.encode_global(codec.binary_latents(initial), codec.bn_vector(initial, layout))
    strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout_s,
        train_config=settings.train_config(artifact.sha256),
        evaluate_fn=evaluate_fn,
    )
    results["status"] = "finished"
    results["seconds"] = time.perf_counter() - started
    write()
    return results


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        settings = ServerSettings.from_run_config(dict(context.run_config))
        run_server(grid, settings)
    except HyBNNError as exc:
        log(WARNING, "FedHyBNN server stopped: %s", exc)
        raise
