"""Stopping `hybnn federate` (Ctrl-C) and `hybnn deploy-local` (SIGTERM), keeping earlier results,
resuming, and a run that aggregated nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import fixed_encoder

REPO = Path(__file__).resolve().parents[1]
HYBNN = str(Path(sys.executable).parent / "hybnn")
EARLIER = {"status": "finished", "from": "an earlier run"}


def _federate_cmd(encoder: Path, data_root: Path, out: Path, *extra: str) -> list[str]:
    return [HYBNN, "federate", "--task", "0v1", "--clients", "2", "--local-epochs", "1",
            "--centralized-epochs", "1", "--encoder", str(encoder), "--data-root", str(data_root),
            "--out", str(out), *extra]


def _staged_rounds(out: Path) -> int:
    for server_json in out.glob(".run-*/server.json"):
        try:
            return len(json.loads(server_json.read_text()).get("rounds", []))
        except ValueError:  # pragma: no cover - written atomically, never half
            return 0
    return 0


def _alive(pid: int) -> bool:
    from simulation.runs import is_alive

    return is_alive(pid)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_stops_federate_keeps_the_rounds_and_resume_finishes(tmp_path, mnist_root):
    from simulation.runs import descendants

    encoder = fixed_encoder(tmp_path / "encoder")
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(EARLIER))
    cmd = _federate_cmd(encoder, mnist_root, out, "--rounds", "3")
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=REPO, env=env)
        deadline = time.monotonic() + 400
        while _staged_rounds(out) < 1:
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "no round completed"
            # Until the new run has a round of its own, the earlier results stay.
            assert json.loads((out / "results.json").read_text()) == EARLIER
            time.sleep(0.2)
        below = descendants(proc.pid)  # the simulation process, Ray's raylet, workers, ...
        assert below
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # a second Ctrl-C while it stops
        rc = proc.wait(timeout=30)
        took = time.monotonic() - sent
    err = (tmp_path / "stderr").read_text()
    assert rc == 130, err[-3000:]
    assert took <= 10.0, took
    assert "Traceback" not in err
    assert not [pid for pid in below if _alive(pid)], "processes of the run were left behind"
    stopped = json.loads((out / "results.json").read_text())
    assert stopped["status"] == "stopped"
    done = len(stopped["rounds"])
    assert 1 <= done < 3 and [r["round"] for r in stopped["rounds"]] == list(range(1, done + 1))
    assert not list(out.glob(".run-*"))

    proc = subprocess.run([*cmd, "--resume", str(out)], capture_output=True, text=True, timeout=400, cwd=REPO,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished = json.loads((out / "results.json").read_text())
    assert finished["status"] == "finished"
    assert [r["round"] for r in finished["rounds"]] == [1, 2, 3]
    assert finished["rounds"][:done] == stopped["rounds"]
    assert json.loads((out / "server.json").read_text())["resumed_after_rounds"] == [done]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_that_aggregated_nothing_fails_and_keeps_earlier_results(tmp_path, mnist_root):
    """Four clients that all fail their round: with seed 0 a failure rate of 0.99 fails each of them."""
    from client.client_app import injected_failure

    assert all(injected_failure(0.99, 0, 1, partition) for partition in range(4))
    encoder = fixed_encoder(tmp_path / "encoder")
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(EARLIER))
    cmd = _federate_cmd(encoder, mnist_root, out, "--rounds", "1", "--client-failure-rate", "0.99", "--seed", "0")
    cmd[cmd.index("--clients") + 1] = "4"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=380, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "aggregated nothing" in proc.stderr
    assert "injected failure" in proc.stderr and "(4 replies)" in proc.stderr
    assert json.loads((out / "results.json").read_text()) == EARLIER
    staged = list(out.glob(".run-*"))
    assert len(staged) == 1
    server = json.loads((staged[0] / "server.json").read_text())
    assert server["status"] == "failed" and "injected failure" in server["failure"]
    assert "ERROR" in (staged[0] / "logs" / "simulation.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_stops_deploy_local_and_every_process_it_started(tmp_path, mnist_root):
    from simulation.runs import descendants

    out = tmp_path / "run"
    cmd = [HYBNN, "deploy-local", "--task", "0v1", "--clients", "2", "--rounds", "5", "--local-epochs", "1",
           "--centralized-epochs", "1", "--encoder", str(fixed_encoder(tmp_path / "encoder")),
           "--data-root", str(mnist_root), "--out", str(out)]
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO)
        deadline = time.monotonic() + 300
        while _staged_rounds(out) < 1:
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "no round completed"
            time.sleep(0.2)
        below = descendants(proc.pid)  # SuperLink, SuperExec, ServerApp, SuperNodes, flwr run
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - sent
    err = (tmp_path / "stderr").read_text()
    assert rc == 130 and took <= 10.0, (rc, took, err[-3000:])
    assert "Traceback" not in err
    assert not [pid for pid in below if _alive(pid)], "processes of the run were left behind"
    stopped = json.loads((out / "results.json").read_text())
    assert stopped["status"] == "stopped" and len(stopped["rounds"]) >= 1
    assert (out / "checkpoint" / "state.json").exists() and (out / "logs" / "superlink.log").exists()
