"""The FedHyBNN ServerApp: PackedFedAvg plus central evaluation of the global BNN.

The server holds the frozen encoder too (``encoder-path`` in the run config): it
checks the encoder's sha256 against ``encoder-sha256`` (when set), tells the clients
that hash, and evaluates the global BNN on the task's test codes after every round.
It writes, after every round, so that a stopped run leaves what it reached:

* ``<out-dir>/server.json``: run config, encoder hash, per round the global test
  accuracy and loss, the bytes each client sent and received, dropped replies;
* ``<out-dir>/global/``: the global BNN (:func:`common.bnn.store.save_bnn`), its latent
  weights being the vote or the mean the clients restart from;
* ``<out-dir>/checkpoint/``: what ``resume-dir`` needs to go on from that round
  (:mod:`server.resume`).

A round in which no reply could be aggregated is logged as an error; a run that ends
without any aggregated round is marked ``failed`` in ``server.json``, with the reasons
the clients gave, and the ServerApp raises.

Run config keys are kebab-case, declared once in :mod:`common.federated.settings` (pyproject.toml's
``[tool.flwr.app.config]`` holds the same defaults); relative paths are taken from the
ServerApp's working directory.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.federated import aggregation as agg
from common.federated import codec, robust, schedule
from common.bnn.model import BNN, BNNConfig, codes_to_inputs
from common.errors import HyBNNError
from common.fileio import atomic_write_bytes
from common.federated.settings import (parse_settings, per_round_settings, read_by, secure_aggregation_refusal,
                                      settings_dataclass)
from common.data.datasets import get_dataset
from common.data.tasks import select_task, task_for_dataset
from common.bnn.training import evaluate
from common.federated.wire import TRAIN_CONFIG, payload_to_record, record_nbytes, record_to_payload
from server import resume
from server.strategy import PackedFedAvg, RoundLog

SERVER_RESULTS = "server.json"

app = ServerApp()


class _ServerSettingsMethods:
    """The run config, typed: one field per setting the server reads (common/federated/settings.py);
    field ``x_y`` is run-config key ``x-y``."""

    @classmethod
    def from_run_config(cls, run_config: dict) -> "ServerSettings":
        """Typed, checked settings; a wrong type, a value out of range or a key that is no
        setting is a :class:`HyBNNError` naming the key."""
        settings = cls(**parse_settings(run_config, read_by("server"), "Run config"))
        task_for_dataset(settings.task, settings.dataset)
        robust.check_weight_bounds(settings.max_weight_vs_median, settings.max_num_examples,
                                   settings.bn_aggregation)
        refused = secure_aggregation_refusal({s.key: getattr(settings, s.name) for s in read_by("server")})
        if refused:
            raise HyBNNError(refused)
        return settings

    def lr_for_round(self, server_round: int) -> float:
        """The clients' learning rate in round ``server_round`` (1-based)."""
        return schedule.lr_for_round(self.lr, self.lr_schedule, server_round, self.num_server_rounds)

    def lr_end_fraction(self, server_round: int) -> float:
        """Where the learning rate ends within round ``server_round``, as a fraction of its start."""
        return schedule.lr_end_fraction(self.lr_schedule, self.lr_in_round, server_round, self.num_server_rounds)

    def train_config(self, encoder_sha256: str) -> ConfigRecord:
        """What every client gets with the global model each round."""
        values = {s.key: getattr(self, s.name) for s in per_round_settings()}
        return ConfigRecord({**values, TRAIN_CONFIG.encoder_sha256: encoder_sha256,
                             TRAIN_CONFIG.codec_version: codec.CODEC_VERSION})


ServerSettings = settings_dataclass("ServerSettings", read_by("server"), _ServerSettingsMethods)


def global_model(record: ArrayRecord, layout: codec.Layout, settings: ServerSettings) -> BNN:
    """The BNN a global record stands for: its latent weights are what clients start from."""
    weights, bn = codec.decode(record_to_payload(record), layout)
    kind = codec.payload_kind(record_to_payload(record))
    model = BNN(layout.config)
    codec.load_into_model(model, layout, agg.client_start_latent(
        weights, kind, settings.vote_latent_scale, settings.mean_latent_scale), bn)
    model.eval()
    return model


def _mean(values) -> float | None:
    """The mean of ``values``, ``None`` for none (a round with no usable reply)."""
    values = list(values)
    return float(np.mean(values)) if values else None


def float_fedavg_record(config: BNNConfig) -> ArrayRecord:
    """What Flower's stock FedAvg sends for this BNN: its float32 state dict, as is."""
    return ArrayRecord(BNN(config).state_dict())


class ResumablePackedFedAvg(resume.RoundOffset, PackedFedAvg):
    """PackedFedAvg that can start after round ``round_offset`` of the run."""


def failure_reasons(rounds: list[dict]) -> list[str]:
    """The distinct reasons the clients' replies were left out, most frequent first, each with
    its count; reasons that differ only in the client's partition number count as one."""
    counts: dict[str, int] = {}
    for r in rounds:
        for dropped in r.get("dropped", []):
            reason = re.sub(r"client partition \d+/(\d+)", r"client partition i/\1", str(dropped.get("reason", "")))
            counts[reason or "no reason given"] = counts.get(reason or "no reason given", 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return [f"{reason} ({n} {'reply' if n == 1 else 'replies'})" for reason, n in ranked]


def run_server(grid: Grid, settings: ServerSettings, node_partitions=None) -> dict:
    """The whole federated run; returns what it wrote to ``server.json``.

    ``node_partitions(grid)``: node id -> partition id, where the caller can tell (the simulation);
    the clients are then sampled by partition (:func:`server.strategy.sample_nodes`)."""
    from common.bnn.store import save_bnn
    from common.encoder.artifact import load_encoder_artifact
    from common.encoder.features import load_codes

    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # evaluating a tiny BNN; leave the cores to the clients
    task = task_for_dataset(settings.task, settings.dataset)
    artifact = load_encoder_artifact(settings.encoder_path, expected_sha256=settings.encoder_sha256 or None)
    log(INFO, "Encoder %s, sha256 %s; clients must hold the same.", artifact.path, artifact.sha256)
    codes, labels = load_codes(artifact, settings.data_root, "test", progress=False, dataset=settings.dataset)
    codes, labels = select_task(codes, labels, task, split="test", dataset=settings.dataset)
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
    if settings.secure_aggregation != "off":
        results["secure_aggregation"] = {
            "enabled": settings.secure_aggregation == "on", "mode": settings.secure_aggregation,
            "threshold": settings.secure_threshold or None, "neighbours": None, "bits": None,
            "weight_bits": settings.sum_weight_bits}
    ident = resume.identity(asdict(settings), artifact.sha256, codec.CODEC_VERSION,
                            {"config": config.to_dict(), **results["bnn"]},
                            get_dataset(settings.dataset).fingerprint(settings.data_root))
    checkpoint = None
    if settings.resume_dir:
        checkpoint = resume.load_checkpoint(Path(settings.resume_dir))
        resume.check_matches(checkpoint.state, ident)
        resume.check_payload(checkpoint, layout)
        results.update(earlier_record(checkpoint))
        results["resumed_after_rounds"].append(checkpoint.round)
        log(INFO, "Resuming after round %d of %d from %s.", checkpoint.round, settings.num_server_rounds,
            checkpoint.directory)
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
                "connected": round_log.connected,
                "sampled": round_log.sampled_nodes,
                "sampled_partitions": round_log.sampled_partitions,
                "replied": round_log.replied,
                "dropped": round_log.dropped,
                "capped": round_log.capped,
                "seconds": time.perf_counter() - started,
            })
            if round_log.secure is not None:
                results["rounds"][-1]["secure"] = round_log.secure
                if round_log.secure.get("bits"):  # the round's own figures: they follow its clients
                    results["secure_aggregation"].update(
                        threshold=round_log.secure["threshold"], neighbours=round_log.secure["neighbours"],
                        bits=round_log.secure["bits"])
            if not clients:
                log(ERROR, "Round %d: no reply could be aggregated (%s); the global model stays as it was.",
                    server_round, "; ".join(failure_reasons([results["rounds"][-1]])) or "no client replied")
            save_bnn(model, out_dir / "global", meta={
                "task": task.name, "dataset": settings.dataset, "class_names": list(task.class_names),
                "encoder_sha256": artifact.sha256, "round": server_round,
                "test_acc": metrics["acc"], "aggregation": settings.aggregation})
            log(INFO, "Round %d: global test accuracy %.4f (%d sampled of %d, %d aggregated, %d left out)",
                server_round, metrics["acc"], len(round_log.sampled_nodes), round_log.connected, len(clients),
                len(round_log.dropped))
        write()
        if server_round and any(r["clients"] for r in results["rounds"]):
            resume.save_checkpoint(out_dir, server_round, record_to_payload(arrays), ident, record={
                key: results.get(key, []) for key in ("initial", "rounds", "resumed_after_rounds")})
        return MetricRecord({"test-acc": metrics["acc"], "test-loss": metrics["loss"]})

    strategy = ResumablePackedFedAvg(
        layout,
        mode=settings.aggregation,
        bn_dtype=settings.bn_dtype,
        bn_encoding=settings.bn_encoding,
        min_train_nodes=settings.min_train_nodes,
        min_available_nodes=settings.min_available_nodes,
        node_wait_s=settings.node_wait_s,
        on_round=on_round,
        lr_for_round=settings.lr_for_round,
        lr_end_fraction=settings.lr_end_fraction,
        max_weight_vs_median=settings.max_weight_vs_median,
        max_num_examples=settings.max_num_examples,
        bn_aggregation=settings.bn_aggregation,
        clients_per_round=settings.clients_per_round,
        seed=settings.seed,
        node_partitions=node_partitions,
        uplink_codec=settings.uplink_codec,
        flip_blocks=settings.flip_blocks,
        flip_block_rounds=settings.flip_block_rounds,
        num_partitions=settings.min_available_nodes,  # the planned federation: one voter per partition
        secure_aggregation=settings.secure_aggregation,
        secure_threshold=settings.secure_threshold,
        sum_weight_bits=settings.sum_weight_bits,
        secure_group_size=settings.secure_group_size,
    )
    if checkpoint is None:
        initial_arrays = strategy.encode_global(codec.binary_latents(initial), codec.bn_vector(initial, layout))
    else:
        initial_arrays = payload_to_record(checkpoint.payload)
        strategy.round_offset = checkpoint.round
    strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout_s,
        train_config=settings.train_config(artifact.sha256),
        evaluate_fn=evaluate_fn,
    )
    results["seconds"] = time.perf_counter() - started
    if not any(r["clients"] for r in results["rounds"]):
        reasons = failure_reasons(results["rounds"])
        results["status"] = "failed"
        results["failure"] = ("no client reply could be aggregated in any round; the clients' reasons: "
                              + ("; ".join(reasons) if reasons else "none replied"))
        write()
        raise HyBNNError(f"The run aggregated nothing: {results['failure']}")
    results["status"] = "finished"
    write()
    return results


def earlier_record(checkpoint: resume.Checkpoint) -> dict:
    """The server.json record of rounds 1 to the checkpoint's, saved with it, to go on from;
    refused (:func:`server.resume.check_record`) unless every field is of its type and range."""
    record = checkpoint.state.get("record")
    resume.check_record(record, checkpoint.round, checkpoint.directory / resume.STATE_NAME)
    return {"rounds": record["rounds"], "initial": record.get("initial", {}),
            "resumed_after_rounds": list(record.get("resumed_after_rounds", []))}


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        settings = ServerSettings.from_run_config(dict(context.run_config))
        run_server(grid, settings)
    except HyBNNError as exc:
        log(WARNING, "FedHyBNN server stopped: %s", exc)
        raise
