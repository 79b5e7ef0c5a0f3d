"""A deployment strangers can't use: credentials, the Fleet-only TLS front, and the
refusals of real Flower processes (unregistered or plaintext SuperNodes, `flwr run`
through the exposed port, a SuperLink that never answers)."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import HyBNNError

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install -y "
                                 "--no-install-recommends nginx); the Fleet-only front tests need it")


# ------------------------------------------------------------------ hybnn certs
def test_certs_writes_the_fixed_layout_with_private_modes(tmp_path):
    from cryptography import x509
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    from simulation.cli import main

    out = tmp_path / "creds"
    assert main(["certs", "--out", str(out), "--host", "fl.example.org", "--host", "10.1.2.3",
                 "--supernodes", "2"]) == 0
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {"ca.crt", "ca.key", "server.pem", "server.key", "superexec.secret",
                     "supernodes/supernode-0", "supernodes/supernode-0.pub", "supernodes/supernode-0.secret",
                     "supernodes/supernode-1", "supernodes/supernode-1.pub", "supernodes/supernode-1.secret"}
    for private in ("ca.key", "server.key", "superexec.secret", "supernodes/supernode-0", "supernodes/supernode-1",
                    "supernodes/supernode-0.secret", "supernodes/supernode-1.secret"):
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o600, private
    secrets = [(out / name).read_bytes() for name in
               ("superexec.secret", "supernodes/supernode-0.secret", "supernodes/supernode-1.secret")]
    assert all(len(s) == 64 for s in secrets) and len(set(secrets)) == 3  # one of its own per machine

    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink", "fleet-front", "fl.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}

    # The exact loaders Flower 1.42 uses for `flwr supernode register` and `flower-supernode`.
    assert try_load_public_key(out / "supernodes" / "supernode-1.pub")
    keys = _try_setup_client_authentication(argparse.Namespace(
        auth_supernode_private_key=str(out / "supernodes" / "supernode-1"), auth_supernode_public_key=None))
    assert keys is not None


def test_certs_never_destroys_earlier_material(tmp_path, capsys):
    from simulation.cli import main
    from simulation.credentials import make_credentials

    out = tmp_path / "creds"
    make_credentials(out, supernodes=1)
    first_ca = (out / "ca.crt").read_bytes()
    assert main(["certs", "--out", str(out), "--supernodes", "1"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "ca.crt").read_bytes() == first_ca

    make_credentials(out, supernodes=1, force=True)
    assert (out / "ca.crt").read_bytes() != first_ca
    (backup,) = out.glob("replaced-*")
    assert (backup / "ca.crt").read_bytes() == first_ca
    assert (backup / "supernodes" / "supernode-0").is_file()


def test_certs_rejects_a_bad_host_and_missing_credentials_are_named(tmp_path):
    from simulation.credentials import Credentials, make_credentials

    with pytest.raises(HyBNNError, match="neither an IP address nor a DNS name"):
        make_credentials(tmp_path / "x", hosts=["bad host;"])
    assert not (tmp_path / "x").exists()
    make_credentials(tmp_path / "c", supernodes=1)
    with pytest.raises(HyBNNError, match="supernode-1"):
        Credentials(tmp_path / "c").check(supernodes=2)
    os.chmod(tmp_path / "c" / "server.key", 0o644)
    with pytest.raises(HyBNNError, match="readable by other users"):
        Credentials(tmp_path / "c").check(supernodes=1)


# ------------------------------------------------------------------ the Fleet-only front's config
def test_fleet_routes_match_the_installed_flower():
    """The front forwards exactly the Fleet API routes of the installed Flower."""
    from fastapi.routing import APIRoute
    from flwr.superlink.routers.fleet.router import router

    from simulation.credentials import FLEET_API_PREFIX, FLEET_API_ROUTES

    installed = {r.path for r in router.routes if isinstance(r, APIRoute)}
    assert installed == {FLEET_API_PREFIX + name for name in FLEET_API_ROUTES}


def test_fleet_front_config_refuses_injection(tmp_path):
    from simulation.credentials import fleet_front_config

    with pytest.raises(HyBNNError, match="upstream"):
        fleet_front_config(listen="0.0.0.0:9092", upstream="x; include /etc/passwd", certfile="a", keyfile="b",
                           upstream_ca_certfile="c")


@needs_nginx
def test_fleet_front_config_passes_nginx_syntax_check(tmp_path):
    from simulation.credentials import fleet_front_config, make_credentials

    creds = make_credentials(tmp_path / "creds", supernodes=0)
    state = tmp_path / "front"
    state.mkdir()
    conf = state / "nginx.conf"
    conf.write_text(fleet_front_config(listen="127.0.0.1:18443", upstream="127.0.0.1:9", certfile=creds.server_cert,
                                       keyfile=creds.server_key, upstream_ca_certfile=creds.ca_cert,
                                       state_dir=state, access_log=str(state / "access.log")))
    check = subprocess.run([NGINX, "-t", "-c", str(conf), "-e", str(state / "error.log")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


BLOCKED = [("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-node"),
           ("POST", "/v1/runtime/pull-messages"), ("GET", "/docs"), ("GET", "/health"),
           ("POST", "/v1/fleet/../control/start-run"), ("POST", "/v1/fleet/%2e%2e/control/start-run"),
           ("POST", "/v1/fleet/..%2fcontrol/start-run"), ("POST", "/v1/fleet/pull-messages/../../control/start-run"),
           ("POST", "/v1/fleet/pull-messages%2f..%2f..%2fcontrol%2fstart-run"), ("GET", "/v1/fleet/pull-messages"),
           ("POST", "/v1/fleet/unknown-route")]


@needs_nginx
@pytest.mark.timeout(60)
def test_front_forwards_only_the_fleet_routes(tmp_path):
    """A real nginx with the rendered config, its upstream down: Fleet routes are forwarded
    (502: nothing answers there), everything else is refused (403) without reaching it."""
    import http.client
    import ssl
    import time

    from simulation.credentials import FLEET_API_ROUTES, fleet_front_config, make_credentials
    from simulation.deploy_local import free_port

    creds = make_credentials(tmp_path / "creds", supernodes=0)
    state = tmp_path / "front"
    state.mkdir()
    port = free_port()
    (state / "nginx.conf").write_text(fleet_front_config(
        listen=f"127.0.0.1:{port}", upstream=f"127.0.0.1:{free_port()}", certfile=creds.server_cert,
        keyfile=creds.server_key, upstream_ca_certfile=creds.ca_cert, state_dir=state,
        access_log=str(state / "access.log")))
    front = subprocess.Popen([NGINX, "-c", str(state / "nginx.conf"), "-e", str(state / "error.log"),
                              "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        context = ssl.create_default_context(cafile=str(creds.ca_cert))

        def status(method: str, path: str) -> int:
            for _ in range(50):
                try:
                    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
                    conn.request(method, path, body=b"" if method == "POST" else None)
                    return conn.getresponse().status
                except ConnectionRefusedError:
                    time.sleep(0.1)
            pytest.fail(f"nginx did not listen on {port}: {(state / 'error.log').read_text()}")

        for method, path in BLOCKED:
            assert status(method, path) == 403, (method, path)
        for route in FLEET_API_ROUTES:
            assert status("POST", f"/v1/fleet/{route}") == 502, route
    finally:
        front.terminate()
        front.wait(timeout=10)


# ------------------------------------------------------------------ real processes
NODE_CONFIG = "partition-id=0 num-partitions=1"


def _env(flwr_home: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PYTHONUNBUFFERED": "1"})
    return env


def _run_node(cmd: list[str], env: dict, log: Path, timeout_s: float = 60) -> tuple[int, str]:
    """Run a SuperNode that is expected to give up; return its exit status and log."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            pytest.fail(f"the SuperNode did not give up within {timeout_s} s: {log.read_text()[-2000:]}")
    return code, log.read_text()


@pytest.fixture(scope="module")
def tls_superlink(tmp_path_factory):
    """A SuperLink on loopback with TLS and SuperNode authentication; supernode-0's key registered."""
    from simulation.deploy_local import Processes, free_port, register_supernodes, superlink_command, wait_for_port
    from simulation.deploy_local import write_cli_config
    from simulation.credentials import make_credentials

    root = tmp_path_factory.mktemp("tls-superlink")
    creds = make_credentials(root / "creds", supernodes=2)
    env = _env(root / "flwr-home")
    procs = Processes(root)
    try:
        port = free_port()
        link = procs.start("superlink", superlink_command(port, creds), env)
        wait_for_port(port, link, "SuperLink")
        connection = write_cli_config(root / "flwr-home", port, ca_cert=creds.ca_cert)
        register_supernodes(creds, 1, connection, env, root)  # supernode-0 only
        yield creds, port, env, root
    finally:
        procs.stop_all()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_registered_supernode_joins_and_unregistered_one_is_refused(tls_superlink):
    from simulation.deploy_local import Processes, free_port, supernode_command

    creds, port, env, root = tls_superlink
    procs = Processes(root)
    try:  # the registered key is admitted: the refusal below is about the key, not the setup
        procs.start("supernode-0", supernode_command(port, free_port(), NODE_CONFIG, creds, index=0), env)
        log0 = root / "supernode-0.log"
        for _ in range(100):
            if "SuperNode ID:" in log0.read_text():
                break
            __import__("time").sleep(0.3)
        else:
            pytest.fail(f"the registered SuperNode did not join: {log0.read_text()[-2000:]}")
    finally:
        procs.stop_all()

    code, log = _run_node(supernode_command(port, free_port(), NODE_CONFIG, creds, index=1, max_retries=1,
                                            max_wait_time_s=10), env, root / "supernode-1.log")
    assert code != 0
    assert "Failed to activate SuperNode" in log


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_plaintext_supernode_is_refused_by_the_tls_superlink(tls_superlink):
    from simulation.deploy_local import free_port, supernode_command

    _, port, env, root = tls_superlink
    code, log = _run_node(supernode_command(port, free_port(), NODE_CONFIG, None, max_retries=1, max_wait_time_s=10),
                          env, root / "plaintext.log")
    assert code != 0
    assert "could not establish a connection to the SuperLink" in log
    assert "SuperNode ID:" not in log


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_supernode_gives_up_when_the_superlink_never_answers(tmp_path):
    from simulation.credentials import make_credentials
    from simulation.deploy_local import free_port, supernode_command

    creds = make_credentials(tmp_path / "creds", supernodes=1)
    silent = free_port()  # nothing listens there
    code, log = _run_node(supernode_command(silent, free_port(), NODE_CONFIG, creds, max_retries=2, max_wait_time_s=10),
                          _env(tmp_path / "flwr-home"), tmp_path / "node.log", timeout_s=45)
    assert code != 0
    assert "Giving up reconnection" in log
    assert "could not establish a connection to the SuperLink" in log


FOREIGN_APP = '''
from pathlib import Path
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    Path({marker!r}).write_text("a stranger's ServerApp ran on the server host")
'''


def _foreign_app(root: Path, marker: Path) -> Path:
    app = root / "foreign"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "foreign"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "stranger"\n\n'
        '[tool.flwr.app.components]\nserverapp = "foreign_app:server"\nclientapp = "foreign_app:client"\n')
    (app / "foreign_app.py").write_text(FOREIGN_APP.format(marker=str(marker)))
    return app


@needs_nginx
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_front_refuses_flwr_run_while_supernodes_train_through_it(tmp_path, mnist_root):
    """deploy-local with the Fleet-only front: SuperNodes train through it; a stranger who reaches
    only the front can neither start a run, nor register a key, nor reach the Runtime API."""
    import re
    import ssl
    import threading
    import time
    import http.client

    from simulation.credentials import make_credentials
    from simulation.deploy_local import DeployConfig, _bin, deploy_local, write_cli_config
    from tests.conftest import fixed_encoder

    creds = make_credentials(tmp_path / "creds", supernodes=2)
    config = DeployConfig(
        task="0v1", clients=2, rounds=2, encoder=fixed_encoder(tmp_path / "encoder"), data_root=mnist_root,
        out=tmp_path / "run", centralized_epochs=1, node_wait_s=60.0, round_timeout_s=240.0, timeout_s=500.0,
        progress=False, certs=creds.root, fleet_front=True, log_dir=tmp_path / "logs",
        # On the host's loopback, so that this test's stranger reaches the front as one on the network would.
        network="host")
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["results"] = deploy_local(config)
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    try:
        front_dir = tmp_path / "logs" / "fleet-front"  # the live front's, not the published copy
        access_log = front_dir / "access.log"
        deadline = time.monotonic() + 150
        while not (access_log.exists() and "/v1/fleet/pull-messages" in access_log.read_text()):
            assert worker.is_alive() and time.monotonic() < deadline, f"no SuperNode reached the front: {outcome}"
            time.sleep(0.5)
        port = int(re.search(r"listen 127\.0\.0\.1:(\d+) ssl;", (front_dir / "nginx.conf").read_text()).group(1))

        # A stranger who reaches only the front, with the CA certificate (public) in hand.
        marker = tmp_path / "foreign-ran"
        home = tmp_path / "stranger-home"
        connection = write_cli_config(home, port, name="front", ca_cert=creds.ca_cert)
        env = _env(home)
        submit = subprocess.run([_bin("flwr"), "run",
                                 str(_foreign_app(tmp_path, marker)), connection],
                                capture_output=True, text=True, env=env, timeout=60)
        assert submit.returncode != 0
        assert "403" in submit.stdout + submit.stderr
        register = subprocess.run([_bin("flwr"), "supernode", "register",
                                   str(creds.supernode_public_key(1)), connection],
                                  capture_output=True, text=True, env=env, timeout=60)
        assert register.returncode != 0
        context = ssl.create_default_context(cafile=str(creds.ca_cert))
        for method, path in BLOCKED:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
            conn.request(method, path, body=b"" if method == "POST" else None,
                         headers={"Content-Type": "application/protobuf"})
            status = conn.getresponse().status
            conn.close()
            assert status == 403, (method, path, status)
    finally:
        worker.join(timeout=540)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["results"]["status"] == "finished"
    assert [len(r["clients"]) for r in outcome["results"]["rounds"]] == [2, 2]
    assert not marker.exists()
    log = access_log.read_text()
    assert '"POST /v1/fleet/push-messages HTTP/1.1" 200' in log
    assert '"POST /v1/control/start-run HTTP/1.1" 403' in log


def test_insecure_is_explicit_and_says_what_it_exposes(tmp_path, capsys):
    from simulation.deploy_local import DeployConfig, _deployment_credentials, superlink_command, supernode_command

    assert _deployment_credentials(DeployConfig(insecure=True), tmp_path) is None
    assert "submit a ServerApp" in capsys.readouterr().err
    with pytest.raises(HyBNNError, match="cannot be combined"):
        _deployment_credentials(DeployConfig(insecure=True, fleet_front=True), tmp_path)
    secure = _deployment_credentials(DeployConfig(clients=2), tmp_path)  # the default: fresh credentials
    assert secure is not None and secure.supernode_key(1).is_file()
    assert "--insecure" not in superlink_command(9093, secure)
    assert "--insecure" not in supernode_command(9092, 9094, NODE_CONFIG, secure, index=1)
