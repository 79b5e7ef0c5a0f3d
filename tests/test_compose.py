"""docker-compose.yml and the Dockerfile, checked statically (no container engine).

It parses; images are pinned to Flower 1.42.0; every Flower service's command parses
with the installed Flower CLI's own argument parser; nothing runs insecure; only the
Fleet-only front is published (the SuperLink not even on the host's loopback) and the
SuperNodes cannot reach the SuperLink except through it; the operator's `flwr` CLI is a
service under a profile, on the SuperLink's network only, whose connection is the
SuperLink's port with the deployment's CA; each SuperNode runs in process isolation
beside a SuperExec pinned to the app bundle's sha256 (read-only), the two sharing a
secret no other service holds, both on the SuperNodes' network alone (a container on
two podman networks does not always resolve the names of both), and the ClientApps' encoder
and data are on the SuperExec; the front's nginx config is the one
simulation/credentials.py renders; and the flags that deploy-local's real processes
use are the ones the containers use. `make container-test` builds and runs it all.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FLWR = "1.42.0"
SUPERNODES = [f"supernode-{i}" for i in range(3)]
EXECS = [f"{node}-exec" for node in SUPERNODES]
"""Each SuperNode's pinned SuperExec (client/pinned_superexec.py), where its ClientApps run."""
FLOWER_SERVICES = ["superlink", "superexec-serverapp", *SUPERNODES, *EXECS]
PINNED_SUPEREXEC = ["python", "-m", "client.pinned_superexec"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def args_of(service: dict) -> list[str]:
    return [str(a) for a in service["command"]]


def superexec_args(service: dict) -> list[str]:
    """A pinned SuperExec's arguments without its own ``--app-sha256 X``: flower-superexec's."""
    args = args_of(service)
    if service.get("entrypoint") == PINNED_SUPEREXEC:
        i = args.index("--app-sha256")
        args = args[:i] + args[i + 2:]
    return args


def flag_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def mounts(service: dict) -> dict[str, str]:
    """Container path -> host path (defaults of ``${VAR:-default}`` filled in), read-only marked ``:ro``."""
    out = {}
    for volume in service.get("volumes", []):
        volume = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", volume)
        host, container, *mode = volume.split(":")
        out[container + (":ro" if mode == ["ro"] else "")] = host
    return out


def parser_for(service: dict):
    """The installed Flower parser of the executable a service runs."""
    image = service["image"]
    if image.startswith("flwr/superlink"):
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

        return _parse_args_run_superlink()
    if "supernode" in image:
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

        return _parse_args_run_supernode()
    if "superexec" in image:
        from flwr.supercore.cli.flower_superexec import _parse_args

        return _parse_args()
    raise AssertionError(f"unexpected image {image}")


def test_services_and_pinned_images(compose):
    services = compose["services"]
    assert set(services) == {*FLOWER_SERVICES, "fleet-front", "operator"}
    for name in EXECS:  # the project's image: the pinned SuperExec is its code
        assert services[name]["image"] == f"hybnn-superexec:{FLWR}"
        assert services[name]["build"]["target"] == "superexec"
    assert services["superlink"]["image"] == f"flwr/superlink:{FLWR}"
    for name in FLOWER_SERVICES:
        assert services[name]["image"].endswith(f":{FLWR}"), name
    assert services["fleet-front"]["image"].startswith("nginx:")
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={FLWR}" in dockerfile
    # torch and the project are installed once; the superexec target reuses that stage
    assert re.findall(r"^FROM (\S+) AS (\S+)", dockerfile, re.M) == [
        ("flwr/supernode:${FLWR_VERSION}", "supernode"), ("supernode", "superexec"), ("supernode", "operator")]
    assert services["operator"]["image"] == f"hybnn-operator:{FLWR}"
    assert services["operator"]["build"]["target"] == "operator"
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile


def test_every_command_parses_with_the_installed_flower(compose):
    for name in FLOWER_SERVICES:
        service = compose["services"][name]
        parser_for(service).parse_args(superexec_args(service))  # SystemExit on an unknown flag or bad value


def test_nothing_runs_insecure(compose):
    services = compose["services"]
    for name in FLOWER_SERVICES:
        if name not in EXECS:  # a pinned SuperExec's plaintext is its SuperNode's Runtime API
            assert "--insecure" not in args_of(services[name]), name
    link = args_of(services["superlink"])
    for flag, path in (("--ssl-ca-certfile", "/certs/ca.crt"), ("--ssl-certfile", "/certs/server.pem"),
                       ("--ssl-keyfile", "/certs/server.key"),
                       ("--superexec-auth-secret-file", "/certs/superexec.secret")):
        assert flag_value(link, flag) == path
        assert f"{path}:ro" in mounts(services["superlink"])
    assert "--enable-supernode-auth" in link
    superexec = args_of(services["superexec-serverapp"])
    assert flag_value(superexec, "--root-certificates") == "/certs/ca.crt"
    assert flag_value(superexec, "--superexec-auth-secret-file") == "/certs/superexec.secret"
    for i, name in enumerate(SUPERNODES):
        node = args_of(services[name])
        assert flag_value(node, "--root-certificates") == "/certs/ca.crt"
        key = flag_value(node, "--auth-supernode-private-key")
        # each SuperNode gets its own private key, and not the server's secrets
        assert mounts(services[name])[f"{key}:ro"] == f"./certs/supernodes/supernode-{i}"
        assert not any("server.key" in h or "superexec.secret" in h or "ca.key" in h
                       for h in mounts(services[name]).values())
    for name in EXECS:  # no TLS key, no SuperNode key, not the server's secret
        assert not any(h.endswith(("server.key", "superexec.secret", "ca.key")) or h.endswith(name[:-len("-exec")])
                       for h in mounts(services[name]).values()), name
    for service in services.values():
        assert not any(h.endswith("ca.key") for h in mounts(service).values())


def test_only_the_fleet_front_is_published(compose):
    services = compose["services"]
    assert "ports" not in services["superlink"]  # not even on the host's loopback: the Control API
    published = {name: [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(p)) for p in service["ports"]]
                 for name, service in services.items() if service.get("ports")}
    assert published == {"fleet-front": ["9092:9092"]}
    for name, service in services.items():
        assert not service.get("network_mode"), name  # "host" would bypass all of this
    # SuperNodes talk to the front only; they share no network with the SuperLink
    link_networks = set(services["superlink"]["networks"])
    for name in SUPERNODES:
        node = args_of(services[name])
        assert flag_value(node, "--superlink") == "fleet-front:9092"
        assert not set(services[name]["networks"]) & link_networks, name
        # ClientAppIo: published nowhere (no ports); its SuperExec reaches it on "fleet"
        assert flag_value(node, "--host") == "0.0.0.0"
        assert not set(services[f"{name}-exec"]["networks"]) & link_networks, name
    assert set(services["fleet-front"]["networks"]) >= link_networks | {"fleet"}
    assert all("fleet" in services[name]["networks"] for name in SUPERNODES)
    assert set(services["superexec-serverapp"]["networks"]) <= link_networks


def test_operator_service_reaches_only_the_superlink(compose, tmp_path, monkeypatch):
    """Only the operator starts runs: its CLI is in the stack, on the server network alone."""
    from flwr.cli.flower_config import read_superlink_connection

    services = compose["services"]
    operator = services["operator"]
    assert operator["profiles"] == ["operator"]  # `docker compose up` leaves it out
    assert operator["networks"] == ["server"]
    assert set(services["superlink"]["networks"]) == {"server"}
    assert "ports" not in operator and not operator.get("depends_on")
    m = mounts(operator)
    home = operator["environment"]["FLWR_HOME"]
    assert m[f"{home}/config.toml:ro"] == "./containers/operator-flwr.toml"
    # the connection as the flwr CLI itself reads it from $FLWR_HOME/config.toml
    (tmp_path / "config.toml").write_text((REPO / "containers" / "operator-flwr.toml").read_text())
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    connection = read_superlink_connection(None)
    assert connection.name == "containers" and not connection.insecure
    port = flag_value(args_of(services["superlink"]), "--port")
    assert connection.address == f"superlink:{port}"
    assert connection.root_certificates == "/certs/ca.crt" and m["/certs/ca.crt:ro"] == "./certs/ca.crt"
    # the SuperNodes' public keys, to register; no private file
    for i in range(len(SUPERNODES)):
        assert m[f"/certs/supernodes/supernode-{i}.pub:ro"] == f"./certs/supernodes/supernode-{i}.pub"
    assert all(h.endswith((".pub", "ca.crt", ".toml")) for h in m.values()), m
    assert all(c.endswith(":ro") for c in m), m


def test_front_config_is_the_rendered_one(compose):
    import importlib.util

    from simulation.credentials import FLEET_API_PREFIX

    spec = importlib.util.spec_from_file_location("render_fleet_front", REPO / "containers" / "render_fleet_front.py")
    renderer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(renderer)
    front = compose["services"]["fleet-front"]
    conf = mounts(front)
    assert conf["/etc/nginx/nginx.conf:ro"] == "./containers/fleet-front.conf"
    expected = renderer.render()
    assert (REPO / "containers" / "fleet-front.conf").read_text() == expected, \
        "containers/fleet-front.conf is stale: run `python containers/render_fleet_front.py`"
    link_port = flag_value(args_of(compose["services"]["superlink"]), "--port")
    assert f"server superlink:{link_port};" in expected and "listen 0.0.0.0:9092 ssl;" in expected
    assert FLEET_API_PREFIX in expected
    for path in ("/certs/server.pem", "/certs/server.key", "/certs/ca.crt"):
        assert f"{path}:ro" in conf


def test_encoder_is_read_only_and_each_client_has_its_own_data(compose):
    from flwr.common.config import parse_config_args

    volumes_seen = set()
    for i, name in enumerate(SUPERNODES):
        service = compose["services"][name]
        config = parse_config_args([flag_value(args_of(service), "--node-config")])
        assert config == {"partition-id": i, "num-partitions": 3, "encoder-path": "/encoder", "data-root": "/data"}
        assert service["build"]["target"] == "supernode"
        # the ClientApps run in the pinned SuperExec's container: the inputs are mounted there
        assert not {"/encoder:ro", "/data/MNIST/raw:ro", "/data"} & set(mounts(service)), name
        m = mounts(compose["services"][f"{name}-exec"])
        assert "/encoder:ro" in m and "/data/MNIST/raw:ro" in m
        volumes_seen.add(m["/data"])
        assert m["/data"] in compose["volumes"]
    assert len(volumes_seen) == 3
    server = mounts(compose["services"]["superexec-serverapp"])
    assert "/encoder:ro" in server and "/results" in server and server["/data"] in compose["volumes"]


def test_superexec_reaches_the_superlink_runtime_api(compose):
    link = args_of(compose["services"]["superlink"])
    assert flag_value(link, "--isolation") == "process"  # so the SuperExec service is needed
    port = flag_value(link, "--port")
    assert flag_value(args_of(compose["services"]["superexec-serverapp"]), "--runtime-api-address") == f"superlink:{port}"


def test_same_flags_as_the_process_run(compose, tmp_path):
    """deploy-local's SuperLink and SuperNodes use a subset of the containers' flags."""
    from simulation.credentials import Credentials
    from simulation.deploy_local import node_config, pinned_superexec_command, superlink_command, supernode_command

    def flags(args: list[str]) -> set[str]:
        return {a for a in args if a.startswith("--")}

    credentials = Credentials(tmp_path)
    local_link = superlink_command(8000, credentials)[1:]
    local_node = supernode_command(8000, 9094, node_config(0, 3, "/encoder", "/data"), credentials, index=0,
                                   superexec_secret=tmp_path / "s")[1:]
    local_exec = pinned_superexec_command(9094, "0" * 64, tmp_path / "s")[1:]
    compose_link = args_of(compose["services"]["superlink"])
    compose_node = args_of(compose["services"]["supernode-0"])
    compose_exec = compose["services"]["supernode-0-exec"]
    assert flags(local_link) <= flags(compose_link)
    assert flags(local_node) <= flags(compose_node)
    assert local_exec[:2] == PINNED_SUPEREXEC[1:] and compose_exec["entrypoint"] == PINNED_SUPEREXEC
    assert flags(local_exec) <= flags(args_of(compose_exec))
    from flwr.common.config import parse_config_args

    # the same node config as Flower reads it (the quoting style of the strings may differ)
    assert parse_config_args([flag_value(local_node, "--node-config")]) == \
        parse_config_args([flag_value(compose_node, "--node-config")])
    for service, args in (({"image": "flwr/superlink"}, local_link), ({"image": "x/supernode"}, local_node)):
        parser_for(service).parse_args(args)


def test_each_supernode_runs_only_the_pinned_bundle(compose):
    """Process isolation, and beside each SuperNode a pinned SuperExec: the pin mounted
    read-only, a secret of their own (no other service holds it), on the network "fleet" alone."""
    services = compose["services"]
    secrets = set()
    for i, name in enumerate(SUPERNODES):
        node, exec_service = services[name], services[f"{name}-exec"]
        node_args, exec_args = args_of(node), args_of(exec_service)
        assert flag_value(node_args, "--isolation") == "process", name
        assert exec_service["entrypoint"] == PINNED_SUPEREXEC
        # the pin: the file the operator writes with `python -m simulation.app_bundle --sha256`
        pin = flag_value(exec_args, "--app-sha256")
        assert mounts(exec_service).get(f"{pin}:ro") == "./certs/app.sha256", f"{name}: the pin, read-only"
        # the SuperNode's Runtime API, where only this SuperExec holds the secret
        assert flag_value(exec_args, "--runtime-api-address") == f"{name}:{flag_value(node_args, '--port')}"
        node_secret = mounts(node)[f"{flag_value(node_args, '--superexec-auth-secret-file')}:ro"]
        exec_secret = mounts(exec_service)[f"{flag_value(exec_args, '--superexec-auth-secret-file')}:ro"]
        assert node_secret == exec_secret == f"./certs/supernodes/supernode-{i}.secret"
        secrets.add(node_secret)
        holders = [s for s, service in services.items() if node_secret in mounts(service).values()]
        assert sorted(holders) == sorted([name, f"{name}-exec"])
        # one network each: on two, podman's name servers answer in no fixed order
        assert node["networks"] == exec_service["networks"] == ["fleet"], name
        assert "ports" not in node and "ports" not in exec_service
    assert len(secrets) == len(SUPERNODES)
    from simulation.credentials import Credentials

    # the secrets are files `hybnn certs` writes
    assert {f"./{Credentials(Path('certs')).supernode_secret(i)}" for i in range(3)} == secrets
