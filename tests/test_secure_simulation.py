"""Secure aggregation on Flower's Ray simulation, end to end through the CLI: the clients run in
Ray workers and keep their secrets in each node's Context between the stages of a round.
That a secure run equals its clear twin bit for bit is shown in process (test_secure_rounds.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import fixed_encoder

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_federate_with_secure_aggregation_sums_every_client_of_every_round(tmp_path, mnist_root):
    encoder = fixed_encoder(tmp_path / "encoder")
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "hybnn"), "federate", "--task", "0v1", "--clients", "3",
           "--rounds", "2", "--centralized-epochs", "1", "--encoder", str(encoder), "--data-root",
           str(mnist_root), "--out", str(out), "--secure-aggregation"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["secure_aggregation"]["enabled"] is True and results["secure_aggregation"]["bits"] == [6, 6, 14, 35]
    for r in results["rounds"]:
        assert r["secure"]["summed"] == 3 and not r["secure"]["skipped"]
        assert len(r["clients"]) == 3 and not r["dropped"]
        assert r["uplink_bytes"] == r["secure"]["uplink_bytes"] > 0
        assert all(set(c["reported"]) == {"num_examples", "partition_id"} for c in r["clients"])
    assert results["rounds"][-1]["test_acc"] > results["initial"]["test_acc"]
    assert "the server learned only sums, of 3 to 3 clients a round (0 round(s) skipped)" in proc.stdout
