"""FedHyBNN as real processes: a SuperLink and two SuperNodes on loopback (TLS, SuperNode
authentication), one killed mid-run."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
from tests.conftest import fixed_encoder


def _processes_with_env(entry: str) -> dict[int, str]:
    """The living processes whose environment holds ``entry`` (``NAME=value``), with their
    command lines: from /proc, so children that left their parent's tree are found too."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if entry.encode() in environ and state != "Z":
            found[int(proc.name)] = cmdline
    return found


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_deploy_local_survives_a_killed_supernode_and_leaves_no_process_behind(tmp_path, mnist_root, capsys):
    import re
    import threading
    import time

    from simulation.deploy_local import DeployConfig, deploy_local

    logs = tmp_path / "logs"
    config = DeployConfig(
        task="0v1", clients=2, rounds=2, encoder=fixed_encoder(tmp_path / "encoder"), data_root=mnist_root,
        out=tmp_path / "run", centralized_epochs=1, min_nodes=1, node_wait_s=30.0, round_timeout_s=240.0,
        timeout_s=600.0, kill_client_after_round=1, progress=False, log_dir=logs,
    )
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["results"] = deploy_local(config)
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    try:
        # While the run goes on, every process of it carries the run's FLWR_HOME in its environment.
        deadline = time.monotonic() + 200
        while not ((logs / "flwr-run.log").exists() and (logs / "superexec-1.log").exists()):
            assert worker.is_alive() and time.monotonic() < deadline, f"the deployment did not start: {outcome}"
            time.sleep(0.5)
        app = Path(re.search(r" run (\S+) hybnn-local ", (logs / "flwr-run.log").read_text()).group(1))
        marker = f"FLWR_HOME={app.parent / 'flwr-home'}"
        running = _processes_with_env(marker)
        assert sum("flower-supernode" in c for c in running.values()) == 2, running
        assert sum("client.pinned_superexec" in c for c in running.values()) == 2, running
        assert any("flower-superlink" in c for c in running.values()), running
    finally:
        worker.join(timeout=660)
    assert "error" not in outcome, outcome.get("error")
    results = outcome["results"]
    assert results["status"] == "finished"
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert len(rounds[0]["clients"]) == 2
    assert len(rounds[1]["clients"]) == 1  # the killed SuperNode is left out, the other goes on
    assert json.loads((tmp_path / "run" / "results.json").read_text())["rounds"][1]["test_acc"] > 0
    assert "supernode-1 exited (status -9); its SuperExec and ClientApps were stopped" in capsys.readouterr().out
    # Nothing of the run outlives it: the SuperLink and its ServerApp, the SuperNodes, their
    # SuperExecs and ClientApps, the killed SuperNode's included.
    assert _processes_with_env(marker) == {}
    assert {p.name for p in logs.iterdir()} >= {"superlink.log", "supernode-0.log", "supernode-1.log", "flwr-run.log",
                                                "register.log", "superexec-0.log", "superexec-1.log"}
    # The secure default: TLS, and each SuperNode's key registered before it joined.
    link_cmd = (logs / "superlink.log").read_text().splitlines()[0]
    assert "--enable-supernode-auth" in link_cmd and "--ssl-certfile" in link_cmd and "--insecure" not in link_cmd
    assert (logs / "register.log").read_text().count("registered successfully") == 2
    node_cmd = (logs / "supernode-0.log").read_text().splitlines()[0]
    assert "--auth-supernode-private-key" in node_cmd and "--isolation process" in node_cmd


def test_a_process_group_is_stopped_whole_when_one_of_it_exits(tmp_path):
    """What deploy-local does when someone else kills a SuperNode: its group (the SuperNode, its
    SuperExec, the ClientApps below) is stopped; stop_all stops a group whose leader is gone."""
    import os
    import signal

    from simulation.deploy_local import Processes
    from simulation.runs import group_exists, is_alive

    env = dict(os.environ)
    procs = Processes(tmp_path)
    try:
        leader = procs.start("supernode-0", ["sleep", "600"], env, group="node-0")
        # A "SuperExec" whose "ClientApp" runs below it, in the same group.
        member = procs.start("superexec-0", ["sh", "-c", "sleep 600 & wait"], env, group="node-0")
        other = procs.start("supernode-1", ["sleep", "600"], env, group="node-1")
        procs.start("superexec-1", ["sh", "-c", "sleep 601 & exec sleep 602"], env, group="node-1")
        assert os.getpgid(member.pid) == leader.pid != os.getpgid(os.getpid())
        assert procs.exited_groups() == []
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait()
        assert procs.exited_groups() == [("node-0", "supernode-0", -9)]
        assert not group_exists(leader.pid) and not is_alive(member.pid)
        # The other group's leader dies, nobody looks: stop_all still stops what is left of the group.
        os.kill(other.pid, signal.SIGKILL)
        other.wait()
        assert group_exists(other.pid)
    finally:
        procs.stop_all(grace_s=1.0)
    assert not group_exists(other.pid)


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
