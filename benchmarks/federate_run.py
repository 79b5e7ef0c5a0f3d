"""One logged ``hybnn federate`` run for the benchmarks that compare federations side by side."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


PAIR_TASKS = ("0v1", "2v3", "4v5", "6v7", "8v9")


def add_federation_options(parser: argparse.ArgumentParser, out: str) -> None:
    """The options every federation benchmark takes: tasks, rounds, clients, inputs, output."""
    parser.add_argument("--tasks", nargs="+", default=list(PAIR_TASKS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--encoder", default="artifacts/encoder-paper")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--out", default=out)
    parser.add_argument("--reuse", action="store_true", help="keep finished runs' results.json")


def federate(arguments: list[str], label: str, out: Path, log_path: Path, *,
             reuse: bool = False, rounds: int | None = None) -> dict:
    """Run ``hybnn federate ARGUMENTS --out OUT``, its output in ``log_path``; its results.json.

    With ``reuse``, an earlier run in ``out`` that finished all ``rounds`` is read instead.
    A run that fails ends the benchmark with the log's path: a comparison with a missing
    side would be no comparison.
    """
    results_path = out / "results.json"
    if reuse and results_path.exists():
        results = json.loads(results_path.read_text())
        if results.get("status") == "finished" and len(results.get("rounds", [])) == rounds:
            print(f"[{label}] reusing {results_path}", flush=True)
            return results
    command = [sys.executable, "-m", "simulation.cli", "federate", *arguments, "--out", str(out)]
    print(f"[{label}] {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"[{label}] hybnn federate exited with {status}; see {log_path}")
    print(f"[{label}] done in {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(results_path.read_text())
