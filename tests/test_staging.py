"""A run's --out folder and its staging folders: stopping, failing, publishing, resuming beside a
run going on, and the processes of a killed command."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from common.errors import HyBNNError


def _unfinished_staging(out, server: dict):
    from simulation import runs

    staging = runs.staging_dir(out)
    (staging / "logs").mkdir()
    (staging / "logs" / "simulation.log").write_text("round 1 ...\n")
    (staging / "server.json").write_text(json.dumps(server))
    return staging


def test_a_run_stopped_before_its_first_round_leaves_no_staging_folder(tmp_path):
    from simulation.federate import finish_run

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    staging = _unfinished_staging(out, {"status": "running", "rounds": []})
    with pytest.raises(KeyboardInterrupt):
        finish_run(staging / "server.json", staging, out, {}, {}, time.perf_counter(), True, None, 3)
    # "nothing written": no .run-* folder piles up with each stopped attempt; earlier results kept.
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert json.loads((out / "results.json").read_text()) == {"earlier": True}


def test_a_run_that_aggregated_nothing_keeps_its_logs_where_the_error_says(tmp_path):
    from simulation.federate import finish_run

    out = tmp_path / "out"
    staging = _unfinished_staging(out, {"status": "failed", "rounds": [{"round": 1, "clients": [], "dropped": [
        {"node_id": 1, "reason": "malformed: bad"}]}]})
    with pytest.raises(HyBNNError, match=str(staging)):
        finish_run(staging / "server.json", staging, out, {}, {}, time.perf_counter(), False, None, 3)
    assert (staging / "logs" / "simulation.log").exists()


def _checkpoint(folder, server_round: int) -> None:
    import numpy as np

    from server import resume
    from server.server_app import ServerSettings
    from dataclasses import asdict

    ident = resume.identity(asdict(ServerSettings(task="0v1", num_server_rounds=5)), "ab" * 32, 1, {})
    resume.save_checkpoint(folder, server_round, {"bnn": np.zeros(8, dtype=np.uint8)}, ident)


def test_resume_never_takes_the_staging_folder_of_a_run_still_going_on(tmp_path):
    """`--resume OUT` while another run writes into OUT: resuming from that run's folder would
    race it, and publishing the resumed run would delete its folder under it."""
    import os

    from simulation import runs

    out = tmp_path / "out"
    _checkpoint(out, 1)
    live = runs.staging_dir(out)
    _checkpoint(live, 2)  # saved later than out's
    assert runs.resume_source(out) == out
    os.close(runs._held_locks.pop(live))  # the run's process ends (killed): its lock goes with it
    assert runs.resume_source(out) == live


def test_publishing_leaves_no_lock_of_the_staging_folder_behind(tmp_path):
    from simulation import runs

    out = tmp_path / "out"
    staging = runs.staging_dir(out)
    (staging / "results.json").write_text("{}")
    runs.publish(staging, out)
    assert sorted(p.name for p in out.iterdir()) == [runs.PUBLISH_LOCK_NAME, "results.json"]
    assert staging not in runs._held_locks


def test_publishing_replaces_a_folder_where_a_file_goes_and_the_other_way_round(tmp_path):
    """An OUT with a folder named results.json (or a file named global) does not end the run in a traceback."""
    from simulation import runs

    out = tmp_path / "out"
    (out / "results.json").mkdir(parents=True)
    (out / "results.json" / "old.txt").write_text("old")
    (out / "global").write_text("old file")
    staging = runs.staging_dir(out)
    (staging / "results.json").write_text('{"run": "new"}')
    (staging / "global").mkdir()
    (staging / "global" / "model.bin").write_text("new")
    runs.publish(staging, out)
    assert json.loads((out / "results.json").read_text()) == {"run": "new"}
    assert (out / "global" / "model.bin").read_text() == "new"
    assert not staging.exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_while_a_run_writes_into_the_same_out_takes_nothing_of_it(tmp_path, mnist_root):
    """A real run with a checkpoint in its staging folder: `--resume OUT` meanwhile finds no
    checkpoint (OUT has none of its own) and exits 2; the running run finishes untouched."""
    import subprocess

    from tests.conftest import fixed_encoder
    from tests.test_stop import REPO, _federate_cmd

    encoder = fixed_encoder(tmp_path / "encoder")
    out = tmp_path / "run"
    cmd = _federate_cmd(encoder, mnist_root, out, "--rounds", "4")
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO)
        try:
            deadline = time.monotonic() + 400
            while not list(out.glob(".run-*/checkpoint/state.json")):
                assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
                assert time.monotonic() < deadline, "no round completed"
                time.sleep(0.2)
            second = subprocess.run([*cmd, "--resume", str(out)], capture_output=True, text=True,
                                    timeout=300, cwd=REPO)
            # While the run goes on OUT holds no checkpoint; once it has finished, nothing is left to do.
            assert second.returncode == 2, second.stderr[-3000:]
            assert "No checkpoint to resume from" in second.stderr or "nothing to resume" in second.stderr
            assert proc.wait(timeout=400) == 0, (tmp_path / "stderr").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    finished = json.loads((out / "results.json").read_text())
    assert finished["status"] == "finished" and [r["round"] for r in finished["rounds"]] == [1, 2, 3, 4]
    assert not list(out.glob(".run-*"))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("command", ["federate", "deploy-local"])
def test_a_command_killed_with_sigkill_leaves_no_process_of_its_run(tmp_path, mnist_root, command):
    """`kill -9` (or the OOM killer) on the command: its simulation child, or its SuperLink and
    SuperNodes, each in a session of its own, must not go on orphaned (the SuperLink would serve
    forever) nor write into a folder `--resume` may take."""
    import signal
    import subprocess

    from simulation.runs import descendants
    from tests.conftest import fixed_encoder
    from tests.test_stop import HYBNN, REPO, _alive, _federate_cmd

    out = tmp_path / "run"
    cmd = _federate_cmd(fixed_encoder(tmp_path / "encoder"), mnist_root, out, "--rounds", "20")
    if command == "deploy-local":
        cmd = [HYBNN, "deploy-local", *cmd[2:], "--insecure"]
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO)
        deadline = time.monotonic() + 400
        while not list(out.glob(".run-*/server.json")):  # the ServerApp runs
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "the federation did not start"
            time.sleep(0.2)
        below = descendants(proc.pid)
        assert below
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while [pid for pid in below if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [pid for pid in below if _alive(pid)]
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes()[:150] for pid in left]
    for pid in left:  # do not leave them running if the check fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed run went on: {commands}"


def _sleeper_tree():
    """A process in a session of its own with a child below it, as the SuperLink and its SuperExec."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                             "time.sleep(120)"], start_new_session=True)
    from simulation.runs import descendants

    deadline = time.monotonic() + 30
    while not descendants(proc.pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, {proc.pid, *descendants(proc.pid)}


def test_orphan_guard_stops_the_registered_processes_when_its_owner_is_gone():
    from simulation import runs
    from tests.test_stop import _alive

    proc, tree = _sleeper_tree()
    guard = runs.OrphanGuard()
    guard.watch(proc.pid)
    try:
        guard.proc.stdin.close()  # as the owner's death closes it, without "done"
        guard.proc.wait(timeout=15)
        proc.wait(timeout=5)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in tree if _alive(pid)]
    finally:
        runs.stop_process_tree(proc)


def test_orphan_guard_closed_by_its_owner_leaves_the_processes_be():
    from simulation import runs
    from tests.test_stop import _alive

    proc, tree = _sleeper_tree()
    guard = runs.OrphanGuard()
    guard.watch(proc.pid)
    try:
        guard.close()
        assert guard.proc.returncode == 0
        assert all(_alive(pid) for pid in tree)
    finally:
        runs.stop_process_tree(proc)
    # The grandchild, orphaned by the kill, is reaped by init a moment later on a busy machine.
    deadline = time.monotonic() + 30
    while [pid for pid in tree if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in tree if _alive(pid)]


def test_a_resumed_run_forgets_its_source_however_the_folder_was_spelled(tmp_path, monkeypatch):
    from simulation import runs

    monkeypatch.chdir(tmp_path)
    source = (tmp_path / "out" / ".run-20260101-000000-1")
    source.mkdir(parents=True)
    runs.forget_source(source, Path("out"))  # --resume /abs/path/out --out out
    assert not source.exists()
    kept = tmp_path / "elsewhere" / ".run-20260101-000000-1"
    kept.mkdir(parents=True)
    runs.forget_source(kept, Path("out"))
    assert kept.exists()


def _dead_pid() -> int:
    """The id of a process that has ended."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _finished_staging(out, server_round: int):
    """A staging folder as a run leaves it after ``server_round`` rounds: record and checkpoint."""
    from tests.test_resume_tamper import ROUND_1

    rounds = [{**ROUND_1, "round": r} for r in range(1, server_round + 1)]
    staging = _unfinished_staging(out, {"status": "finished", "rounds": rounds})
    _checkpoint(staging, server_round)
    return staging


@pytest.mark.parametrize("resumed", [False, True])
def test_a_new_run_into_the_out_of_an_earlier_one_keeps_the_earlier_run(tmp_path, resumed):
    """Without --resume, the run of round 4 is not replaced by a new one of round 2: it moves to
    OUT/replaced-TIME/, checkpoint and all. A resumed run goes on with it, so it replaces it."""
    from server import resume
    from simulation.federate import finish_run

    out = tmp_path / "out"
    first = _finished_staging(out, 4)
    finish_run(first / "server.json", first, out, {}, {}, time.perf_counter(), False, None, 4)
    assert resume.read_state(out)["round"] == 4
    second = _finished_staging(out, 2)
    finish_run(second / "server.json", second, out, {}, {}, time.perf_counter(), False,
               out if resumed else None, 2)
    assert resume.read_state(out)["round"] == 2
    kept = list(out.glob("replaced-*"))
    if resumed:
        assert kept == []
    else:
        assert len(kept) == 1 and resume.read_state(kept[0])["round"] == 4
        assert len(json.loads((kept[0] / "results.json").read_text())["rounds"]) == 4
        assert (kept[0] / "logs" / "simulation.log").exists()
    assert resume.latest_run_dir(out) == out  # --resume OUT takes the new run, not the kept one


def test_a_new_run_prunes_failed_staging_folders_only(tmp_path, capsys):
    """At the start of a run: a staging folder with no checkpoint whose process is gone is removed
    (said on stderr); one with a checkpoint (for --resume), one of a live run and the published
    run stay."""
    import fcntl

    from simulation import runs

    out = tmp_path / "out"
    _checkpoint(out, 3)  # the published run
    (out / "results.json").write_text('{"published": true}')
    failed = out / f".run-20260101-000000-{_dead_pid()}"
    failed.mkdir()
    (failed / runs.LOCK_NAME).touch()
    (failed / "logs").mkdir()
    resumable = out / f".run-20260101-000001-{_dead_pid()}"
    _checkpoint(resumable, 2)
    live = out / f".run-20260101-000002-{_dead_pid()}"  # its lock held by a live process
    live.mkdir()
    holder = os.open(live / runs.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        new = runs.staging_dir(out)
    finally:
        os.close(holder)
    assert not failed.exists()
    assert resumable.is_dir() and live.is_dir() and new.is_dir()
    assert json.loads((out / "results.json").read_text()) == {"published": True}
    assert (out / "checkpoint" / "state.json").exists()
    assert f"Removed {failed}" in capsys.readouterr().err
    os.close(runs._held_locks.pop(new))
