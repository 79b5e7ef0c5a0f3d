"""A short FedHyBNN run on Flower's simulation engine (Ray), end to end through the CLI."""

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
def test_federate_two_clients_two_rounds(tmp_path, mnist_root):
    encoder = fixed_encoder(tmp_path / "encoder")
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "hybnn"), "federate", "--task", "0v1", "--clients", "2",
           "--rounds", "2", "--centralized-epochs", "1", "--encoder", str(encoder),
           "--data-root", str(mnist_root), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=REPO,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["rounds"]) == 2
    for r in results["rounds"]:
        assert 0.0 <= r["test_acc"] <= 1.0
        assert len(r["clients"]) == 2 and not r["dropped"]
        assert {c["reported"]["partition_id"] for c in r["clients"]} == {0, 1}
        assert r["uplink_bytes"] * 20 <= results["float_fedavg_uplink_bytes"]
        assert r["downlink_bytes"] > 0
    assert 0.0 <= results["centralized_acc"] <= 1.0
    assert results["config"]["aggregation"] == "vote"
    assert (out / "federated.png").stat().st_size > 0
    assert (out / "global" / "model.safetensors").exists()
    assert "first round within" in proc.stdout


def test_federate_refuses_a_missing_encoder(tmp_path):
    cmd = [str(Path(sys.executable).parent / "hybnn"), "federate", "--encoder", str(tmp_path / "none"),
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "hybnn federate: error:" in proc.stderr and "Traceback" not in proc.stderr
