"""docker-compose.yml and the Dockerfile, checked statically (no container engine).

It parses; images are pinned to Flower 1.42.0; every Flower service's command parses
with the installed Flower CLI's own argument parser; nothing runs insecure; only the
Fleet-only front is published (the SuperLink not even on the host's loopback) and the
SuperNodes cannot reach the SuperLink except through it; the operator's `flwr` CLI is a
service under a profile, on the SuperLink's network only, whose connection is the
SuperLink's port with the deployment's CA; the front's nginx config is the one
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
FLOWER_SERVICES = ["superlink", "superexec-serverapp", *SUPERNODES]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def args_of(service: dict) -> list[str]:
    return [str(a) for a in service["command"]]


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
        parser_for(service).parse_args(args_of(service))  # SystemExit on an unknown flag or bad value


def test_nothing_runs_insecure(compose):
    services = compose["services"]
    for name in FLOWER_SERVICES:
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
        assert flag_value(node, "--host") == "127.0.0.1"  # ClientAppIo stays inside the container
    assert set(services["fleet-front"]["networks"]) >= link_networks | set(services[SUPERNODES[0]]["networks"])
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
        m = mounts(service)
        assert "/encoder:ro" in m and "/data/MNIST/raw:ro" in m
        volumes_seen.add(m["/data"])
        assert m["/data"] in compose["volumes"]
        assert service["build"]["target"] == "supernode"
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
    from simulation.deploy_local import node_config, superlink_command, supernode_command

    def flags(args: list[str]) -> set[str]:
        return {a for a in args if a.startswith("--")}

    credentials = Credentials(tmp_path)
    local_link = superlink_command(8000, credentials)[1:]
    local_node = supernode_command(8000, 9094, node_config(0, 3, "/encoder", "/data"), credentials, index=0)[1:]
    compose_link = args_of(compose["services"]["superlink"])
    compose_node = args_of(compose["services"]["supernode-0"])
    assert flags(local_link) <= flags(compose_link)
    assert flags(local_node) <= flags(compose_node)
    from flwr.common.config import parse_config_args

    # the same node config as Flower reads it (the quoting style of the strings may differ)
    assert parse_config_args([flag_value(local_node, "--node-config")]) == \
        parse_config_args([flag_value(compose_node, "--node-config")])
    for service, args in (({"image": "flwr/superlink"}, local_link), ({"image": "x/supernode"}, local_node)):
        parser_for(service).parse_args(args)
