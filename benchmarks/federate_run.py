"""One logged ``hybnn federate`` run for the benchmarks that compare federations side by side."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def federate(arguments: list[str], label: str, out: Path, log_path: Path) -> dict:
    """Run ``hybnn federate ARGUMENTS --out OUT``, its output in ``log_path``; its results.json.

    A run that fails ends the benchmark with the log's path: a comparison with a missing
    side would be no comparison.
    """
    command = [sys.executable, "-m", "simulation.cli", "federate", *arguments, "--out", str(out)]
    print(f"[{label}] {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"[{label}] hybnn federate exited with {status}; see {log_path}")
    print(f"[{label}] done in {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads((out / "results.json").read_text())
