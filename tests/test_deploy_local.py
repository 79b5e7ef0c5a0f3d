"""FedHyBNN as real processes: a SuperLink and two SuperNodes on loopback (TLS, SuperNode
authentication), one killed mid-run."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
from tests.conftest import fixed_encoder


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deploy_local_survives_a_killed_supernode(tmp_path, mnist_root):
    from simulation.deploy_local import DeployConfig, deploy_local

    config = DeployConfig(
        task="0v1", clients=2, rounds=2, encoder=fixed_encoder(tmp_path / "encoder"), data_root=mnist_root,
        out=tmp_path / "run", centralized_epochs=1, min_nodes=1, node_wait_s=30.0, round_timeout_s=90.0,
        timeout_s=280.0, kill_client_after_round=1, progress=False,
    )
    results = deploy_local(config)
    assert results["status"] == "finished"
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert len(rounds[0]["clients"]) == 2
    assert len(rounds[1]["clients"]) == 1  # the killed SuperNode is left out, the other goes on
    assert json.loads((tmp_path / "run" / "results.json").read_text())["rounds"][1]["test_acc"] > 0
    logs = tmp_path / "run" / "logs"
    assert {p.name for p in logs.iterdir()} >= {"superlink.log", "supernode-0.log", "supernode-1.log", "flwr-run.log",
                                                "register.log"}
    # The secure default: TLS, and each SuperNode's key registered before it joined.
    link_cmd = (logs / "superlink.log").read_text().splitlines()[0]
    assert "--enable-supernode-auth" in link_cmd and "--ssl-certfile" in link_cmd and "--insecure" not in link_cmd
    assert (logs / "register.log").read_text().count("registered successfully") == 2
    assert "--auth-supernode-private-key" in (logs / "supernode-0.log").read_text().splitlines()[0]


def test_run_config_and_node_config_syntax():
    from simulation.deploy_local import node_config, run_config_string

    assert run_config_string({"task": "4v5", "lr": 0.03, "seed": 0}) == 'task="4v5" lr=0.03 seed=0'
    assert node_config(1, 3, "/enc", "/data") == (
        'partition-id=1 num-partitions=3 encoder-path="/enc" data-root="/data"')


ODD_PATHS = ["/srv/a b", "/srv/it's", '/srv/say "hi"', "/srv/k=v x=y", "/srv/back\\slash", "/srv/new\nline",
             "/srv/ünïcødé 😀", "/srv/tab\tand\x7fdel", "/srv/all 'of\" = them\n"]


@pytest.mark.parametrize("path", ODD_PATHS)
def test_any_path_travels_whole_through_flowers_config_syntax(path):
    """What Flower's SuperNode and `flwr run` parse (parse_config_args) gives back the path as it was."""
    from flwr.common.config import parse_config_args

    from simulation.deploy_local import node_config, run_config_string

    values = {"out-dir": path, "encoder-path": path + "/enc", "seed": 3, "lr": 0.5}
    assert parse_config_args([run_config_string(values)]) == values
    parsed = parse_config_args([node_config(2, 5, path, path + "/data")])
    assert parsed == {"partition-id": 2, "num-partitions": 5, "encoder-path": str(Path(path).resolve()),
                      "data-root": str(Path(path + "/data").resolve())}
