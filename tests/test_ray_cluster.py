"""``hybnn federate --ray-address``: the simulation joins a running Ray cluster.

The cluster is real: a head node and a second node, both ``ray start`` processes on
loopback with one CPU each, so that the simulated clients must run on both nodes.
Every Ray process a test starts is in a process group of its own and is stopped at the
end (``ray stop`` would also stop the Ray instances of other runs on this machine).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from tests.conftest import fixed_encoder

from common.errors import HyBNNError
from simulation.ray_cluster import check_ray_cluster, parse_ray_address

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 100 * 1024 * 1024
"""Ray's object store: the default is 30% of the memory; the simulation needs a few MB."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_node(args: list[str], log: Path) -> subprocess.Popen:
    """``ray start ... --block``: the node's processes live as long as this one, in its own group."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus", "1",
                                 "--object-store-memory", str(OBJECT_STORE_BYTES), "--node-ip-address",
                                 "127.0.0.1", "--dashboard-agent-listen-port", str(_free_port()),
                                 "--metrics-export-port", str(_free_port()), "--disable-usage-stats", *args],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` and every process of its group."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The group may outlive its leader for a moment (raylet, GCS, workers).
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _wait_for_nodes(address: str, nodes: int, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + 120
    seen = None
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                pytest.fail(f"ray start ended ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            seen = check_ray_cluster(address, timeout_s=2)
            if seen.nodes >= nodes:
                return
        except HyBNNError as exc:
            seen = exc
        time.sleep(1)
    pytest.fail(f"the Ray cluster at {address} did not get {nodes} nodes within 120 s: {seen}")


@pytest.fixture
def two_node_cluster():
    """A Ray head node and one more node on loopback, one CPU each: ``(address, temp_dir)``."""
    # Ray's socket paths must stay short: a folder directly under /tmp.
    temp_dir = Path(tempfile.mkdtemp(prefix="hybnn-ray-", dir="/tmp"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    logs = [temp_dir / "head.log", temp_dir / "node.log"]
    procs = []
    try:
        procs.append(_ray_node(["--head", "--port", str(port), "--temp-dir", str(temp_dir / "ray"),
                                "--ray-client-server-port", str(_free_port()), "--include-dashboard", "false"],
                               logs[0]))
        _wait_for_nodes(address, 1, procs, logs)
        procs.append(_ray_node(["--address", address], logs[1]))
        _wait_for_nodes(address, 2, procs, logs)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _client_runs_by_node(address: str) -> Counter:
    """How many ``ClientAppActor.run`` tasks (one per simulated client and round) each Ray node ran,
    from the GCS's task events (the state API without the dashboard)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = gcs_service_pb2_grpc.TaskInfoGcsServiceStub(channel).GetTaskEvents(
            gcs_service_pb2.GetTaskEventsRequest(), timeout=10)
    return Counter(event.state_updates.node_id.hex() for event in reply.events_by_task
                   if event.task_info.name == "ClientAppActor.run" and event.state_updates.node_id)


@pytest.mark.slow
def test_federate_joins_a_two_node_ray_cluster(tmp_path, mnist_root, two_node_cluster):
    address = two_node_cluster
    cluster = check_ray_cluster(address)
    assert (cluster.nodes, cluster.cpus) == (2, 2.0)
    encoder = fixed_encoder(tmp_path / "encoder")
    out = tmp_path / "run"
    cmd = [str(BIN / "hybnn"), "federate", "--ray-address", address, "--task", "0v1", "--clients", "4",
           "--rounds", "1", "--centralized-epochs", "1", "--encoder", str(encoder),
           "--data-root", str(mnist_root), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=REPO,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Ray cluster at {address}: 2 node(s), 2 CPU(s)" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["ray_address"] == address
    (round_1,) = results["rounds"]
    assert {c["reported"]["partition_id"] for c in round_1["clients"]} == {0, 1, 2, 3}
    assert not round_1["dropped"]
    # Each node has one CPU, so each holds one of the two ClientApp actors; both ran clients.
    # ClientApp calls: the 4 clients' training and the queries the ServerApp sends before round 1.
    queries = int(re.search(r"Simulated clients ready after [\d.]+ s \(\d+ of (\d+) workers answered\)",
                            proc.stdout).group(1))
    # Task events reach the GCS about once a second: give them a few seconds.
    deadline = time.monotonic() + 15
    while True:
        runs = _client_runs_by_node(address)
        if sum(runs.values()) >= 4 + queries or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sum(runs.values()) == 4 + queries, runs
    assert len(runs) == 2, f"the clients ran on {len(runs)} node(s) only: {runs}"


def test_federate_refuses_an_unreachable_ray_address(tmp_path):
    address = f"127.0.0.1:{_free_port()}"  # bound and closed again: nothing listens there
    cmd = [str(BIN / "hybnn"), "federate", "--ray-address", address, "--encoder", str(tmp_path / "none"),
           "--out", str(tmp_path / "run")]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert f"The Ray cluster at {address} does not answer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 30
    assert not (tmp_path / "run").exists()


def test_a_port_that_is_no_ray_gcs_is_refused_in_seconds():
    """A peer that accepts the connection but never answers: refused after the GCS call's timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(HyBNNError, match="answers, but not as a Ray cluster's GCS"):
            check_ray_cluster(address, timeout_s=2)
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("address, message", [
    ("ray://10.0.0.5:10001", "Ray Client"),
    ("http://10.0.0.5:6379", "has a scheme"),
    ("10.0.0.5", "has no port"),
    (":6379", "has no host"),
    ("10.0.0.5:0", "not a number from 1 to 65535"),
    ("10.0.0.5:65536", "not a number from 1 to 65535"),
    ("10.0.0.5:63x", "not a number from 1 to 65535"),
    ("fd00::2:6379", "in brackets"),
    ("[not-ipv6]:6379", "not an IPv6 address"),
    ("bad host:6379", "not a host name or IP address"),
    ("", "is empty"),
])
def test_a_ray_address_of_the_wrong_form_is_refused(address, message):
    with pytest.raises(HyBNNError, match=message):
        parse_ray_address(address)


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379)),
    ("head.cluster.example:6379", ("head.cluster.example", 6379)),
    ("[fd00::2]:6379", ("fd00::2", 6379)),
])
def test_a_ray_address_of_the_right_form_is_read(address, expected):
    assert parse_ray_address(address) == expected


def test_a_wrong_ray_address_fails_before_anything_runs(tmp_path):
    """The CLI refuses a malformed address with exit status 2 and no traceback, before the encoder is read."""
    cmd = [str(BIN / "hybnn"), "federate", "--ray-address", "ray://head:10001", "--encoder",
           str(tmp_path / "none"), "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "hybnn federate: error: --ray-address 'ray://head:10001'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_worker_gives_up_when_ray_does_not_join():
    """The simulation worker's watchdog: no ``ray.init`` within the limit ends the process, with a message."""
    code = ("import time\nfrom simulation.ray_cluster import exit_unless_joined\n"
            "exit_unless_joined('10.0.0.5:6379', timeout_s=1)\ntime.sleep(60)\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 3
    assert "could not join the Ray cluster at 10.0.0.5:6379 within 1 s" in proc.stderr
    assert time.monotonic() - started < 30
