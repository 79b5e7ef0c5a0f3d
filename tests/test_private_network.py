"""deploy-local's private network: no process but the operator's reaches the SuperLink.

The stranger test runs real processes: during a default `deploy-local` run, a process on the
same machine holding the deployment's public `ca.crt` (and a key pair of its own) tries to list
the runs, register its key, submit its own app bundle and join as a SuperNode. Each fails; the
same `flwr list` run inside the deployment's namespace succeeds (so the stranger's commands
are well-formed and the check can fail). The same run then goes on the host's loopback, where
the operator, with the run's own `flwr` connection, submits a foreign app bundle: every
SuperNode refuses it (its pinned SuperExec logs the run and both hashes, the foreign ServerApp
gets an error reply from each node, no foreign ClientApp runs), and the operator's run ends
with the same accuracy as the private one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from common.errors import HyBNNError
from simulation import netns

needs_root = pytest.mark.skipif(
    netns.can_unshare_here() is not None,
    reason=f"needs to create a network namespace here ({netns.can_unshare_here()})")


@needs_root
def test_a_port_in_the_private_network_is_unreachable_from_outside_and_back():
    outside = socket.socket()
    outside.bind(("127.0.0.1", 0))
    outside.listen()
    host_ns = os.readlink("/proc/thread-self/ns/net")
    with netns.PrivateNetwork():
        assert os.readlink("/proc/thread-self/ns/net") != host_ns
        # A child process started here is in the namespace too.
        child_ns = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True).stdout.strip()
        assert child_ns == os.readlink("/proc/thread-self/ns/net")
        inside = socket.socket()
        inside.bind(("127.0.0.1", 0))
        inside.listen()
        with socket.socket() as probe:  # loopback is up inside ...
            assert probe.connect_ex(inside.getsockname()) == 0
        with socket.socket() as probe:  # ... and the host's ports are not there
            assert probe.connect_ex(outside.getsockname()) != 0
    assert os.readlink("/proc/thread-self/ns/net") == host_ns
    with socket.socket() as probe:
        assert probe.connect_ex(inside.getsockname()) != 0
    inside.close()
    outside.close()


def test_an_unknown_network_is_refused():
    from simulation.deploy_local import check_network

    with pytest.raises(HyBNNError, match="--network must be one of private, host"):
        check_network("bridge")


def test_the_cli_offers_private_by_default(capsys):
    from simulation.cli import build_parser

    args = build_parser().parse_args(["deploy-local"])
    assert args.network == "private"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["deploy-local", "--network", "bridge"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_user_who_is_not_root_runs_again_in_namespaces_of_its_own(monkeypatch, capfd):
    """The re-run for a user who is not root: the same interpreter, the marker set, a network of
    its own; the exit status comes back. (Made to think it is not root; the wrapper works as root.)"""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare")
    monkeypatch.setattr(netns, "can_unshare_here", lambda: "not root (made up for the test)")
    monkeypatch.delenv(netns.REEXEC_MARKER, raising=False)
    host_ns = os.readlink("/proc/self/ns/net")
    script = ("import os, sys; print(os.readlink('/proc/self/ns/net'), os.environ.get(sys.argv[1])); "
              "sys.exit(7)")
    try:
        code = netns.reexec(["-c", script, netns.REEXEC_MARKER])
    except HyBNNError as exc:  # a kernel that refuses user namespaces: the message is the result
        assert "--network host" in str(exc)
        return
    out, err = capfd.readouterr()
    assert code == 7
    child_ns, marker = out.split()
    assert child_ns != host_ns and marker == "1"
    assert "Not root: running again" in err
    # Inside, the marker stops a second re-run.
    monkeypatch.setenv(netns.REEXEC_MARKER, "1")
    assert netns.reexec(["-c", "pass"]) is None


def _superlink_pid(port: int) -> int:
    """The pid of the flower-superlink process serving ``port``, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-superlink") for a in argv) and str(port).encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no flower-superlink process with port {port}")


FOREIGN_FEDERATED_APP = '''
import json
import time
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def train(msg, context):
    Path({client_marker!r}).write_text("a foreign ClientApp ran on a SuperNode")
    return Message(RecordDict(), reply_to=msg)


@server.main()
def main(grid, context):
    deadline = time.monotonic() + 120
    while len(nodes := sorted(grid.get_node_ids())) < {nodes} and time.monotonic() < deadline:
        time.sleep(1)
    replies = grid.send_and_receive(
        [Message(RecordDict(), dst_node_id=node, message_type="train") for node in nodes], timeout=120)
    Path({server_marker!r}).write_text(json.dumps(
        [[r.metadata.src_node_id, r.error.code if r.has_error() else None,
          r.error.reason if r.has_error() else ""] for r in replies]))
'''


def _foreign_federated_app(root: Path, client_marker: Path, server_marker: Path, nodes: int) -> Path:
    """An app bundle of someone else's: its ServerApp sends a train message to ``nodes`` nodes and
    writes their replies to ``server_marker``; its ClientApp would write ``client_marker``."""
    app = root / "foreign"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "foreign"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "someone"\n\n'
        '[tool.flwr.app.components]\nserverapp = "foreign_app:server"\nclientapp = "foreign_app:client"\n')
    (app / "foreign_app.py").write_text(FOREIGN_FEDERATED_APP.format(
        client_marker=str(client_marker), server_marker=str(server_marker), nodes=nodes))
    return app


def _in_background(config) -> tuple[threading.Thread, dict]:
    """deploy_local(config) in a thread; its results (or error) land in the returned dict."""
    from simulation.deploy_local import deploy_local

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["results"] = deploy_local(config)
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    return worker, outcome


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_local_stranger_with_the_ca_certificate_cannot_list_register_run_or_join(tmp_path, mnist_root):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from simulation.credentials import make_credentials
    from simulation.deploy_local import DeployConfig, _bin, deploy_local, write_cli_config
    from tests.conftest import fixed_encoder
    from tests.test_security import _env, _foreign_app

    if shutil.which("nsenter") is None:
        pytest.skip("needs util-linux's nsenter for the in-namespace control (apt-get install util-linux)")
    creds = make_credentials(tmp_path / "creds", supernodes=2)
    common = dict(task="0v1", clients=2, rounds=2, local_epochs=1, encoder=fixed_encoder(tmp_path / "encoder"),
                  data_root=mnist_root, centralized_epochs=1, node_wait_s=60.0, round_timeout_s=240.0,
                  timeout_s=420.0, progress=False, certs=creds.root)
    config = DeployConfig(**common, out=tmp_path / "run", log_dir=tmp_path / "logs")
    worker, outcome = _in_background(config)
    attempts: dict[str, subprocess.CompletedProcess] = {}
    stranger_node = None
    try:
        link_log = tmp_path / "logs" / "superlink.log"
        deadline = time.monotonic() + 200
        while not (tmp_path / "logs" / "supernode-1.log").exists():
            assert worker.is_alive() and time.monotonic() < deadline, f"the deployment did not start: {outcome}"
            time.sleep(0.5)
        port = int(re.search(r"--port (\d+)", link_log.read_text()).group(1))

        # The stranger: the public CA certificate, a key pair of its own, the port from a log line.
        home = tmp_path / "stranger-home"
        connection = write_cli_config(home, port, name="stranger", ca_cert=creds.ca_cert)
        env = _env(home)
        key = ec.generate_private_key(ec.SECP384R1())
        (tmp_path / "stranger.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (tmp_path / "stranger.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
        marker = tmp_path / "foreign-ran"
        flwr = _bin("flwr")
        commands = {
            "list": [flwr, "list", connection],
            "register": [flwr, "supernode", "register", str(tmp_path / "stranger.pub"), connection],
            "run": [flwr, "run", str(_foreign_app(tmp_path, marker)), connection],
        }
        for name, cmd in commands.items():
            attempts[name] = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        node_log = open(tmp_path / "stranger-node.log", "w")
        stranger_node = subprocess.Popen(
            [_bin("flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates",
             str(creds.ca_cert), "--auth-supernode-private-key", str(tmp_path / "stranger.key"),
             "--auth-supernode-public-key", str(tmp_path / "stranger.pub"), "--port", "0",
             "--node-config", "partition-id=0 num-partitions=2", "--max-retries", "3", "--max-wait-time", "20"],
            stdout=node_log, stderr=subprocess.STDOUT, env=env)
        node_log.close()

        # The control: the same `flwr list`, inside the deployment's network, reaches the SuperLink.
        inside = subprocess.run(["nsenter", f"--net=/proc/{_superlink_pid(port)}/ns/net", *commands["list"]],
                                capture_output=True, text=True, env=env, timeout=120)
    finally:
        worker.join(timeout=440)
        if stranger_node is not None:
            try:
                stranger_node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stranger_node.kill()
                stranger_node.wait()
    assert "error" not in outcome, outcome.get("error")
    assert inside.returncode == 0, inside.stdout + inside.stderr
    assert "running" in (inside.stdout + inside.stderr).lower()
    for name, done in attempts.items():
        text = done.stdout + done.stderr
        assert done.returncode != 0, (name, text)
        assert "Connection to the SuperLink is unavailable" in text, (name, text)
    assert not marker.exists()
    assert stranger_node.returncode != 0, (tmp_path / "stranger-node.log").read_text()
    results = outcome["results"]
    assert results["status"] == "finished"
    assert [len(r["clients"]) for r in results["rounds"]] == [2, 2]

    # On the host's loopback, the operator submits a foreign app bundle with the run's own connection.
    from simulation.app_bundle import PROJECT_ROOT, build_app_bundle, bundle_sha256

    pinned = bundle_sha256(build_app_bundle(PROJECT_ROOT, tmp_path / "bundle"))
    host_logs = tmp_path / "host-logs"
    worker, outcome = _in_background(DeployConfig(**common, out=tmp_path / "host", log_dir=host_logs,
                                                  network="host"))
    client_marker, server_marker = tmp_path / "foreign-client-ran", tmp_path / "foreign-replies.json"
    foreign = _foreign_federated_app(tmp_path / "operator", client_marker, server_marker, nodes=2)
    run_log = host_logs / "flwr-run.log"
    try:
        deadline = time.monotonic() + 200
        while not (run_log.exists() and "Starting logstream" in run_log.read_text()):
            assert worker.is_alive() and time.monotonic() < deadline, f"the deployment did not start: {outcome}"
            time.sleep(0.5)
        flwr_home = Path(re.search(r" run (\S+) hybnn-local ", run_log.read_text()).group(1)).parent / "flwr-home"
        submitted = subprocess.run([_bin("flwr"), "run", str(foreign), "hybnn-local"], capture_output=True,
                                   text=True, env=_env(flwr_home), timeout=120)  # the deployment's own connection
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        foreign_run = int(re.search(r"Successfully started run (\d+)", submitted.stdout + submitted.stderr).group(1))
        while not server_marker.exists():
            assert worker.is_alive(), f"the foreign ServerApp got no replies while the deployment ran: {outcome}"
            time.sleep(0.5)
    finally:
        worker.join(timeout=440)
    assert "error" not in outcome, outcome.get("error")
    replies = json.loads(server_marker.read_text())
    assert len(replies) == 2, replies
    foreign_sha256 = set()
    for node, code, reason in replies:
        assert code == 7 and pinned in reason, (node, code, reason)  # INVALID_FAB, naming the pin
        foreign_sha256.add(re.search(r"the run's bundle has sha256 ([0-9a-f]{64})", reason).group(1))
    (foreign_sha256,) = foreign_sha256
    assert foreign_sha256 != pinned
    for i in range(2):
        refusals = [line for line in (host_logs / f"superexec-{i}.log").read_text().splitlines()
                    if f"Refused run {foreign_run}:" in line]
        assert len(refusals) == 1, (i, refusals)
        assert foreign_sha256 in refusals[0] and pinned in refusals[0]
    assert not client_marker.exists()
    host = outcome["results"]
    assert host["status"] == "finished"
    assert [len(r["clients"]) for r in host["rounds"]] == [2, 2]
    # Neither the stranger nor the refused bundle changed anything: the same model in both runs.
    assert results["final_test_acc"] == host["final_test_acc"]
    assert [r["test_acc"] for r in results["rounds"]] == [r["test_acc"] for r in host["rounds"]]
