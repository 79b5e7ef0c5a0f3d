"""What a run leaves in its --out folder when it stops or fails before its first round (no processes)."""

from __future__ import annotations

import json
import time

import pytest

from common.errors import HyBNNError


def _unfinished_staging(out, server: dict):
    from simulation import runs

    staging = runs.staging_dir(out)
    (staging / "logs").mkdir()
    (staging / "logs" / "simulation.log").write_text("round 1 ...\n")
    (staging / "server.json").write_text(json.dumps(server))
    return staging


def test_a_run_stopped_before_its_first_round_leaves_no_staging_folder(tmp_path):
    from simulation.federate import finish_run

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    staging = _unfinished_staging(out, {"status": "running", "rounds": []})
    with pytest.raises(KeyboardInterrupt):
        finish_run(staging / "server.json", staging, out, {}, {}, time.perf_counter(), True, None, 3)
    # "nothing written": no .run-* folder piles up with each stopped attempt; earlier results kept.
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert json.loads((out / "results.json").read_text()) == {"earlier": True}


def test_a_run_that_aggregated_nothing_keeps_its_logs_where_the_error_says(tmp_path):
    from simulation.federate import finish_run

    out = tmp_path / "out"
    staging = _unfinished_staging(out, {"status": "failed", "rounds": [{"round": 1, "clients": [], "dropped": [
        {"node_id": 1, "reason": "malformed: bad"}]}]})
    with pytest.raises(HyBNNError, match=str(staging)):
        finish_run(staging / "server.json", staging, out, {}, {}, time.perf_counter(), False, None, 3)
    assert (staging / "logs" / "simulation.log").exists()
