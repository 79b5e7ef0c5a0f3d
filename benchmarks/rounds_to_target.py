"""Rounds until FedHyBNN is within 0.5 points of its centralized reference, every pair task.

Usage::

    python benchmarks/rounds_to_target.py [--tasks 0v1 2v3 4v5 6v7 8v9] [--partitions iid dirichlet]
        [--alpha 0.5] [--rounds 20] [--target-round 10] [--clients 3] [--seed 0]
        [--encoder artifacts/encoder-paper] [--data-root data] [--out runs/rounds-to-target]
        [--reuse] [--compare DIR] [-- EXTRA FEDERATE OPTIONS]

For every task and partition (IID, and Dirichlet with ``--alpha``) it runs ``hybnn federate``
once with the command's defaults and the options after ``--`` (each run is its own process;
``--reuse`` keeps a finished run's results.json, to resume an interrupted measurement).
The centralized reference is the one that run trains itself (``--centralized-epochs``,
by default rounds x local epochs, with the run's learning rate and batch size).

Reported per task and partition, from results.json:

* the centralized test accuracy and the global test accuracy at ``--target-round`` and at the
  last round;
* the first round whose global accuracy is at most 0.5 points below the centralized one, and
  the round from which every round is ("within from": a dip below puts it after the dip);
* ``met``: within from ``--target-round`` or sooner;
* the largest uplink record (bytes per client and round).

``--compare DIR`` reads the same runs from an earlier ``--out`` (say, the old defaults) and
adds their centralized accuracy, accuracy at the target round, round from which they stay
within, final accuracy and uplink, so a change of defaults is judged side by side. One seed decides little: a pair task's accuracy moves by 0.1 to 0.3 points between seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from federate_run import add_federation_options, federate

PARTITIONS = ("iid", "dirichlet")
WITHIN_POINTS = 0.5


def run_name(task: str, partition: str, seed: int) -> str:
    return f"{task}-{partition}-s{seed}"


def run(task: str, partition: str, args: argparse.Namespace) -> dict:
    """One ``hybnn federate`` run (or its earlier results with ``--reuse``); its results.json."""
    name = run_name(task, partition, args.seed)
    out = Path(args.out) / name
    arguments = ["--task", task, "--clients", str(args.clients), "--rounds", str(args.rounds),
                 "--partition", partition, "--encoder", str(args.encoder), "--data-root", str(args.data_root),
                 "--seed", str(args.seed), "--threads", "1"]
    if partition == "dirichlet":
        arguments += ["--alpha", str(args.alpha)]
    return federate([*arguments, *args.extra], name, out, Path(args.out) / f"{name}.log",
                    reuse=args.reuse, rounds=args.rounds)


def rounds_to_target(results: dict, target_round: int) -> dict:
    """The figures of one run: reference, accuracy at the target and last round, first round within."""
    central = results["centralized_acc"]
    accs = [r["test_acc"] for r in results["rounds"]]
    floor = central - WITHIN_POINTS / 100
    first = next((i + 1 for i, a in enumerate(accs) if a >= floor), None)
    below = [i + 1 for i, a in enumerate(accs) if a < floor]
    settled = None if not accs or accs[-1] < floor else (below[-1] + 1 if below else 1)
    at_target = accs[target_round - 1] if len(accs) >= target_round else None
    return {
        "centralized": central,
        "at_target": at_target,
        "final": accs[-1] if accs else None,
        "first": first,
        "settled": settled,
        "met": settled is not None and settled <= target_round,
        "uplink": max((c["uplink_bytes"] for r in results["rounds"] for c in r["clients"]), default=None),
    }


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_federation_options(parser, out="runs/rounds-to-target")
    parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=PARTITIONS)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--target-round", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", help="an earlier --out whose finished runs are shown alongside")
    parser.add_argument("extra", nargs="*", help="further hybnn federate options (after --)")
    args = parser.parse_args()
    if not 1 <= args.target_round <= args.rounds:
        parser.error("--target-round must be from 1 to --rounds")

    rows = []
    for partition in args.partitions:
        for task in args.tasks:
            figures = rounds_to_target(run(task, partition, args), args.target_round)
            before = None
            if args.compare:
                path = Path(args.compare) / run_name(task, partition, args.seed) / "results.json"
                if path.exists():
                    before = rounds_to_target(json.loads(path.read_text()), args.target_round)
            rows.append((task, partition, figures, before))

    t = args.target_round
    header = (f"| task | partition | centralized | acc at round {t} | first round within {WITHIN_POINTS:g} | within from "
              f"| met | acc at round {args.rounds} | uplink bytes |")
    if args.compare:
        header += (f" before: centralized | before: acc at round {t} | before: within from "
                   f"| before: acc at round {args.rounds} | before: uplink bytes |")
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for task, partition, f, before in rows:
        name = partition if partition == "iid" else f"dirichlet({args.alpha:g})"
        line = (f"| {task} | {name} | {_acc(f['centralized'])} | {_acc(f['at_target'])} | {f['first'] or '-'} "
                f"| {f['settled'] or '-'} | {'yes' if f['met'] else 'NO'} | {_acc(f['final'])} "
                f"| {f['uplink']} |")
        if args.compare:
            line += (f" {_acc(before['centralized'])} | {_acc(before['at_target'])} | {before['settled'] or '-'} "
                     f"| {_acc(before['final'])} | {before['uplink']} |" if before else " - | - | - | - | - |")
        print(line)
    met = sum(1 for _, _, f, _ in rows if f["met"])
    print(f"\nWithin {WITHIN_POINTS:g} points of the centralized reference by round {t} and after: "
          f"{met} of {len(rows)} runs.")


if __name__ == "__main__":
    main()
