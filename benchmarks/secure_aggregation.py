"""Secure aggregation (SecAgg+) against plaintext rounds: uplink bytes per client and seconds per round.

Usage::

    .venv/bin/python benchmarks/secure_aggregation.py [--data-root data] [--out runs/bench-secagg]
        [--uplink-clients 3 10 100] [--uplink-tasks 0v1 all10] [--time-clients 3 10 100] [--rounds 2]
        [--seed 0] [--scale] [--reuse]

``--uplink-clients`` or ``--time-clients`` with no number leaves that table out (``--uplink-clients
--time-clients --scale``: the scale run alone).

The encoder is a fixed untrained one (the same artifact ``tests/conftest.py: fixed_encoder``
makes, written under ``--out``): neither bytes nor seconds depend on what its codes say.

1. Uplink per client and round, on serialized messages. The project's ServerApp
   (``server.server_app.run_server``) drives one round against an in-process grid whose nodes
   are the project's ClientApp (as in tests/test_secure_rounds.py): once with
   ``secure-aggregation = "on"``, once ``"off"`` (same seed, same partitions). Bytes are
   ``common.federated.wire.record_nbytes`` of the real reply RecordDicts:

   * ``secure``: the client with the most bytes over its four stage replies (keys, shares,
     masked vector, unmask shares); the same number as results.json's ``secure.uplink_bytes``;
   * ``plain``: the ``train`` reply of that same client (partition) in the plaintext round, the
     1-bit signs codec's ArrayRecord and its MetricRecord as ``client/client_app.py:
     handle_train`` sends it;
   * ``flower``: Flower 1.42's ``secaggplus_mod`` for the same float model (the float
     ``BNN(config).state_dict()`` tensors a plain Flower ClientApp would return), run for real:
     its client functions ``_setup``, ``_share_keys``, ``_collect_masked_vectors``, ``_unmask``
     for a clique of ``share_num = neighbours + 1`` clients (our round's neighbourhood plus the
     client itself; its threshold our round's per-neighbourhood one, ``local_threshold``; the
     SecAggPlusWorkflow defaults otherwise), each
     stage's reply built as the mod builds it (stage 3: the ``train`` reply's RecordDict with its
     ArrayRecord emptied, its MetricRecord kept, plus the ConfigRecord of ``masked_parameters``:
     one ``np.save`` blob of int64 per tensor plus the weight factor), measured with
     ``record_nbytes``. ``flower s3`` is stage 3 alone; ``flower s3 AR`` is the lower bound the
     layout implies, an ArrayRecord holding one int64 array per float tensor.

   Targets: secure / plain <= 12 at N <= 100; Flower's SecAgg+ / ours >= 5.

2. Seconds per round, secure against plaintext, side by side: ``hybnn federate`` (Flower's Ray
   simulation, each run its own process) with ``--clients N --clients-per-round N --rounds R
   --local-epochs 1 --centralized-epochs 1 --task 0v1``, once ``--secure-aggregation off`` and
   once ``on``, the same seed; seconds per round from results.json's cumulative ``seconds``
   (round 1 includes Ray's workers' start-up; "later" is the mean of rounds 2..R). Target:
   secure / plain <= 3 at 100 clients per round.

3. ``--scale``: 1,000 clients, 100 per round, 50 rounds, task 4v5, Dirichlet 0.3, secure,
   docs/scale.md's command otherwise (``--scale-threshold``: its ``--secure-threshold``); the
   total wall time (target: under 10 minutes on 2 cores), the clients summed per round and the
   rounds skipped (a skipped round costs little and trains no one, so it counts against the target).

No result is asserted: the machine is shared, the timings are what it gave this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

FLAGS_SHOWN = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "sha_ni", "aes", "vaes")
TASKS = {"0v1": 2, "all10": 10}
TARGET_PLAIN = 12.0
TARGET_FLOWER = 5.0
TARGET_TIME = 3.0
TARGET_SCALE_S = 600.0


def cpu_line() -> str:
    model, flags = platform.processor() or "unknown", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cpus; flags: "
            + " ".join(f"{f}{'+' if f in flags else '-'}" for f in FLAGS_SHOWN))


def fixed_encoder(path: Path) -> Path:
    """tests/conftest.py's untrained encoder with fixed weights (same artifact, same sha256)."""
    import torch

    from common.encoder.artifact import save_encoder_artifact
    from common.encoder.vae import BinaryVAE, VAEConfig

    if not path.exists():
        torch.manual_seed(1234)
        save_encoder_artifact(BinaryVAE(VAEConfig()).eval(), path, data_sha256="0" * 64, train_config={},
                              history=[])
    return path


# ----------------------------------------------------------------------------- 1. uplink
class ClientAppGrid:
    """A grid whose nodes are the project's ClientApp, called in this process (tests/test_secure_rounds.py)."""

    def __init__(self, n: int, run_config: dict) -> None:
        from flwr.app import Context, RecordDict

        from client.client_app import app

        self.app = app
        self.node_ids = [1000 + 17 * i for i in range(n)]
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=dict(run_config),
                                       node_config={"partition-id": i, "num-partitions": n})
                         for i, node in enumerate(self.node_ids)}
        self.replies: list = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            self.replies.append((msg, reply))
            replies.append(reply)
        return replies


def grid_round(encoder: Path, data_root: Path, out: Path, task: str, n: int, mode: str, seed: int):
    """One round of the real ServerApp on the in-process grid; (results, grid)."""
    from common.encoder.artifact import load_encoder_artifact
    from server.server_app import ServerSettings, run_server

    run_config = {"task": task, "num-server-rounds": 1, "local-epochs": 1, "encoder-path": str(encoder),
                  "encoder-sha256": load_encoder_artifact(encoder).sha256, "data-root": str(data_root),
                  "out-dir": str(out / f"grid-{task}-n{n}-{mode}"), "min-available-nodes": n,
                  "secure-aggregation": mode, "seed": seed}
    grid = ClientAppGrid(n, run_config)
    partitions = {node: i for i, node in enumerate(grid.node_ids)}
    results = run_server(grid, ServerSettings.from_run_config(run_config), node_partitions=lambda _: partitions)
    return results, grid


def flower_secaggplus_bytes(float_model: dict[str, np.ndarray], share_num: int, threshold: int,
                            num_examples: int) -> dict[str, int]:
    """Serialized bytes of each of one client's four replies in Flower 1.42's SecAgg+ (secaggplus_mod),
    for a clique of ``share_num`` clients (each the others' neighbour), the client's model ``float_model``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    import importlib

    # the package exports the mod function under the module's name: take the module itself
    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    from flwr.common import ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from common.federated.wire import record_nbytes

    def reply(res: dict, base: RecordDict | None = None) -> int:
        content = base if base is not None else RecordDict()
        # keep_input=False (as the mod builds it) empties its argument: give it a copy
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(dict(res), False)
        return record_nbytes(content)

    nids = [1000 + 17 * i for i in range(share_num)]
    # SecAggPlusWorkflow's defaults otherwise: max_weight 1000, clipping 8.0, 2**22 levels, modulus 2**32
    setup_config = {Key.SAMPLE_NUMBER: share_num, Key.SHARE_NUMBER: share_num, Key.THRESHOLD: threshold,
                    Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1000.0}
    states = {nid: mod.SecAggPlusState(nid=nid) for nid in nids}
    setup = {nid: mod._setup(st, ConfigRecord(dict(setup_config))) for nid, st in states.items()}
    me = nids[0]
    sizes = {"keys": reply(setup[me])}
    keys = {str(nid): [setup[nid][Key.PUBLIC_KEY_1], setup[nid][Key.PUBLIC_KEY_2]] for nid in nids}
    shared = {nid: mod._share_keys(st, ConfigRecord(dict(keys))) for nid, st in states.items()}
    sizes["shares"] = reply(shared[me])
    srcs, cts = [], []
    for nid, res in shared.items():
        for dst, ct in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST]):
            if dst == me:
                srcs.append(nid)
                cts.append(ct)
    params = ndarrays_to_parameters(list(float_model.values()))
    masked = mod._collect_masked_vectors(states[me], ConfigRecord({Key.CIPHERTEXT_LIST: cts, Key.SOURCE_LIST: srcs}),
                                         num_examples, params)
    train_reply = RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(
        {"num-examples": num_examples, "train_loss": 0.5, "train_acc": 0.9})})
    sizes["masked"] = reply(masked, train_reply)
    unmask = mod._unmask(states[me], ConfigRecord({Key.ACTIVE_NODE_ID_LIST: nids, Key.DEAD_NODE_ID_LIST: []}))
    sizes["unmask"] = reply(unmask)
    sizes["array_record_lower_bound"] = record_nbytes(ArrayRecord(
        {k: Array(np.zeros(v.shape, dtype=np.int64)) for k, v in float_model.items()}))
    return sizes


def uplink_point(args, encoder: Path, task: str, n: int) -> dict:
    import torch

    from common.bnn.model import BNN, BNNConfig
    from common.federated.wire import SECAGG, record_nbytes

    started = time.perf_counter()
    secure, grid_on = grid_round(encoder, args.data_root, args.out, task, n, "on", args.seed)
    _, grid_off = grid_round(encoder, args.data_root, args.out, task, n, "off", args.seed)
    stage_of = {"train": "masked", SECAGG.message_type(SECAGG.keys_action): "keys",
                SECAGG.message_type(SECAGG.shares_action): "shares",
                SECAGG.message_type(SECAGG.unmask_action): "unmask"}
    per_node: dict[int, dict[str, int]] = {}
    for msg, reply in grid_on.replies:
        stage = stage_of.get(msg.metadata.message_type)
        if stage is not None:
            per_node.setdefault(msg.metadata.dst_node_id, {}).setdefault(stage, 0)
            per_node[msg.metadata.dst_node_id][stage] += record_nbytes(reply.content)
    largest = max(per_node, key=lambda node: sum(per_node[node].values()))
    plain = {msg.metadata.dst_node_id: record_nbytes(reply.content) for msg, reply in grid_off.replies
             if msg.metadata.message_type == "train"}
    record = secure["rounds"][0]["secure"]
    ours = sum(per_node[largest].values())
    if ours != record["uplink_bytes"]:
        print(f"  note: {task} N={n}: the grid's replies sum to {ours} bytes, results.json says "
              f"{record['uplink_bytes']}", flush=True)
    config = BNNConfig.for_task(200, TASKS[task])
    torch.manual_seed(args.seed)
    float_model = {k: v.detach().cpu().numpy() for k, v in BNN(config).state_dict().items()}
    flower = flower_secaggplus_bytes(float_model, record["neighbours"] + 1, record["local_threshold"],
                                     num_examples=max(1, 12_000 // n))
    flower_total = sum(flower[s] for s in ("keys", "shares", "masked", "unmask"))
    return {"task": task, "n": n,
            "secure": ours, "stages": per_node[largest], "plain": plain[largest], "bits": record["bits"],
            "neighbours": record["neighbours"], "threshold": record["threshold"],
            "local_threshold": record["local_threshold"], "flower": flower,
            "flower_total": flower_total, "seconds": time.perf_counter() - started}


def uplink_table(rows: list[dict]) -> None:
    print()
    print("Uplink per client per round, bytes as serialized (record_nbytes), the client with the most secure bytes")
    print()
    print("| task | N | nbrs | thr (local) | bits | ours: keys | shares | masked | unmask | ours secure | "
          "plain signs | secure/plain | flower s3 AR | flower s3 | flower total | flower/ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, f = r["stages"], r["flower"]
        print(f"| {r['task']} | {r['n']} | {r['neighbours']} | {r['threshold']} ({r['local_threshold']}) | "
              f"{'/'.join(map(str, r['bits']))} | "
              f"{s.get('keys', 0)} | {s.get('shares', 0)} | {s.get('masked', 0)} | {s.get('unmask', 0)} | "
              f"{r['secure']} | {r['plain']} | {r['secure'] / r['plain']:.2f}x | {f['array_record_lower_bound']} | "
              f"{f['masked']} | {r['flower_total']} | {r['flower_total'] / r['secure']:.2f}x |", flush=True)
    worst_plain = max(r["secure"] / r["plain"] for r in rows if r["n"] <= 100)
    worst_flower = min(r["flower_total"] / r["secure"] for r in rows)
    worst_s3 = min(r["flower"]["array_record_lower_bound"] / r["secure"] for r in rows)
    print()
    print(f"secure_vs_plain_max={worst_plain:.2f} (target <= {TARGET_PLAIN:g} at N <= 100: "
          f"{'met' if worst_plain <= TARGET_PLAIN else 'NOT met'})")
    met = min(worst_flower, worst_s3) >= TARGET_FLOWER
    print(f"flower_vs_ours_min={worst_flower:.2f} (all four stages), flower_stage3_arrayrecord_vs_ours_min="
          f"{worst_s3:.2f} (target >= {TARGET_FLOWER:g}: {'met' if met else 'NOT met'})")


# ----------------------------------------------------------------------------- 2. round time
def federate(args, encoder: Path, name: str, arguments: list[str]) -> tuple[dict, float, str]:
    out = args.out / name
    results_path = out / "results.json"
    if args.reuse and results_path.exists():
        results = json.loads(results_path.read_text())
        if results.get("status") == "finished":
            print(f"[{name}] reusing {results_path}", flush=True)
            return results, float("nan"), "?"
    command = [sys.executable, "-m", "simulation.cli", "federate", *arguments, "--encoder", str(encoder),
               "--data-root", str(args.data_root), "--seed", str(args.seed), "--out", str(out)]
    load_before = os.getloadavg()[0]
    print(f"[{name}] {' '.join(command[1:])}  (load {load_before:.2f})", flush=True)
    log_path = args.out / f"{name}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"[{name}] hybnn federate exited with {status}; see {log_path}")
    load_after = os.getloadavg()[0]
    print(f"[{name}] done in {wall:.0f} s (load {load_after:.2f})", flush=True)
    return json.loads(results_path.read_text()), wall, f"{load_before:.1f}/{load_after:.1f}"


def per_round_seconds(results: dict) -> list[float]:
    clock = [0.0] + [r["seconds"] for r in results["rounds"]]
    return [b - a for a, b in zip(clock, clock[1:])]


def time_point(args, encoder: Path, n: int) -> dict:
    row = {"n": n}
    for mode in ("off", "on"):
        results, wall, load = federate(args, encoder, f"time-0v1-n{n}-{mode}",
                                 ["--task", "0v1", "--clients", str(n), "--clients-per-round", str(n),
                                  "--rounds", str(args.rounds), "--local-epochs", "1", "--centralized-epochs", "1",
                                  "--secure-aggregation", mode])
        seconds = per_round_seconds(results)
        later = seconds[1:] or seconds
        row[mode] = {"rounds": seconds, "first": seconds[0], "later": sum(later) / len(later),
                     "wall": wall, "load": load, "acc": results["rounds"][-1]["test_acc"]}
    return row


def time_table(rows: list[dict]) -> None:
    print()
    print("Seconds per round, task 0v1, N clients all sampled, hybnn federate (Ray simulation), same seed")
    print()
    print("| N | plain round 1 s | secure round 1 s | plain later s/round | secure later s/round | "
          "secure/plain (later) | secure/plain (all rounds) | plain acc | secure acc | load 1-min (plain; secure) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        off, on = r["off"], r["on"]
        print(f"| {r['n']} | {off['first']:.2f} | {on['first']:.2f} | {off['later']:.2f} | {on['later']:.2f} | "
              f"{on['later'] / off['later']:.2f}x | {sum(on['rounds']) / sum(off['rounds']):.2f}x | "
              f"{off['acc']:.4f} | {on['acc']:.4f} | {off['load']}; {on['load']} |", flush=True)
    at_100 = [r for r in rows if r["n"] == 100]
    if at_100:
        ratio = at_100[0]["on"]["later"] / at_100[0]["off"]["later"]
        print()
        print(f"secure_vs_plain_s_per_round_at_100={ratio:.2f} (target <= {TARGET_TIME:g}: "
              f"{'met' if ratio <= TARGET_TIME else 'NOT met'})")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-secagg"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--uplink-clients", type=int, nargs="*", default=[3, 10, 100],
                        help="clients per round of the uplink table (default: %(default)s)")
    parser.add_argument("--uplink-tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--time-clients", type=int, nargs="*", default=[3, 10, 100],
                        help="clients per round of the round-time table; each point is two hybnn federate "
                             "runs, about a minute each on 2 cores (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each timed run (default: %(default)s)")
    parser.add_argument("--scale", action="store_true",
                        help="also the 1,000-client, 100-per-round, 50-round secure run (task 4v5)")
    parser.add_argument("--scale-threshold", type=int, default=0,
                        help="--secure-threshold of the --scale run (default: 0, the protocol's two thirds)")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs' results.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import flwr
    import torch

    from common.encoder.artifact import load_encoder_artifact
    from common.encoder.features import load_codes

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    encoder = fixed_encoder(args.out / "encoder")
    artifact = load_encoder_artifact(encoder)
    for split in ("train", "test"):  # once, before any run
        load_codes(artifact, args.data_root, split, progress=False)
    print(f"cpu:     {cpu_line()}")
    print(f"torch:   {torch.__version__}, flwr {flwr.__version__}, 1 thread; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"encoder: fixed untrained ({artifact.sha256[:12]}), data {args.data_root}, seed {args.seed}")

    uplink = []
    if args.uplink_clients:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
        for task in args.uplink_tasks:
            for n in args.uplink_clients:
                uplink.append(uplink_point(args, encoder, task, n))
                print(f"  uplink {task} N={n}: {uplink[-1]['seconds']:.0f} s", flush=True)
    timing = [time_point(args, encoder, n) for n in args.time_clients]
    scale = None
    if args.scale:
        name = "scale-4v5-1000x100-secure" + (f"-t{args.scale_threshold}" if args.scale_threshold else "")
        results, wall, load = federate(args, encoder, name, [
            "--task", "4v5", "--clients", "1000", "--clients-per-round", "100", "--partition", "dirichlet",
            "--alpha", "0.3", "--rounds", "50", "--aggregation", "mean", "--lr", "0.1", "--local-epochs", "5",
            "--max-weight-vs-median", "0", "--secure-aggregation", "on",
            *(["--secure-threshold", str(args.scale_threshold)] if args.scale_threshold else [])])
        rounds = results["rounds"]
        scale = {"wall": wall, "load": load, "server_seconds": rounds[-1]["seconds"], "acc": rounds[-1]["test_acc"],
                 "summed": sum(r["secure"]["summed"] for r in rounds) / len(rounds),
                 "skipped": sum(r["secure"]["skipped"] is not None for r in rounds),
                 "uplink_bytes": max(r["secure"]["uplink_bytes"] for r in rounds)}

    print()
    print(f"cpu:     {cpu_line()}")
    print(f"torch:   {torch.__version__}, flwr {flwr.__version__}; load average now "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if uplink:
        uplink_table(uplink)
    if timing:
        time_table(timing)
    if scale is not None:
        met = scale["wall"] < TARGET_SCALE_S and not scale["skipped"]
        print()
        print(f"scale: 1,000 clients, 100 per round, 50 rounds, secure: {scale['wall']:.0f} s wall "
              f"({scale['server_seconds']:.0f} s by the server's clock, load {scale['load']}), final test acc "
              f"{scale['acc']:.4f}, {scale['summed']:.1f} clients summed per round, {scale['skipped']} round(s) "
              f"skipped, largest client uplink {scale['uplink_bytes']} bytes; target < {TARGET_SCALE_S:.0f} s "
              f"with every round summed: {'met' if met else 'NOT met'}"
              + (" (the skipped rounds trained no one)" if scale["skipped"] else ""))
    (args.out / "secure_aggregation.json").write_text(json.dumps({"uplink": uplink, "time": timing, "scale": scale},
                                                                  indent=2, default=str))
    print(f"wrote {args.out / 'secure_aggregation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
