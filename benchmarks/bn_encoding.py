"""Batch norm as thresholds against float16 batch norm: uplink bytes and final accuracy.

Usage::

    .venv/bin/python benchmarks/bn_encoding.py [--tasks 0v1 2v3 4v5 6v7 8v9] [--seeds 0] [--rounds 20]
        [--clients 3] [--encoder artifacts/encoder-paper] [--out runs/bn-encoding] [--reuse]

For every task and seed it runs ``hybnn federate`` twice with otherwise the command's
defaults (IID split, vote aggregation, 1-bit sign uplink, 2 local epochs, cosine learning
rate): once with ``--bn-encoding thresholds``, once with ``--bn-encoding floats``. Each run
is its own process. ``--reuse`` keeps a finished run's results.json instead of running it
again (to resume an interrupted measurement).

Reported per task and seed, from results.json (the server measures every reply):

* final global test accuracy with each encoding, and the difference in points;
* the uplink record's bytes per client and round as Flower serializes it (largest and mean
  over all rounds and clients), and stock float32 FedAvg's record divided by it;
* for thresholds, how many client updates had to coarsen their thresholds (step > 1), and
  in which rounds.

One seed decides little: the same seed gives a different training path with each encoding,
and the final accuracy of a pair task moves by about 0.1 to 0.3 points between seeds.
``--seeds 0 1 2`` runs every task with each seed and also prints the means over seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from federate_run import add_federation_options, federate

ENCODINGS = ("thresholds", "floats")
TARGET_RATIO = 30.0
TARGET_POINTS = 0.2


def run(task: str, encoding: str, seed: int, args: argparse.Namespace) -> dict:
    """One ``hybnn federate`` run (or its earlier results with ``--reuse``); its results.json."""
    name = f"{task}-{encoding}-s{seed}"
    out = Path(args.out) / name
    arguments = ["--task", task, "--clients", str(args.clients), "--rounds", str(args.rounds),
                 "--partition", "iid", "--bn-encoding", encoding, "--encoder", str(args.encoder),
                 "--data-root", str(args.data_root), "--seed", str(seed), "--threads", "1"]
    return federate(arguments, name, out, Path(args.out) / f"{name}.log",
                    reuse=args.reuse, rounds=args.rounds)


def uplinks(results: dict) -> list[int]:
    """Every client's uplink record bytes, every round."""
    return [c["uplink_bytes"] for r in results["rounds"] for c in r["clients"]]


def coarsened(results: dict) -> tuple[int, int, list[int]]:
    """(updates with step > 1, all client updates, the rounds that had one)."""
    steps = [(r["round"], c.get("bn_step")) for r in results["rounds"] for c in r["clients"]]
    rounds = sorted({rnd for rnd, step in steps if step is not None and step > 1})
    return sum(1 for _, step in steps if step is not None and step > 1), len(steps), rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_federation_options(parser, out="runs/bn-encoding")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        for task in args.tasks:
            res = {enc: run(task, enc, seed, args) for enc in ENCODINGS}
            float_fedavg = res["thresholds"]["float_fedavg_uplink_bytes"]
            row = {"task": task, "seed": seed, "float_fedavg_bytes": float_fedavg}
            for enc in ENCODINGS:
                sizes = uplinks(res[enc])
                row[f"acc_{enc}"] = res[enc]["final_test_acc"]
                row[f"max_bytes_{enc}"] = max(sizes)
                row[f"mean_bytes_{enc}"] = sum(sizes) / len(sizes)
                row[f"ratio_{enc}"] = float_fedavg / max(sizes)
            row["diff_points"] = (row["acc_thresholds"] - row["acc_floats"]) * 100
            row["coarsened"], row["updates"], row["coarsened_rounds"] = coarsened(res["thresholds"])
            row["centralized_acc"] = res["thresholds"]["centralized_acc"]
            rows.append(row)

    print()
    print(f"bn-encoding thresholds vs floats (float16): {args.clients} clients, {args.rounds} rounds, IID, "
          f"encoder {args.encoder}, seeds {' '.join(map(str, args.seeds))}; uplink = the client's ArrayRecord "
          "as Flower serializes it, every client and round")
    print()
    print("| task | seed | final acc thresholds | final acc floats | diff (points) | uplink bytes thresholds "
          "(max / mean) | uplink bytes floats (max / mean) | float32 FedAvg / uplink (thresholds, floats) | "
          "coarsened updates (rounds) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        where = f"{r['coarsened_rounds'][0]}-{r['coarsened_rounds'][-1]}" if r["coarsened_rounds"] else "none"
        print(f"| {r['task']} | {r['seed']} | {r['acc_thresholds']:.4f} | {r['acc_floats']:.4f} | "
              f"{r['diff_points']:+.2f} | {r['max_bytes_thresholds']} / {r['mean_bytes_thresholds']:.0f} | "
              f"{r['max_bytes_floats']} / {r['mean_bytes_floats']:.0f} | {r['ratio_thresholds']:.2f}x, "
              f"{r['ratio_floats']:.2f}x | {r['coarsened']} of {r['updates']} ({where}) |")
    if len(args.seeds) > 1:
        print()
        print("Means over seeds:")
        print()
        print("| task | final acc thresholds | final acc floats | diff (points) | diffs per seed |")
        print("|---|---|---|---|---|")
        for task in args.tasks:
            mine = [r for r in rows if r["task"] == task]
            a = sum(r["acc_thresholds"] for r in mine) / len(mine)
            b = sum(r["acc_floats"] for r in mine) / len(mine)
            diffs = ", ".join(format(r["diff_points"], "+.2f") for r in mine)
            print(f"| {task} | {a:.4f} | {b:.4f} | {(a - b) * 100:+.2f} | {diffs} |")
    worst_ratio = min(r["ratio_thresholds"] for r in rows)
    worst_diff = min(r["diff_points"] for r in rows)
    print()
    loss = max(0.0, -worst_diff)
    print(f"Summary: the largest thresholds uplink is 1/{worst_ratio:.2f} of float32 FedAvg's (target 1/"
          f"{TARGET_RATIO:g}: {'met' if worst_ratio >= TARGET_RATIO else 'NOT met'}); the largest accuracy loss "
          f"against floats in one run is {loss:.2f} points (target <= {TARGET_POINTS}: "
          f"{'met' if loss <= TARGET_POINTS else 'NOT met'}).")
    summary = Path(args.out) / "summary.json"
    summary.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
