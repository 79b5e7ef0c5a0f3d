"""``hybnn federate``: FedHyBNN on Flower's simulation engine (Ray backend), one machine
(or a running Ray cluster with ``--ray-address``: simulation/ray_cluster.py).

The run has three parts, all in this process:

1. features: the frozen encoder's codes are extracted (or read from the cache) once,
   before any client starts, so simulated clients never race to write the cache;
2. a centralized HyBNN on the same encoder and task, the reference the federation is
   measured against (``centralized_acc``);
3. the federation: the real ServerApp and ClientApp of ``server/`` and ``client/``,
   run by ``flwr.simulation.run_simulation`` on Ray, one CPU per simulated client, in
   a child process (``python -m simulation.federate --worker SPEC``) in its own
   session. This process owns the signals: on Ctrl-C or SIGTERM it stops the child
   and every process below it (Ray's included) and keeps the rounds completed so far.
   ``run_simulation`` does not read pyproject's run config, so the run config is
   handed to both apps here; node config (partition-id, num-partitions) is set per
   simulated node by Flower.

It writes ``<out>/results.json``, ``<out>/server.json`` (the ServerApp's own record),
``<out>/global/`` (the final global BNN), ``<out>/checkpoint/`` (for ``--resume``),
``<out>/logs/simulation.log`` and ``<out>/federated.png`` (accuracy and loss per round
per client, the paper's Figure 7), first into a staging folder, published into
``<out>`` once the run has a round of its own (:mod:`simulation.runs`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import sys
import time
import warnings
from dataclasses import asdict, field
from pathlib import Path

from common.federated import settings
from common.errors import HyBNNError
from common.fileio import atomic_write_bytes, make_dir, save_figure

WITHIN_POINTS = 0.5
"""A round "reaches" the centralized accuracy when it is at most this many points below."""


class _FederateConfigMethods:
    """One federated experiment: one field per setting with a ``field`` in common/federated/settings.py
    (the options of ``hybnn federate``), defaults from there. Defaults follow the paper:
    3 clients, 20 rounds, IID."""

    @property
    def reference_epochs(self) -> int:
        """The centralized reference's epochs: ``centralized_epochs``, or rounds x local epochs."""
        return self.centralized_epochs or self.rounds * self.local_epochs

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def run_config(self, encoder_sha256: str) -> dict:
        """The ServerApp/ClientApp run config (kebab-case keys) for this experiment."""
        from common.data.datasets import absolute_dataset

        values = {s.key: (str(v) if isinstance(v := getattr(self, s.field), Path) else v)
                  for s in settings.command_settings() if s.scope == "run"}
        values.update({
            "dataset": absolute_dataset(self.dataset),
            "encoder-sha256": encoder_sha256,
            "encoder-path": str(Path(self.encoder).resolve()),
            "data-root": str(Path(self.data_root).resolve()),
            "out-dir": str(Path(self.out).resolve()),
            "min-available-nodes": self.clients,
            "min-train-nodes": settings.default("min-train-nodes"),
            "node-wait-s": settings.default("node-wait-s"),
        })
        return values


FederateConfig = settings.settings_dataclass(
    "FederateConfig", settings.command_settings(), _FederateConfigMethods, paths=Path, frozen=False,
    by_field=True, extra=[
        ("progress", bool, field(default=True)),
        # HOST:PORT of a running Ray cluster to join (simulation/ray_cluster.py); None: a private one.
        ("ray_address", str | None, field(default=None)),
    ])


def _say(config: FederateConfig, text: str) -> None:
    if config.progress:
        print(text, flush=True)


def check_config(config: FederateConfig) -> None:
    from common.data.tasks import task_for_dataset
    from common.bnn.training import MAX_EPOCHS, TrainConfig

    task_for_dataset(config.task, config.dataset)
    for what, value in (("--rounds", config.rounds), ("--local-epochs", config.local_epochs),
                        ("the centralized reference's epochs (--centralized-epochs, by default "
                         "rounds x local epochs)", config.reference_epochs)):
        if value > MAX_EPOCHS:
            shown = f"{value:.3g}" if value >= 10**7 else str(value)
            raise HyBNNError(f"{what} is {shown}; at most {MAX_EPOCHS} can be run. Pass a smaller value.")
    TrainConfig(epochs=config.local_epochs, lr=config.lr, batch_size=config.batch_size, seed=config.seed)
    settings.setting("input-dropout").check(config.input_dropout, "Option --input-dropout:")
    for s in settings.command_settings():
        if s.choices:
            s.check(getattr(config, s.field), "Setting")
    if config.clients < 1 or config.rounds < 1 or config.local_epochs < 1:
        raise HyBNNError("clients, rounds and local epochs must all be at least 1.")
    from common.federated.robust import DEFAULT_BN_AGGREGATION, check_weight_bounds

    check_weight_bounds(config.max_weight_vs_median, 0, DEFAULT_BN_AGGREGATION)
    refused = settings.secure_aggregation_refusal(config.run_config(""))
    if refused:
        raise HyBNNError(refused)
    if config.ray_address is not None:
        from simulation.ray_cluster import parse_ray_address

        parse_ray_address(config.ray_address)
    check_scale(config)


MAX_CLIENTS = 10_000
"""Simulated clients per run: each is a node in the in-memory SuperLink, whose message
delivery loop asks for every node's messages ten times a second (docs/scale.md)."""
MEMORY_PER_CLIENT_BYTES = 64 * 1024
"""What one simulated node may cost: runs of 1,000 clients peaked about 15 MiB above runs of 10
(docs/scale.md, Measurements); 64 KiB leaves room for larger records."""
MEMORY_PER_RAY_WORKER_BYTES = 600 * 1024 * 1024
"""One Ray worker process with torch, Flower and the task's codes loaded, counted once more for the
simulation process: a 2-worker run peaked at 3.2 GiB summed over all its processes, shared pages
counted in each, so this is a floor the machine must clear, not a forecast (docs/scale.md)."""


def check_scale(config: FederateConfig) -> None:
    """Refuse, before anything starts, a sampling, failure rate, thread count or client count the run
    cannot honour."""
    for key in ("clients-per-round", "client-failure-rate", "threads", "round-timeout-s", "mean-latent-scale"):
        s = settings.setting(key)
        s.check(getattr(config, s.field), "Option --" + s.field.replace("_", "-") + ":")
    if config.clients > MAX_CLIENTS:
        raise HyBNNError(f"--clients {config.clients} is more than one machine's simulation supports "
                         f"({MAX_CLIENTS}); run the clients as SuperNodes on several machines instead.")
    if config.clients_per_round > config.clients:
        raise HyBNNError(f"--clients-per-round {config.clients_per_round} is more than the {config.clients} "
                         "clients; sample at most --clients of them (0 samples every client).")
    cpus = os.cpu_count() or 1
    if config.threads > cpus:
        raise HyBNNError(f"--threads {config.threads} is more than this machine's {cpus} CPUs; each simulated "
                         "client holds that many, so none could run.")


def check_simulation_memory(config: FederateConfig) -> None:
    """Refuse a simulation whose estimated memory exceeds what is available now."""
    from common.resources import check_fits_in_memory

    workers = max(1, (os.cpu_count() or 1) // config.threads)
    check_fits_in_memory(config.clients * MEMORY_PER_CLIENT_BYTES + (workers + 1) * MEMORY_PER_RAY_WORKER_BYTES,
                         f"A simulation of {config.clients} clients with {workers} Ray worker(s)",
                         "Use fewer --clients, or more --threads per client (fewer workers at once).")


def centralized_reference(artifact, config: FederateConfig) -> dict:
    """A centralized HyBNN on the same encoder, task and data: the accuracy to reach.

    Kept in ``<data root>/references/`` under a key of the codes, the BNN's shape and the
    recipe (:mod:`common.bnn.reference`), and read back on the next run with the same ones
    (``"reused": true`` in the result) instead of trained again."""
    import torch

    from common.bnn.model import BNN, BNNConfig, codes_to_inputs
    from common.bnn.reference import load_reference, reference_key, reference_path, save_reference
    from common.encoder.features import load_codes
    from common.data.tasks import select_task, task_for_dataset
    from common.bnn.training import TrainConfig, evaluate, fit

    task = task_for_dataset(config.task, config.dataset)
    bits = int(artifact.config.latent_bits)
    epochs = config.reference_epochs
    split = {}
    for name in ("train", "test"):
        codes, labels = load_codes(artifact, config.data_root, name, progress=config.progress,
                                   dataset=config.dataset)
        split[name] = select_task(codes, labels, task, split=name, dataset=config.dataset)
    bnn_config = BNNConfig.for_task(bits, task.num_classes)
    train_config = TrainConfig(epochs=epochs, lr=config.lr,
                               batch_size=config.batch_size, seed=config.seed)
    key = reference_key([*split["train"], *split["test"]], bnn_config.to_dict(), train_config.to_dict())
    kept = load_reference(config.data_root, key, epochs)
    if kept is not None:
        return {**kept, "reused": True, "reference_file": str(reference_path(config.data_root, key))}
    tensors = {name: (codes_to_inputs(codes, bits), torch.from_numpy(labels))
               for name, (codes, labels) in split.items()}
    torch.manual_seed(config.seed)
    model = BNN(bnn_config)
    # A 26k-weight BNN gains little from intra-op threads; on a busy machine they cost 10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        result = fit(model, *tensors["train"], train_config, desc=f"centralized {task.name}",
                     progress=config.progress)
        metrics = evaluate(model, *tensors["test"])
    finally:
        torch.set_num_threads(threads)
    reference = {"test_acc": metrics["acc"], "test_loss": metrics["loss"], "epochs": epochs,
                 "train_seconds": result.seconds, "train_examples": int(len(tensors["train"][1]))}
    saved = save_reference(config.data_root, key, reference)
    return {**reference, "reused": False, "reference_file": str(saved) if saved else None}


def simulated_node_partitions(grid) -> dict[int, int]:
    """Node id -> partition id of the simulation's nodes, so that a seed samples the same partitions
    in every run although Flower draws the node ids at random.

    Flower 1.42's simulation registers its nodes one after the other, giving the i-th node
    ``partition-id`` i (``vce_api._register_nodes``), and its in-memory LinkState, which the
    simulation's Grid holds as ``state``, lists nodes in the order they were registered
    (``InMemoryLinkState.get_node_info``). Empty when the Grid has no such state; each client's
    reported partition id is checked against this map (``server/strategy.py``)."""
    state = getattr(grid, "state", None)
    if state is None or not callable(getattr(state, "get_node_info", None)):
        return {}
    return {int(info.node_id): i for i, info in enumerate(state.get_node_info())}


CLIENTS_START_TIMEOUT_S = 600.0
"""How long the ServerApp waits for the simulation's first client workers before round 1."""


def wait_for_client_workers(grid, nodes_wanted: int, workers: int, timeout_s: float = CLIENTS_START_TIMEOUT_S) -> None:
    """Wait for ``nodes_wanted`` nodes, send an empty query to ``workers`` of them and wait for the
    replies, before round 1.

    Flower's simulation starts Ray and its client workers while the ServerApp already runs; without
    this wait, round 1's ``round-timeout-s`` would also count Ray's start (tens of seconds), and a
    short timeout would leave round 1 without any reply. A worker answers the query once it has
    loaded the ClientApp, the encoder, the task's codes and the split (:func:`client.client_app.preload`),
    which each worker process does once."""
    from logging import INFO, WARNING

    from flwr.app import Message, MessageType, RecordDict
    from flwr.supercore import log

    started = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < nodes_wanted and time.monotonic() - started < timeout_s:
        time.sleep(0.2)  # the simulation registers its nodes after the ServerApp has started
    nodes = nodes[:max(1, workers)]
    queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    left = max(1.0, timeout_s - (time.monotonic() - started))
    replies = [m for m in grid.send_and_receive(queries, timeout=left) if not m.has_error()]
    waited = time.monotonic() - started
    if replies:
        log(INFO, "Simulated clients ready after %.1f s (%d of %d workers answered).", waited, len(replies), len(nodes))
    else:
        log(WARNING, "No simulated client answered within %.0f s; starting round 1 anyway.", waited)


def simulation_apps(run_config: dict, threads: int = 1):
    """The project's ServerApp and ClientApp, with ``run_config`` as their run config; each
    ClientApp call uses ``threads`` torch threads. The ServerApp waits for the client workers
    to start before round 1 (:func:`wait_for_client_workers`)."""
    from flwr.app import Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from client.client_app import handle_secagg_keys, handle_train, preload, register
    from common.data.datasets import register_all, registered_datasets
    from server.server_app import ServerSettings, run_server

    datasets = registered_datasets()  # the clients may run in other processes (Ray workers)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        settings = ServerSettings.from_run_config({**run_config, **dict(context.run_config)})
        wait_for_client_workers(grid, settings.min_available_nodes, max(1, (os.cpu_count() or 1) // threads))
        run_server(grid, settings, node_partitions=simulated_node_partitions)

    client_app = ClientApp()

    @client_app.query()
    def _ready(msg: Message, context: Context) -> Message:
        register_all(datasets)
        preload(context, run_config)
        return Message(content=RecordDict(), reply_to=msg)

    def _train(msg: Message, context: Context) -> Message:
        register_all(datasets)
        return handle_train(msg, context, defaults=run_config, threads=threads)

    def _secagg_keys(msg: Message, context: Context) -> Message:
        register_all(datasets)
        return handle_secagg_keys(msg, context, defaults=run_config)

    register(client_app, _train, _secagg_keys)
    return server_app, client_app


def run_federation(run_config: dict, clients: int, apps: tuple | None = None, threads: int = 1,
                   ray_address: str | None = None) -> None:
    """Flower's simulation engine, Ray backend, ``threads`` CPUs (and torch threads) per simulated client.

    ``apps`` is ``(server_app, client_app)``, by default :func:`simulation_apps`.
    ``ray_address``: join that Ray cluster instead of starting one on this machine.
    """
    import logging

    from flwr.simulation import run_simulation

    from simulation.ray_cluster import backend_init_args

    server_app, client_app = apps or simulation_apps(run_config, threads)
    cpus = max(1, os.cpu_count() or 1)
    backend_config = {
        "client_resources": {"num_cpus": min(threads, cpus), "num_gpus": 0.0},
        "init_args": backend_init_args(ray_address, cpus, logging.WARNING),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                       backend_name="ray", backend_config=backend_config)
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover - ray is a dependency of flwr[simulation]
        pass


def summarize(server: dict, centralized: dict, config: dict, seconds: float) -> dict:
    """results.json from the ServerApp's record and the centralized reference."""
    rounds = [
        {
            "round": r["round"],
            "test_acc": r["test_acc"],
            "test_loss": r["test_loss"],
            "uplink_bytes": r["uplink_bytes"],
            "uplink_bits_per_binary_weight": r.get("uplink_bits_per_binary_weight"),
            "sign_bits_per_binary_weight": r.get("sign_bits_per_binary_weight"),
            "sign_flip_fraction": r.get("sign_flip_fraction"),
            "downlink_bytes": r["downlink_bytes"],
            "clients": r["clients"],
            "sampled": r.get("sampled"),
            "sampled_partitions": r.get("sampled_partitions"),
            "replied": r.get("replied"),
            "dropped": r["dropped"],
            "capped": r.get("capped", []),
            "seconds": r.get("seconds"),
            **({"secure": r["secure"]} if "secure" in r else {}),
        }
        for r in server.get("rounds", [])
    ]
    central = centralized.get("test_acc")
    first = None
    if central is not None:
        first = next((r["round"] for r in rounds if r["test_acc"] >= central - WITHIN_POINTS / 100), None)
    final = rounds[-1]["test_acc"] if rounds else None
    float_bytes = server.get("float_fedavg_uplink_bytes")
    uplink = max((r["uplink_bytes"] for r in rounds), default=None)
    return {
        "config": config,
        "task": server.get("task"),
        "encoder_sha256": server.get("encoder_sha256"),
        "codec_version": server.get("codec_version"),
        "centralized_acc": central,
        "centralized": centralized,
        "final_test_acc": final,
        "final_gap_points": None if final is None or central is None else round((central - final) * 100, 3),
        "first_round_within_0_5_points": first,
        "float_fedavg_uplink_bytes": float_bytes,
        "uplink_bytes_per_client_round": uplink,
        "uplink_fraction_of_float": None if not uplink or not float_bytes else uplink / float_bytes,
        "uplink_bits_per_binary_weight_after_round_1": _mean_after_first(rounds, "uplink_bits_per_binary_weight"),
        "sign_bits_per_binary_weight_after_round_1": _mean_after_first(rounds, "sign_bits_per_binary_weight"),
        **({"secure_aggregation": server["secure_aggregation"]} if "secure_aggregation" in server else {}),
        "rounds": rounds,
        "initial": server.get("initial"),
        "status": server.get("status"),
        "seconds": seconds,
        **({"secure_aggregation": server["secure_aggregation"]} if "secure_aggregation" in server else {}),
    }


def _mean_after_first(rounds: list[dict], key: str) -> float | None:
    """The mean of ``key`` over rounds 2 and later: round 1 starts from a random model,
    where about half the signs flip whatever the codec, so it says little about the steady state."""
    values = [r[key] for r in rounds if r["round"] >= 2 and r.get(key) is not None]
    return sum(values) / len(values) if values else None


def import_plotting() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


MAX_CLIENT_LINES = 10
"""federated.png draws one line per client up to this many clients, else their mean per round."""


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def plot_rounds(results: dict, path: Path) -> Path:
    """Accuracy and loss per round, per client (local training) and global (test)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = results["rounds"]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    per_client: dict[str, dict[str, list]] = {}
    for r in rounds:
        for c in r["clients"]:
            reported = c.get("reported", {})
            name = f"client {int(reported.get('partition_id', c['node_id']))}"
            d = per_client.setdefault(name, {"round": [], "acc": [], "loss": []})
            d["round"].append(r["round"])
            d["acc"].append(reported.get("train_acc"))
            d["loss"].append(reported.get("train_loss"))
    if len(per_client) > MAX_CLIENT_LINES:  # many sampled clients: their mean per round, not a line each
        per_client = {f"mean of the {len(per_client)} clients": {
            "round": [r["round"] for r in rounds if r["clients"]],
            "acc": [_mean(c.get("reported", {}).get("train_acc") for c in r["clients"]) for r in rounds if r["clients"]],
            "loss": [_mean(c.get("reported", {}).get("train_loss") for c in r["clients"]) for r in rounds
                     if r["clients"]]}}
    for name, d in sorted(per_client.items()):
        ax_acc.plot(d["round"], d["acc"], marker=".", label=f"{name} (local train)")
        ax_loss.plot(d["round"], d["loss"], marker=".", label=f"{name} (local train)")
    xs = [r["round"] for r in rounds]
    ax_acc.plot(xs, [r["test_acc"] for r in rounds], "k-", lw=2, label="global model (test)")
    ax_loss.plot(xs, [r["test_loss"] for r in rounds], "k-", lw=2, label="global model (test)")
    if results.get("centralized_acc") is not None:
        ax_acc.axhline(results["centralized_acc"], color="gray", ls="--", label="centralized HyBNN (test)")
    task = results["config"].get("task")
    ax_acc.set(title=f"FedHyBNN {task}: accuracy", xlabel="round", ylabel="accuracy")
    ax_loss.set(title=f"FedHyBNN {task}: loss", xlabel="round", ylabel="cross-entropy")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    make_dir(path.parent)
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: dict, out: Path) -> None:
    make_dir(out)
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
    plot_rounds(results, out / "federated.png")


def finish_run(server_json: Path, staging: Path, out: Path, centralized: dict, config: dict,
               started: float, stopped: bool, source: Path | None, total_rounds: int,
               logs: Path | None = None) -> dict:
    """Summarize the staging folder's server.json; publish it into ``out`` if the run has a round.
    ``logs``: the run's log, which an error names (default: the staging folder's ``logs/``).

    Raises ``KeyboardInterrupt`` after publishing when the run was ``stopped``, and a
    :class:`HyBNNError` when it ended early or aggregated nothing (earlier results kept).
    """
    from simulation import runs

    try:
        server = json.loads(server_json.read_text())
    except (OSError, ValueError):
        server = {}
    if not runs.has_aggregated_round(server):
        if stopped:
            # Nothing of the run's own to keep or resume from (a checkpoint follows an aggregated round).
            shutil.rmtree(staging, ignore_errors=True)
            print(f"Stopped before the first round completed; nothing written, {out} is as it was.",
                  file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        if not server:
            raise HyBNNError(f"The federated run ended without writing {server_json}; read "
                             f"{logs or staging / 'logs'} for the cause. Earlier results in {out} are kept.")
        raise HyBNNError(f"The run aggregated nothing: {runs.failure_message(server)}. Earlier results in "
                         f"{out} are kept; this run's record is in {staging}, its log in {logs or staging / 'logs'}.")
    results = summarize(server, centralized, config, time.perf_counter() - started)
    if server.get("status") != "finished":
        results["status"] = "stopped"
    done = len(results["rounds"])
    write_results(results, staging)
    kept = runs.publish(staging, out, keep_earlier=source is None)
    if kept is not None:
        print(f"The earlier run in {out} is kept in {kept}; pass --resume {out} to go on with a run "
              "instead of starting a new one.", file=sys.stderr, flush=True)
    runs.forget_source(source, out)
    if results["status"] != "finished":
        print(f"Stopped after round {done} of {total_rounds}; results in {out / 'results.json'}. "
              f"Go on with the same command and --resume {out}.", file=sys.stderr, flush=True)
        if stopped:
            raise KeyboardInterrupt
        raise HyBNNError(f"The run stopped after round {done} of {total_rounds}; partial results are in {out}; "
                         f"go on with the same command and --resume {out}.")
    return results


def federate(config: FederateConfig) -> dict:
    """Run the experiment of ``config``; write and return results.json's content.

    Ctrl-C or SIGTERM stops it within seconds: the rounds completed so far are published
    with status ``stopped`` and ``KeyboardInterrupt`` is raised.
    """
    from common.bnn.product import product_choice
    from common.data.datasets import carry_registered
    from common.encoder.artifact import load_encoder_artifact
    from common.encoder.features import load_codes
    from server.server_app import SERVER_RESULTS
    from simulation import runs

    check_config(config)
    check_simulation_memory(config)
    started = time.perf_counter()
    out = Path(config.out)
    if config.ray_address is not None:
        from simulation.ray_cluster import check_ray_cluster

        _say(config, check_ray_cluster(config.ray_address).describe())
    with runs.StopSignals() as signals:
        source = runs.resume_source(config.resume)
        artifact = load_encoder_artifact(config.encoder)
        run_config = config.run_config(artifact.sha256)
        if source is not None:
            run_config["resume-dir"] = str(source.resolve())
            done = runs.check_resumable(source, run_config)
            _say(config, f"Resuming {source} after round {done} of {config.rounds}")
        _say(config, f"Encoder {artifact.path} (sha256 {artifact.sha256[:16]}...); extracting features")
        for split in ("train", "test"):
            load_codes(artifact, config.data_root, split, progress=config.progress,
                       dataset=config.dataset)
        _say(config, f"Centralized HyBNN on {config.task}, "
                     f"{config.reference_epochs} epochs; " + product_choice().describe())
        centralized = centralized_reference(artifact, config)
        _say(config, f"Centralized test accuracy {centralized['test_acc']:.4f}"
                     + (f" (reused: {centralized['reference_file']})" if centralized["reused"] else ""))
        _say(config, f"FedHyBNN: {config.clients} simulated clients"
                     + (f" ({config.clients_per_round} sampled per round)" if config.clients_per_round else "")
                     + f", {config.rounds} rounds, "
                     f"{config.partition} partition, {config.aggregation} aggregation (Flower simulation, Ray)")
        import_plotting()  # now, not in the seconds a stopped run has to write its results
        staging = runs.staging_dir(out)
        run_config["out-dir"] = str(staging.resolve())
        worker = None
        with tempfile.TemporaryDirectory(prefix="hybnn-datasets-") as carried_dir:
            try:
                carried = carry_registered(config.dataset, config.data_root, Path(carried_dir))
                worker = start_federation_worker(run_config, config.clients, staging, carried, config.threads,
                                                 ray_address=config.ray_address)
                _watch_worker(config, worker, staging)
            except KeyboardInterrupt:
                print("Stopping the federation ...", file=sys.stderr, flush=True)
            finally:
                signals.defer()
                if worker is not None:
                    runs.stop_process_tree(worker)
        return finish_run(staging / SERVER_RESULTS, staging, out, centralized, config.to_dict(), started,
                          signals.stopped, source, config.rounds, logs=staging / "logs" / "simulation.log")


def start_federation_worker(run_config: dict, clients: int, staging: Path,
                            datasets: list[dict] | None = None, threads: int = 1,
                            ray_address: str | None = None) -> subprocess.Popen:
    """:func:`run_federation` in a child process in its own session, logging to ``staging/logs``.

    ``datasets``: registered data sets the child registers first
    (:func:`common.data.datasets.carry_registered`)."""
    logs = staging / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec = logs / "simulation.json"
    atomic_write_bytes(spec, json.dumps({"run_config": run_config, "clients": clients,
                                         "datasets": datasets or [], "parent_pid": os.getpid(),
                                         "threads": threads, "ray_address": ray_address}).encode())
    project = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    with open(logs / "simulation.log", "wb") as log_file:
        return subprocess.Popen([sys.executable, "-m", "simulation.federate", "--worker", str(spec)],
                                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=project, env=env, start_new_session=True)


class LogEcho:
    """The simulation's log as the terminal shows it: every line but the tracebacks, which stay in the
    log file (a user reads the run's clean messages; whoever debugs reads the file). The first traceback
    left out is named by one line pointing at the log. Terminal colours are kept only on a terminal.

    Two kinds of traceback: a bare Python one (``Traceback (most recent call last):`` ... the
    exception's line), and one that Flower logs (``ERROR : Traceback ...`` or Ray's exception repr
    ``ERROR : ray::ClientAppActor.run() (pid=...)``), whose lines run to Flower's next log line."""

    TRACEBACK = "Traceback (most recent call last):"
    CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
    RAY_PREFIX = re.compile(r"^\((?:[\w.:-]+ )?pid=\d+(?:, ip=[\d.]+)?\) ?")
    """Ray's prefix of a worker's line: ``(ClientAppActor pid=10361) ``."""
    LOG_LEVEL = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) *: *")
    """Flower's prefix of a log line: ``ERROR :     ``."""
    RAY_ERROR = re.compile(r"^ray::\S+ \(pid=")

    def __init__(self, log_path: Path, keep_colours: bool) -> None:
        self.log_path = log_path
        self.keep_colours = keep_colours
        self.partial = ""
        self.block: str | None = None
        """Inside a traceback: ``"python"`` (ends with the exception's line) or ``"logged"`` (ends at
        Flower's next log line); None: outside."""
        self.told = False

    def _starts(self, message: str) -> bool:
        return message.startswith(self.TRACEBACK) or bool(self.RAY_ERROR.match(message))

    def _skip(self, plain: str) -> bool:
        """Whether the line (colours and Ray's prefix removed) belongs to a traceback."""
        level = self.LOG_LEVEL.match(plain)
        message = plain[level.end():] if level else plain
        if self.block == "logged" and not level:
            return True
        if self.block == "python":
            if not plain.strip() or plain[:1].isspace() or plain.startswith(self.CHAINED) or self._starts(plain):
                return True
            self.block = None  # the exception's own line ends the traceback
            return True
        self.block = None
        if self._starts(message):
            self.block = "logged" if level else "python"
            return True
        return False

    def lines(self, text: str) -> list[str]:
        """The lines of ``text`` (a chunk of the log) to show; an unfinished last line waits for the next."""
        from common.federated.robust import TERMINAL_COLOURS

        *complete, self.partial = (self.partial + text).split("\n")
        shown = []
        for line in complete:
            plain = self.RAY_PREFIX.sub("", TERMINAL_COLOURS.sub("", line).replace("\r", ""))
            if self._skip(plain):
                if not self.told:
                    self.told = True
                    shown.append(f"(a traceback went to {self.log_path}; it is not shown here)")
                continue
            shown.append(line if self.keep_colours else TERMINAL_COLOURS.sub("", line))
        return shown


def _watch_worker(config: FederateConfig, worker: subprocess.Popen, staging: Path) -> None:
    """Wait for the worker; echo its log without tracebacks (with ``progress``)."""
    log_path = staging / "logs" / "simulation.log"
    echo = LogEcho(log_path, keep_colours=sys.stdout.isatty())
    position = 0
    while True:
        finished = worker.poll() is not None
        if config.progress:
            with open(log_path, "rb") as f:
                f.seek(position)
                chunk = f.read()
            position += len(chunk)
            shown = echo.lines(chunk.decode(errors="replace") + ("\n" if finished and chunk else ""))
            if shown:
                sys.stdout.write("".join(line + "\n" for line in shown))
                sys.stdout.flush()
        if finished:
            return
        time.sleep(0.3)


def secure_line(results: dict) -> str | None:
    """What secure aggregation did, in a line; None for a run without it."""
    secure = results.get("secure_aggregation")
    if not secure:
        return None
    rounds = [r.get("secure") or {} for r in results["rounds"]]
    summed = [r.get("summed", 0) for r in rounds if not r.get("skipped")]
    skipped = sum(1 for r in rounds if r.get("skipped"))
    if secure.get("mode") == "clear":
        return "secure-aggregation clear: the summable aggregation on plaintext updates (the server saw every update)"
    return (f"secure aggregation: the server learned only sums, of {min(summed, default=0)} to "
            f"{max(summed, default=0)} clients a round ({skipped} round(s) skipped); threshold "
            f"{secure.get('threshold')}, {secure.get('neighbours')} neighbours, sums of {secure.get('bits')} bits; "
            "the uplink above counts all four stages")


def describe(results: dict) -> str:
    """A short human summary of results.json."""
    def num(value: float | None, spec: str = ".4f") -> str:
        return "n/a" if value is None else format(value, spec)

    fraction = results.get("uplink_fraction_of_float")
    lines = [
        f"centralized accuracy {num(results['centralized_acc'])}; final global accuracy "
        f"{num(results['final_test_acc'])} after {len(results['rounds'])} rounds",
        f"first round within {WITHIN_POINTS} points: {results['first_round_within_0_5_points']}",
        f"uplink {results['uplink_bytes_per_client_round']} bytes per client per round; stock float32 FedAvg "
        f"{results['float_fedavg_uplink_bytes']} bytes"
        + (f" (1/{1 / fraction:.1f})" if fraction else ""),
        secure_line(results) or (
            f"uplink codec {results['config'].get('uplink_codec', 'signs')}: "
            f"{num(results.get('uplink_bits_per_binary_weight_after_round_1'), '.3f')} bits per binary weight "
            f"per client and round after round 1 (sign part alone "
            f"{num(results.get('sign_bits_per_binary_weight_after_round_1'), '.3f')})"),
        f"wall time {results['seconds']:.1f} s",
    ]
    return "\n".join(lines)


def _worker_main(spec_path: str) -> int:
    """The child process of :func:`federate`: the Ray simulation of one run."""
    from simulation.runs import stop_with_parent

    from common.data.datasets import receive_carried

    spec = json.loads(Path(spec_path).read_text())
    stop_with_parent(int(spec["parent_pid"]))
    receive_carried(spec.get("datasets", []))
    ray_address = spec.get("ray_address")
    if ray_address:
        from simulation.ray_cluster import exit_unless_joined

        exit_unless_joined(ray_address)
    try:
        run_federation(spec["run_config"], int(spec["clients"]), threads=int(spec.get("threads", 1)),
                       ray_address=ray_address)
    except HyBNNError as exc:
        # The ServerApp's own verdict (server.json holds it too): one line, no traceback.
        print(f"FedHyBNN stopped: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2]))
    sys.exit("usage: python -m simulation.federate --worker SPEC.json (started by `hybnn federate`)")
