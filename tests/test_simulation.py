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


RAY_ERROR_LOG = (
    "\x1b[92mINFO \x1b[0m:      configure_train: sampled 2 nodes (out of 2)\n"
    "\x1b[91mERROR \x1b[0m:     An exception was raised when processing a message by RayBackend\n"
    "\x1b[91mERROR \x1b[0m:     \x1b[36mray::ClientAppActor.run()\x1b[39m (pid=11947, ip=192.0.2.2, actor_id=2b)\n"
    '  File "/venv/flwr/clientapp/client_app.py", line 161, in __call__\n'
    "    return self._registered_funcs[full_name](message, context)\n"
    "ValueError: boom\n"
    "\n"
    "The above exception was the direct cause of the following exception:\n"
    "\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=11947, ip=192.0.2.2, actor_id=2b)\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: boom\n"
    "\x1b[91mERROR \x1b[0m:     Traceback (most recent call last):\n"
    '  File "/venv/flwr/server/superlink/fleet/vce/vce_api.py", line 132, in worker\n'
    "ray.exceptions.RayTaskError(ClientAppException): boom\n"
    "\x1b[93mWARNING \x1b[0m:   Round 1: the reply of node 7 is left out of this round: error code 2: ...\n"
    "\x1b[36m(ClientAppActor pid=10361)\x1b[0m client partition 1/2 refused the round: injected failure\n"
    "Traceback (most recent call last):\n"
    '  File "<frozen runpy>", line 198, in _run_module_as_main\n'
    "common.errors.HyBNNError: The run aggregated nothing\n"
    "FedHyBNN stopped: The run aggregated nothing\n"
)


def test_the_terminal_echo_of_the_simulation_log_leaves_out_tracebacks_and_colours(tmp_path):
    from simulation.federate import LogEcho

    echo = LogEcho(tmp_path / "logs" / "simulation.log", keep_colours=False)
    half = len(RAY_ERROR_LOG) // 2  # chunks end anywhere, mid-line too
    shown = echo.lines(RAY_ERROR_LOG[:half]) + echo.lines(RAY_ERROR_LOG[half:])
    text = "\n".join(shown)
    assert "Traceback" not in text and 'File "' not in text and "ray::" not in text and "\x1b" not in text
    assert text.count(f"(a traceback went to {tmp_path / 'logs' / 'simulation.log'}; it is not shown here)") == 1
    assert "INFO :      configure_train: sampled 2 nodes (out of 2)" in shown
    assert "WARNING :   Round 1: the reply of node 7 is left out of this round: error code 2: ..." in shown
    assert "(ClientAppActor pid=10361) client partition 1/2 refused the round: injected failure" in shown
    assert shown[-1] == "FedHyBNN stopped: The run aggregated nothing"
    coloured = LogEcho(tmp_path / "log", keep_colours=True).lines(RAY_ERROR_LOG)
    assert coloured[0].startswith("\x1b[92mINFO")


def test_a_client_exception_wrapped_by_ray_is_one_line_without_colours():
    from common.federated.robust import error_summary, printable

    reason = "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'" + RAY_ERROR_LOG.split("ERROR \x1b[0m:     ", 2)[2]
    summary = printable(error_summary(reason))
    assert summary == "ValueError: boom (its traceback is in the client's log)"
    assert error_summary("client partition 0/3 refused the round: no encoder") == \
        "client partition 0/3 refused the round: no encoder"


@pytest.mark.slow
def test_failing_clients_show_no_traceback_and_name_the_log(tmp_path, mnist_root):
    encoder = fixed_encoder(tmp_path / "encoder")
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "hybnn"), "federate", "--task", "0v1", "--clients", "2",
           "--rounds", "1", "--centralized-epochs", "1", "--client-failure-rate", "0.999",
           "--encoder", str(encoder), "--data-root", str(mnist_root), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=REPO)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    terminal = proc.stdout + proc.stderr
    assert "Traceback" not in terminal and 'File "' not in terminal and "\x1b[" not in terminal, terminal[-4000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("hybnn federate: error:")]
    assert "The run aggregated nothing" in error and "injected failure" in error
    (log,) = out.glob(".run-*/logs/simulation.log")
    assert str(log) in error
    assert "FedHyBNN stopped: The run aggregated nothing" in log.read_text()


@pytest.mark.slow
def test_federate_takes_paths_with_spaces_quotes_equals_and_newlines(tmp_path, mnist_root):
    """The run config reaches the simulated apps as values, never as Flower's key=value text, so any
    path the file system allows works for --encoder, --data-root and --out."""
    odd = tmp_path / "a b'\"=ü\nc"
    data_root = odd / "data root=1"
    data_root.mkdir(parents=True)
    (data_root / "MNIST").symlink_to((mnist_root / "MNIST").resolve())
    encoder = fixed_encoder(odd / "enc 'x'")
    out = odd / 'out "1"'
    cmd = [str(Path(sys.executable).parent / "hybnn"), "federate", "--task", "0v1", "--clients", "2",
           "--rounds", "1", "--centralized-epochs", "1", "--encoder", str(encoder),
           "--data-root", str(data_root), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["rounds"]) == 1 and len(results["rounds"][0]["clients"]) == 2
    assert results["config"]["out"] == str(out) and results["config"]["data_root"] == str(data_root)
    assert (out / "global" / "model.safetensors").exists()


def test_results_json_keeps_the_secure_record_of_each_round():
    """summarize() carries the ServerApp's secure-aggregation record of a round and of the run."""
    from simulation.federate import summarize

    secure = {"clients": 3, "threshold": 2, "neighbours": 2, "bits": [6, 6, 14, 35], "summed": 3,
              "uplink_bytes": 21357, "dropped": {"keys": [], "shares": [], "masked": [], "unmask": []},
              "skipped": None}
    server = {"rounds": [{"round": 1, "test_acc": 0.9, "test_loss": 0.3, "uplink_bytes": 0, "downlink_bytes": 1,
                          "clients": [], "dropped": [], "seconds": 1.5, "secure": secure}],
              "secure_aggregation": {"enabled": True, "mode": "on"}, "status": "finished"}
    results = summarize(server, {}, {}, 2.0)
    assert results["rounds"][0]["secure"] == secure
    assert results["secure_aggregation"] == {"enabled": True, "mode": "on"}
    plain = summarize({"rounds": [{k: v for k, v in server["rounds"][0].items() if k != "secure"}]}, {}, {}, 2.0)
    assert "secure" not in plain["rounds"][0] and "secure_aggregation" not in plain
