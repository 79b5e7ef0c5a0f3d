"""Attacks by clients, end to end: FedHyBNN on Flower's Ray simulation with hostile clients.

Usage::

    .venv/bin/python benchmarks/attacks.py [--task 4v5] [--clients 5] [--rounds 5] [--local-epochs 1]
        [--attacks sign-flip random-bits ...] [--adversaries 1 2] [--encoder artifacts/encoder]
        [--data-root data] [--seed 0] [--out runs/attacks] [--undefended]

Every run is the ServerApp and ClientApp of ``hybnn federate`` (``simulation.federate``'s
``simulation_apps`` and ``run_federation``), one process per run, same seed, IID split.
The hostile clients are the ClientApp wrapped: the honest client trains and replies as
always, then the wrapper corrupts that reply when its ``partition-id`` is one of the
last ``k`` of the ``--clients``. Attacks (``ATTACKS``):

``sign-flip``      every sign negated
``random-bits``    the sign bits replaced by random bits (batch norm kept)
``weight-hijack``  the output layer's signs oriented to do worst on the client's own data
                   (its trained output layer or the negation, whichever scores lower there),
                   and ``num-examples = 10**18``
``bn-poison``      every batch-norm number 60000 (finite, fits float16)
``bn-overflow``    every batch-norm number 1e6, sent as float32 (overflows the float16 downlink)
``metric-forgery`` the server's own fields as metrics: ``node-id``, ``uplink-bytes``, ``sign-flips``...
``bad-metrics``    ``train-loss`` as a list, ``train-acc = 1e308``

For each attack and each ``k`` in ``--adversaries`` it prints the final global test
accuracy, the drop against the honest run in points, the lowest global accuracy over the
rounds (an attack can do its damage before the last round), the rounds completed, and the
replies the server dropped and capped (from server.json). The honest run is repeated with
``bn-aggregation = "mean"``, the plain weighted mean, to show what the median costs honest
clients. ``--undefended`` adds weight-hijack and bn-poison runs with the defences off
(``max-weight-vs-median = 0``, ``bn-aggregation = "mean"``), to show what they prevent.
The last line is ``worst_drop_1_of_5=<points>``: the largest drop with one adversary (of
``--clients``), over the attacks, defences on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATTACKS = ("sign-flip", "random-bits", "weight-hijack", "bn-poison", "bn-overflow", "metric-forgery", "bad-metrics")
UNDEFENDED = {"max-weight-vs-median": 0, "bn-aggregation": "mean"}
UNDEFENDED_ATTACKS = ("weight-hijack", "bn-poison")
TARGET_POINTS = 1.0


# ---------------------------------------------------------------------------- the hostile client
def corrupt(content, attack: str, layout, seed: int, local_data=None, reference_bn=None):
    """The ``RecordDict`` a hostile client sends instead of its honest ``content``.

    ``local_data`` is the client's ``(x, y)``, which ``weight-hijack`` uses to aim.
    ``reference_bn``: the global batch norm the client received, which a threshold update
    (``bn-encoding = "thresholds"``) is taken against; the corrupted reply uses the same encoding.
    """
    import numpy as np
    from flwr.app import MetricRecord, RecordDict

    from common.federated import codec
    from common.federated.wire import METRIC, RECORD, payload_to_record, record_to_payload

    metrics = dict(content[RECORD.metrics])
    honest = record_to_payload(content[RECORD.arrays])
    encoding = codec.bn_encoding_of(honest)
    weights, bn = codec.decode(honest, layout, kind="signs", reference_bn=reference_bn)
    bn_dtype = "float16"
    rng = np.random.default_rng(seed)
    if attack == "sign-flip":
        weights = -weights
    elif attack == "random-bits":
        weights = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=weights.shape)
    elif attack == "weight-hijack":
        weights = worst_output_layer(weights, bn, layout, *local_data)
        metrics[METRIC.num_examples] = 10**18
    elif attack == "bn-poison":
        bn = np.full_like(bn, 60000.0)
    elif attack == "bn-overflow":
        bn, bn_dtype = np.full_like(bn, 1e6), "float32"
    elif attack == "metric-forgery":
        metrics.update({"node-id": 1, "uplink-bytes": 1, "reply-bytes": 1, "sign-flips": 0, "weight": 10**9,
                        "downlink-bytes": 1})
    elif attack == "bad-metrics":
        metrics.update({METRIC.train_loss: [0.0, 0.0], METRIC.train_acc: 1e308})
    elif attack != "none":
        raise ValueError(f"unknown attack {attack!r}")
    payload = codec.encode_signs(weights, bn, bn_dtype, encoding, reference_bn, layout)
    return RecordDict({RECORD.arrays: payload_to_record(payload), RECORD.metrics: MetricRecord(metrics)})


def worst_output_layer(weights, bn, layout, x, y):
    """``weights`` with the output layer's signs as trained or negated, whichever is less accurate on
    ``(x, y)``. Always negating would undo itself once the global model carries the negation."""
    from common.federated import aggregation, codec
    from common.bnn.model import BNN
    from common.bnn.training import evaluate

    rows, cols = layout.binary_shapes[-1]
    negated = weights.copy()
    negated[-rows * cols:] *= -1

    def accuracy(signs):
        model = BNN(layout.config)
        codec.load_into_model(model, layout, aggregation.client_start_latent(signs, "signs"), bn)
        model.eval()
        return evaluate(model, x, y)["acc"]

    return negated if accuracy(negated) <= accuracy(weights) else weights


def adversarial_client_app(run_config: dict, attack: str, hostile: set[int], in_bits: int):
    """The project's ClientApp; partitions in ``hostile`` corrupt their honest reply with ``attack``.

    ``in_bits`` is the encoder's latent bits, the BNN's input width.
    """
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from client.client_app import handle_train

    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        from client.client_app import ClientSettings, LocalRound, load_client_encoder, local_training_data
        from common.federated import codec
        from common.bnn.model import BNNConfig
        from common.data.tasks import get_task
        from common.federated.wire import RECORD, record_to_payload

        reply = handle_train(msg, context, defaults=run_config)
        partition = int(context.node_config.get("partition-id", -1))
        if partition not in hostile or reply.has_error():
            return reply
        layout = codec.layout_for(BNNConfig.for_task(in_bits, get_task(run_config["task"]).num_classes))
        round_config = LocalRound.from_config(msg.content[RECORD.config])
        artifact = load_client_encoder(ClientSettings.from_context(context, run_config).encoder_path,
                                       round_config.encoder_sha256)
        local_data = local_training_data(artifact, ClientSettings.from_context(context, run_config), round_config.task)
        seed = 1000 * round_config.server_round + partition
        _, received_bn = codec.decode(record_to_payload(msg.content[RECORD.arrays]), layout)
        return Message(content=corrupt(reply.content, attack, layout, seed, local_data, received_bn), reply_to=msg)

    return app


def run_one(spec: dict) -> None:
    """One federation (in this process): the spec's attack, adversaries and run config."""
    from simulation.federate import run_federation, simulation_apps

    run_config = spec["run_config"]
    hostile = set(spec["hostile"])
    server_app, _ = simulation_apps(run_config)
    client_app = adversarial_client_app(run_config, spec["attack"], hostile, spec["in_bits"])
    run_federation(run_config, spec["clients"], apps=(server_app, client_app))


# ---------------------------------------------------------------------------- the driver
def federation(name: str, attack: str, k: int, args, artifact, extra: dict | None = None) -> dict:
    """Run one federation in its own process; a row of the table from its server.json."""
    from simulation.federate import FederateConfig

    out = Path(args.out) / name
    config = FederateConfig(task=args.task, clients=args.clients, rounds=args.rounds, local_epochs=args.local_epochs,
                            encoder=Path(args.encoder), data_root=Path(args.data_root), out=out, seed=args.seed)
    run_config = {**config.run_config(artifact.sha256), **(extra or {})}
    hostile = list(range(args.clients - k, args.clients))
    spec = {"run_config": run_config, "attack": attack, "hostile": hostile, "clients": args.clients,
            "in_bits": int(artifact.config.latent_bits)}
    out.mkdir(parents=True, exist_ok=True)
    server_path = out / "server.json"
    server_path.unlink(missing_ok=True)
    log_path = out / "run.log"
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with log_path.open("w") as log:
        status = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    seconds = time.perf_counter() - started
    server = json.loads(server_path.read_text()) if server_path.exists() else {"rounds": [], "status": "missing"}
    rounds = server.get("rounds", [])
    row = {
        "name": name, "attack": attack, "adversaries": k, "extra": extra or {},
        "final_acc": rounds[-1]["test_acc"] if rounds else None,
        "lowest_acc": min((r["test_acc"] for r in rounds), default=None),
        "rounds": len(rounds), "status": server.get("status"), "exit": status,
        "dropped": sum(len(r["dropped"]) for r in rounds),
        "capped": sum(len(r.get("capped", [])) for r in rounds),
        "seconds": seconds,
    }
    print(f"[{name}] exit {status}, {row['rounds']} rounds, final acc {row['final_acc']}, "
          f"{row['dropped']} dropped, {row['capped']} capped, {seconds:.0f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="4v5")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--adversaries", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--encoder", default="artifacts/encoder")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/attacks")
    parser.add_argument("--undefended", action="store_true",
                        help="also run weight-hijack and bn-poison (1 adversary) with the defences off")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(json.loads(args.child))
        return
    if not all(0 < k < args.clients for k in args.adversaries):
        parser.error(f"--adversaries must lie between 1 and {args.clients - 1}")

    from common.encoder.artifact import load_encoder_artifact
    from common.encoder.features import load_codes

    artifact = load_encoder_artifact(args.encoder)
    for split in ("train", "test"):  # once, before any simulated client reads the cache
        load_codes(artifact, args.data_root, split, progress=False)
    started = time.perf_counter()
    honest = federation("honest", "none", 0, args, artifact)
    rows = [federation("honest-bn-mean", "none", 0, args, artifact, {"bn-aggregation": "mean"})]
    for attack in args.attacks:
        for k in args.adversaries:
            rows.append(federation(f"{attack}-{k}of{args.clients}", attack, k, args, artifact))
    if args.undefended:
        for attack in UNDEFENDED_ATTACKS:
            rows.append(federation(f"{attack}-1of{args.clients}-undefended", attack, 1, args, artifact, UNDEFENDED))

    base = honest["final_acc"]
    print()
    print(f"Attacks by clients: task {args.task}, {args.clients} clients (IID), {args.rounds} rounds, "
          f"{args.local_epochs} local epoch(s), vote, encoder {args.encoder} (sha256 {artifact.sha256[:12]}...), "
          f"seed {args.seed}; {time.perf_counter() - started:.0f} s in all")
    print()
    print("| attack | adversaries | final acc | drop vs honest (points) | lowest acc over the rounds | "
          "rounds completed | replies dropped | replies capped |")
    print("|---|---|---|---|---|---|---|---|")

    def line(row: dict, label: str) -> None:
        acc = row["final_acc"]
        drop = "n/a" if acc is None or base is None else f"{(base - acc) * 100:+.2f}"
        done = f"{row['rounds']}/{args.rounds}" + ("" if row["status"] == "finished" and row["exit"] == 0
                                                  else f" ({row['status']}, exit {row['exit']})")
        lowest = row["lowest_acc"]
        print(f"| {label} | {row['adversaries']} of {args.clients} | {'n/a' if acc is None else f'{acc:.4f}'} | "
              f"{drop} | {'n/a' if lowest is None else f'{lowest:.4f}'} | {done} | {row['dropped']} | "
              f"{row['capped']} |")

    line(honest, "none (honest)")
    for row in rows:
        label = row["attack"] if row["attack"] != "none" else "none (honest), bn-aggregation mean"
        if row["extra"] == UNDEFENDED:
            label += " (defences off)"
        line(row, label)
    summary = {"honest": honest, "rows": rows, "args": {k: v for k, v in vars(args).items() if k != "child"}}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))

    def drop(row: dict) -> float:
        if row["final_acc"] is None or row["status"] != "finished" or base is None:
            return 100.0 * (base or 1.0)  # a run that did not finish loses everything
        return (base - row["final_acc"]) * 100

    one = [drop(r) for r in rows if r["adversaries"] == 1 and r["attack"] != "none" and r["extra"] != UNDEFENDED]
    worst = max(one) if one else float("nan")
    print()
    print(f"Target: with 1 of {args.clients} adversarial, every attack within {TARGET_POINTS} point of the honest "
          f"run: {'met' if worst <= TARGET_POINTS else 'NOT met'}.")
    print(f"worst_drop_1_of_{args.clients}={worst:.2f}")


if __name__ == "__main__":
    main()
