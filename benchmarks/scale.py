"""How a simulated federation grows: seconds per round, peak memory and bytes per round
against the number of clients and the clients sampled per round.

Each point ``CLIENTS:PER_ROUND`` is one real run of the project's ServerApp and ClientApp on
Flower's simulation engine (Ray), in its own child process (:func:`simulation.federate.
start_federation_worker`, as ``hybnn federate`` runs it), without the centralized reference.
For each point it prints

* seconds per round: round 1 (Ray's workers start, each loads the task's codes and the split
  once) and the mean of the later rounds (the steady state), from server.json's clock;
* the peak resident memory of the whole process tree (the worker, Ray's raylet, GCS and
  workers), sampled every 0.2 s (psutil if installed, else /proc);
* the bytes of one round: the global model sent to each sampled client plus every reply.

It writes a PNG of steady seconds per round against clients per round, and ends with the line
``s_per_round_at_100=<seconds>``: the steady seconds per round of the point with 100 sampled
clients and the most clients (``nan`` when no point samples 100).

    python benchmarks/scale.py --encoder /tmp/scale/enc --data-root data --out /tmp/scale/bench
    python benchmarks/scale.py ... --points 100:10,100:50 --rounds 3      # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import HyBNNError  # noqa: E402

DEFAULT_POINTS = "10:10,100:10,100:50,1000:10,1000:50,1000:100"


def parse_points(text: str) -> list[tuple[int, int]]:
    points = []
    for part in text.split(","):
        try:
            clients, per_round = (int(v) for v in part.split(":"))
        except ValueError:
            raise HyBNNError(f"--points: expected CLIENTS:PER_ROUND pairs such as 100:10, got {part!r}") from None
        if not 1 <= per_round <= clients:
            raise HyBNNError(f"--points: {part!r} samples {per_round} of {clients} clients; need 1 <= per round "
                             "<= clients")
        points.append((clients, per_round))
    return points


def extra_run_config(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs, each checked against the settings schema."""
    from common.federated.settings import BY_KEY, run_settings

    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in BY_KEY or BY_KEY[key] not in run_settings():
            raise HyBNNError(f"--run-config: expected KEY=VALUE with a run-config key, got {pair!r}")
        values[key] = BY_KEY[key].parse(value, "--run-config")
    return values


def run_point(args, artifact, clients: int, per_round: int) -> dict:
    """One federated run; its timings, memory and bytes."""
    from common.resources import process_tree_rss_bytes
    from simulation.federate import FederateConfig, check_config, start_federation_worker
    from simulation.runs import stop_process_tree

    config = FederateConfig(task=args.task, clients=clients, clients_per_round=per_round, rounds=args.rounds,
                            local_epochs=args.local_epochs, partition=args.partition, alpha=args.alpha,
                            encoder=args.encoder, data_root=args.data_root, threads=args.threads,
                            client_failure_rate=args.client_failure_rate, progress=False,
                            aggregation=args.aggregation,
                            **({"lr": args.lr} if args.lr else {}))
    check_config(config)
    staging = args.out / f"c{clients}-k{per_round}"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "server.json").unlink(missing_ok=True)
    run_config = config.run_config(artifact.sha256)
    run_config["out-dir"] = str(staging.resolve())
    run_config.update(extra_run_config(args.run_config))
    started = time.perf_counter()
    worker = start_federation_worker(run_config, clients, staging, None, args.threads)
    peak = 0
    try:
        while worker.poll() is None:
            peak = max(peak, process_tree_rss_bytes(worker.pid))
            if time.perf_counter() - started > args.timeout_s:
                raise HyBNNError(f"point {clients}:{per_round} ran past --timeout-s {args.timeout_s}; read "
                                 f"{staging / 'logs' / 'simulation.log'}")
            time.sleep(0.2)
    finally:
        stop_process_tree(worker)
    wall = time.perf_counter() - started
    try:
        server = json.loads((staging / "server.json").read_text())
    except (OSError, ValueError):
        server = {}
    rounds = server.get("rounds", [])
    if server.get("status") != "finished" or len(rounds) != args.rounds:
        raise HyBNNError(f"point {clients}:{per_round} did not finish ({server.get('status')}, {len(rounds)} "
                         f"rounds); read {staging / 'logs' / 'simulation.log'}")
    clock = [0.0] + [r["seconds"] for r in rounds]
    per_round_s = [b - a for a, b in zip(clock, clock[1:])]
    round_bytes = [r["downlink_bytes"] * len(r.get("sampled", [])) + sum(c["reply_bytes"] for c in r["clients"])
                   for r in rounds]
    later = per_round_s[1:] or per_round_s
    return {
        "clients": clients, "per_round": per_round, "rounds": len(rounds), "wall_s": wall,
        "first_round_s": per_round_s[0], "steady_s_per_round": sum(later) / len(later),
        "peak_rss_bytes": peak, "bytes_per_round": sum(round_bytes) / len(round_bytes),
        "aggregated_per_round": sum(len(r["clients"]) for r in rounds) / len(rounds),
        "dropped_per_round": sum(len(r["dropped"]) for r in rounds) / len(rounds),
        "final_test_acc": rounds[-1]["test_acc"],
        "test_acc_per_round": [r["test_acc"] for r in rounds],
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.fileio import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for clients in sorted({r["clients"] for r in results}):
        points = sorted((r["per_round"], r["steady_s_per_round"]) for r in results if r["clients"] == clients)
        ax.plot(*zip(*points), marker="o", label=f"{clients} clients")
    ax.set(xlabel="clients sampled per round", ylabel="seconds per round (rounds 2+)",
           title="FedHyBNN simulation: seconds per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", type=Path, required=True, help="encoder artifact (hybnn pretrain)")
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument("--task", default="4v5")
    parser.add_argument("--points", default=DEFAULT_POINTS,
                        help="CLIENTS:PER_ROUND pairs, comma-separated (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per point (default: %(default)s)")
    parser.add_argument("--local-epochs", type=int, default=1, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None, help="clients' learning rate (default: the run config's)")
    parser.add_argument("--aggregation", default="vote", choices=["vote", "mean"])
    parser.add_argument("--partition", default="dirichlet", choices=["iid", "dirichlet"])
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--client-failure-rate", type=float, default=0.0)
    parser.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="a further run-config key, e.g. bn-aggregation=mean (repeatable)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per point (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        from common.encoder.artifact import load_encoder_artifact
        from common.encoder.features import load_codes

        points = parse_points(args.points)
        if args.rounds < 2:
            raise HyBNNError("--rounds must be at least 2: round 1 includes the workers' start-up.")
        artifact = load_encoder_artifact(args.encoder)
        for split in ("train", "test"):  # once, before any worker starts
            load_codes(artifact, args.data_root, split, progress=False)
        args.out.mkdir(parents=True, exist_ok=True)
        results = []
        print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, threads {args.threads}, "
              f"{args.rounds} rounds, {args.local_epochs} local epoch(s), {args.partition} "
              f"alpha {args.alpha}, task {args.task}, lr {args.lr or 'default'}, {args.aggregation}, "
              f"failure rate {args.client_failure_rate} {' '.join(args.run_config)}", flush=True)
        print(f"{'clients':>7} {'per round':>9} {'round 1 s':>9} {'s/round':>8} {'peak MiB':>9} "
              f"{'KiB/round':>9} {'agg':>5} {'drop':>5} {'acc':>6} {'wall s':>7}", flush=True)
        for clients, per_round in points:
            r = run_point(args, artifact, clients, per_round)
            results.append(r)
            print(f"{clients:>7} {per_round:>9} {r['first_round_s']:>9.2f} {r['steady_s_per_round']:>8.2f} "
                  f"{r['peak_rss_bytes'] / 2**20:>9.0f} {r['bytes_per_round'] / 1024:>9.1f} "
                  f"{r['aggregated_per_round']:>5.1f} {r['dropped_per_round']:>5.1f} {r['final_test_acc']:>6.3f} "
                  f"{r['wall_s']:>7.1f}", flush=True)
        (args.out / "scale.json").write_text(json.dumps(results, indent=2))
        plot(results, args.out / "scale.png")
        by_clients = {}
        for r in results:
            by_clients.setdefault(r["clients"], {})[r["per_round"]] = r["steady_s_per_round"]
        for clients, times in sorted(by_clients.items()):
            ks = sorted(times)
            if len(ks) >= 2:
                slope = (times[ks[-1]] - times[ks[0]]) / (ks[-1] - ks[0])
                print(f"{clients} clients: {slope:.4f} s per extra sampled client per round "
                      f"({ks[0]} -> {ks[-1]} per round)")
        print(f"wrote {args.out / 'scale.json'} and {args.out / 'scale.png'}")
        at_100 = [r for r in results if r["per_round"] == 100]
        value = max(at_100, key=lambda r: r["clients"])["steady_s_per_round"] if at_100 else math.nan
        print(f"s_per_round_at_100={value:.3f}")
    except HyBNNError as exc:
        print(f"scale: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
