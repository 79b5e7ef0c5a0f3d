"""What TLS and SuperNode authentication cost a deployment: ``hybnn deploy-local`` with
``--insecure`` against the secure default, alternating, in one run.

Usage::

    .venv/bin/python benchmarks/deploy_security.py [--repeats 2] [--clients 3] [--rounds 3]
        [--task 0v1] [--encoder artifacts/encoder] [--data-root data] [--fleet-front]
        [--out runs/deploy-security]

Each repeat runs the variants one after the other, in the same order, each as its own
``hybnn deploy-local`` process with the same seed and options (``--centralized-epochs 1``
keeps the centralized reference, which both variants compute alike, short):

* ``insecure``: plaintext HTTP, any SuperNode may join;
* ``secure``: the default: fresh credentials, TLS, each SuperNode's key registered;
* ``secure+front`` (with ``--fleet-front``; needs nginx): the SuperNodes go through the
  Fleet-only TLS front, as on a real deployment.

Reported: each run's wall time (the whole command) and the run's own ``seconds``
from results.json; the medians per variant and their ratios to ``insecure``. Target:
secure within 20 % of insecure (ratio <= 1.20). Exit status 1 when a run fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_RATIO = 1.20


def run_once(variant: str, index: int, args: argparse.Namespace) -> dict:
    out = Path(args.out) / f"{variant.replace('+', '-')}-{index}"
    cmd = [sys.executable, "-m", "simulation.cli", "deploy-local", "--task", args.task,
           "--clients", str(args.clients), "--rounds", str(args.rounds), "--centralized-epochs", "1",
           "--encoder", str(args.encoder), "--data-root", str(args.data_root), "--out", str(out),
           "--seed", "0"]
    if variant == "insecure":
        cmd.append("--insecure")
    elif variant == "secure+front":
        cmd.append("--fleet-front")
    print("$ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"{variant} run {index} failed with status {done.returncode}")
    results = json.loads((out / "results.json").read_text())
    row = {"variant": variant, "repeat": index, "command_s": seconds,
           "run_wall_s": results.get("seconds"), "final_acc": results["rounds"][-1].get("test_acc")}
    print(f"  {variant:13s} repeat {index}: command {seconds:6.1f} s, run {row['run_wall_s']} s, "
          f"final accuracy {row['final_acc']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--task", default="0v1")
    parser.add_argument("--encoder", type=Path, default=Path("artifacts/encoder"))
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--fleet-front", action="store_true", help="also measure secure+front (needs nginx)")
    parser.add_argument("--out", type=Path, default=Path("runs/deploy-security"))
    args = parser.parse_args()

    variants = ["insecure", "secure"] + (["secure+front"] if args.fleet_front else [])
    rows = [run_once(v, i, args) for i in range(args.repeats) for v in variants]
    medians = {v: {key: statistics.median(r[key] for r in rows if r["variant"] == v and r[key] is not None)
                   for key in ("command_s", "run_wall_s")} for v in variants}
    print(f"\nmedian of {args.repeats} ({args.clients} clients, {args.rounds} rounds, task {args.task}):")
    base = medians["insecure"]
    for v in variants:
        m = medians[v]
        print(f"  {v:13s} command {m['command_s']:6.1f} s (x{m['command_s'] / base['command_s']:.3f})   "
              f"run {m['run_wall_s']:6.1f} s (x{m['run_wall_s'] / base['run_wall_s']:.3f})")
    ratio = medians["secure"]["command_s"] / base["command_s"]
    verdict = "within" if ratio <= TARGET_RATIO else "NOT within"
    print(f"secure / insecure wall time: {ratio:.3f} ({verdict} the {TARGET_RATIO:.2f} target)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "deploy_security.json").write_text(json.dumps({"runs": rows, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
