"""docker-compose.yml, checked without a Docker engine.

It parses; images are pinned to Flower 1.42.0; every service's command parses with
the installed Flower CLI's own argument parser; the node configs parse with Flower's
config parser; and the flags that deploy-local's real processes use are the ones the
containers use.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FLWR = "1.42.0"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def parser_for(service: dict):
    """The installed Flower parser of the executable a service runs."""
    image = service["image"]
    if image.startswith("flwr/superlink") :
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
    assert set(services) == {"superlink", "superexec-serverapp", "supernode-0", "supernode-1", "supernode-2"}
    assert services["superlink"]["image"] == f"flwr/superlink:{FLWR}"
    for name, service in services.items():
        assert service["image"].endswith(f":{FLWR}"), name
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={FLWR}" in dockerfile
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == [
        "flwr/supernode:${FLWR_VERSION}", "flwr/superexec:${FLWR_VERSION}"]
    for target in ("supernode", "superexec"):
        assert f" AS {target}" in dockerfile


def test_every_command_parses_with_the_installed_flower(compose):
    for name, service in compose["services"].items():
        args = [str(a) for a in service["command"]]
        parser_for(service).parse_args(args)  # SystemExit on an unknown flag or bad value


def test_encoder_is_read_only_and_each_client_has_its_own_data(compose):
    from flwr.common.config import parse_config_args

    volumes_seen = set()
    for i in range(3):
        service = compose["services"][f"supernode-{i}"]
        args = [str(a) for a in service["command"]]
        config = parse_config_args([args[args.index("--node-config") + 1]])
        assert config == {"partition-id": i, "num-partitions": 3, "encoder-path": "/encoder", "data-root": "/data"}
        mounts = service["volumes"]
        assert any(m.endswith(":/encoder:ro") for m in mounts)
        data = [m.split(":")[0] for m in mounts if m.endswith(":/data")]
        assert len(data) == 1
        volumes_seen.add(data[0])
        assert data[0] in compose["volumes"]
        assert service["build"]["target"] == "supernode"
    assert len(volumes_seen) == 3
    server = compose["services"]["superexec-serverapp"]
    assert any(m.endswith(":/encoder:ro") for m in server["volumes"])


def test_superexec_reaches_the_superlink_runtime_api(compose):
    link = [str(a) for a in compose["services"]["superlink"]["command"]]
    assert link[link.index("--isolation") + 1] == "process"  # so the SuperExec service is needed
    port = link[link.index("--port") + 1]
    exec_args = [str(a) for a in compose["services"]["superexec-serverapp"]["command"]]
    assert exec_args[exec_args.index("--runtime-api-address") + 1] == f"superlink:{port}"
    for i in range(3):
        node = [str(a) for a in compose["services"][f"supernode-{i}"]["command"]]
        assert node[node.index("--superlink") + 1] == f"superlink:{port}"


def test_same_flags_as_the_process_run(compose):
    """deploy-local's SuperLink and SuperNodes use a subset of the containers' flags."""
    from simulation.deploy_local import node_config, superlink_command, supernode_command

    def flags(args: list[str]) -> set[str]:
        return {a for a in args if a.startswith("--")}

    local_link = superlink_command(8000)[1:]
    local_node = supernode_command(8000, 9094, node_config(0, 3, "/encoder", "/data"))[1:]
    compose_link = [str(a) for a in compose["services"]["superlink"]["command"]]
    compose_node = [str(a) for a in compose["services"]["supernode-0"]["command"]]
    assert flags(local_link) <= flags(compose_link)
    assert flags(local_node) <= flags(compose_node)
    assert local_node[local_node.index("--node-config") + 1] == compose_node[compose_node.index("--node-config") + 1]
    for service, args in (({"image": "flwr/superlink"}, local_link), ({"image": "x/supernode"}, local_node)):
        parser_for(service).parse_args(args)
