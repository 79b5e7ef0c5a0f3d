"""benchmarks/secure_aggregation.py's uplink table runs at three clients and prints its ratios."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("secure_aggregation_bench",
                                                  REPO_ROOT / "benchmarks" / "secure_aggregation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_uplink_table_at_three_clients(tmp_path, mnist_root, capsys):
    bench = load_benchmark()
    assert bench.main(["--data-root", str(mnist_root), "--out", str(tmp_path), "--uplink-clients", "3",
                       "--uplink-tasks", "0v1", "--time-clients"]) == 0
    out = capsys.readouterr().out
    assert "secure_vs_plain_max=" in out and "flower_vs_ours_min=" in out
    row = json.loads((tmp_path / "secure_aggregation.json").read_text())["uplink"][0]
    assert row["n"] == 3 and set(row["stages"]) == {"keys", "shares", "masked", "unmask"}
    assert row["secure"] == sum(row["stages"].values()) > row["plain"] > 25_856 // 8
    # Flower's masked input alone carries 8 bytes per float parameter
    assert row["flower"]["masked"] > 8 * 25_856
