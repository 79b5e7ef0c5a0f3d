"""``hybnn reproduce`` end to end (the tiny ``smoke`` profile) and its care for existing files."""

from __future__ import annotations

import signal
import json
import os
from pathlib import Path

import pytest

from simulation.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mnist_root) -> Path:
    """A data root that shares MNIST with the repository but keeps its feature cache private."""
    root = tmp_path_factory.mktemp("reproduce")
    (root / "data").mkdir()
    os.symlink(Path(mnist_root).resolve() / "MNIST", root / "data" / "MNIST")
    return root


def run(workspace: Path, out: Path, *extra: str) -> int:
    return main(["reproduce", "--profile", "smoke", "--out", str(out), "--data-root",
                 str(workspace / "data"), "--encoder-dir", str(workspace / "encoder"),
                 "--tasks", "0v1", *extra])


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def first_run(workspace) -> Path:
    out = workspace / "out"
    assert run(workspace, out, "--no-federated") == 0
    return out


def test_smoke_run_writes_results_report_plots_and_models(first_run, workspace):
    results = json.loads((first_run / "results.json").read_text())
    assert results["profile"] == "smoke"
    assert results["encoder"]["reused"] is False and len(results["encoder"]["sha256"]) == 64
    assert (workspace / "encoder" / "manifest.json").is_file()
    models = results["tasks"]["0v1"]
    assert set(models) == {"hybnn", "bcnn-sign", "bcnn-centered", "fp-cnn"}
    for name, entry in models.items():
        assert 0.0 <= entry["test_acc"] <= 1.0 and entry["train_seconds"] > 0
        assert len(entry["history"]) == entry["epochs"]
    assert models["hybnn"]["epochs"] == 2 and models["fp-cnn"]["epochs"] == 1
    assert models["bcnn-sign"]["test_acc"] < 0.6  # a constant input: one class for everything
    report_md = (first_run / "report.md").read_text()
    assert "| model | 0v1 | paper (pair tasks) |" in report_md and ">95%" in report_md
    assert "ratio at the paper profile's epochs" in report_md
    for png in ("accuracy.png", "training_0v1.png"):
        assert (first_run / png).stat().st_size > 1000
    assert (first_run / "models" / "0v1" / "model.safetensors").is_file()
    assert not list(workspace.glob(".*partial*"))


def test_saved_bnn_loads_and_scores_like_the_run(first_run):
    from common.bnn.store import load_bnn

    model, sidecar = load_bnn(first_run / "models" / "0v1")
    results = json.loads((first_run / "results.json").read_text())
    assert sidecar["meta"]["test_acc"] == results["tasks"]["0v1"]["hybnn"]["test_acc"]
    assert sidecar["meta"]["encoder_sha256"] == results["encoder"]["sha256"]


def test_rerun_reuses_encoder_keeps_previous_and_records_a_failed_federation(
        first_run, workspace, monkeypatch, capsys):
    import simulation.reproduce as rep
    from common.errors import HyBNNError

    before = tree(first_run)

    def broken_federation(*args, **kwargs):
        raise HyBNNError("no federation here")

    monkeypatch.setattr(rep, "run_federated", broken_federation)
    assert run(workspace, first_run) == 0
    results = json.loads((first_run / "results.json").read_text())
    assert results["encoder"]["reused"] is True
    assert results["tasks"]["0v1"]["fedhybnn"] == {"error": "no federation here"}
    assert "failed: no federation here" in (first_run / "report.md").read_text()
    kept = list(workspace.glob("out.previous-*"))
    assert len(kept) == 1 and tree(kept[0]) == before
    out = capsys.readouterr().out
    assert "task" in out and "0v1" in out and "earlier run is kept" in out


def test_bad_encoder_path_fails_cleanly_and_leaves_out_untouched(first_run, workspace, capsys):
    before = tree(first_run)
    not_a_dir = workspace / "encoder-file"
    not_a_dir.write_text("not an encoder")
    code = main(["reproduce", "--profile", "smoke", "--out", str(first_run), "--data-root",
                 str(workspace / "data"), "--encoder-dir", str(not_a_dir), "--tasks", "0v1"])
    err = capsys.readouterr().err
    assert code == 2 and "is a file" in err and "--encoder-dir" in err and "Traceback" not in err
    assert tree(first_run) == before
    assert not_a_dir.read_text() == "not an encoder"


@pytest.mark.parametrize("beside", [True, False], ids=["baselines-in-a-second-process", "one-process"])
def test_interrupted_run_leaves_out_and_encoder_untouched(first_run, workspace, monkeypatch, capsys, beside):
    import multiprocessing

    import common.experiments.baselines
    import simulation.reproduce

    before, encoder_before = tree(first_run), tree(workspace / "encoder")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # Ctrl-C while the BNNs train: with the baselines beside them, the second process is stopped too
    monkeypatch.setattr(simulation.reproduce, "run_hybnn", interrupt)
    monkeypatch.setattr(common.experiments.baselines, "train_baseline", interrupt)
    if not beside:
        monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert run(workspace, first_run, "--no-federated") == 130
    assert "interrupted" in capsys.readouterr().err
    assert not multiprocessing.active_children()
    assert tree(first_run) == before
    assert tree(workspace / "encoder") == encoder_before
    assert not list(workspace.glob(".*partial*"))


def test_baselines_beside_give_the_numbers_of_one_process(first_run, workspace, monkeypatch):
    """The second process trains with the same seed and one thread: the same accuracies."""
    out = workspace / "one-process"
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert run(workspace, out, "--no-federated") == 0
    beside = json.loads((first_run / "results.json").read_text())
    alone = json.loads((out / "results.json").read_text())
    assert "baselines (beyond the encoder and BNNs)" in beside["stages"] and "baselines" in alone["stages"]
    for model in ("bcnn-sign", "bcnn-centered", "fp-cnn"):
        assert beside["tasks"]["0v1"][model]["test_acc"] == alone["tasks"]["0v1"][model]["test_acc"], model


def test_foreign_nonempty_out_is_refused(workspace, capsys):
    foreign = workspace / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert run(workspace, foreign) == 2
    err = capsys.readouterr().err
    assert "does not hold an earlier" in err and "Traceback" not in err
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1


def test_reproduce_refuses_unknown_tasks_and_profiles(tmp_path):
    from common.errors import HyBNNError
    from simulation.reproduce import reproduce

    with pytest.raises(HyBNNError, match="Unknown task '3v4'"):
        reproduce("smoke", tmp_path / "o", tmp_path, tasks=["3v4"])
    with pytest.raises(HyBNNError, match="Unknown profile 'huge'"):
        reproduce("huge", tmp_path / "o", tmp_path)
    assert not (tmp_path / "o").exists()


def test_move_into_place_keeps_the_earlier_directory(tmp_path):
    from simulation.reproduce import _move_into_place

    target, staging = tmp_path / "d", tmp_path / ".d.partial"
    target.mkdir()
    (target / "old").write_text("old")
    staging.mkdir()
    (staging / "new").write_text("new")
    kept = _move_into_place(staging, target)
    assert (target / "new").read_text() == "new" and (kept / "old").read_text() == "old"
    assert kept.name.startswith("d.previous-")


def test_sigterm_removes_the_staging_folder_and_leaves_no_out(workspace, tmp_path):
    """A run stopped by SIGTERM (a scheduler, `kill`) cleans up like one stopped by Ctrl-C."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulation.cli", "reproduce", "--profile", "smoke", "--out", str(out),
         "--data-root", str(workspace / "data"), "--encoder-dir", str(tmp_path / "encoder"),
         "--tasks", "0v1", "--no-federated"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1])
    staging = out.with_name(f".{out.name}.partial-{proc.pid}")
    deadline = time.monotonic() + 120
    while not staging.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the run never created its staging folder"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not staging.exists()
    assert not out.exists()


def test_the_baselines_worker_ignores_ctrl_c_so_only_the_run_stops_it(tmp_path, monkeypatch):
    """Ctrl-C at a terminal reaches the whole process group: the baselines' worker must leave
    it to the run (which kills the worker), not print a traceback of its own."""
    import types

    from simulation import reproduce as rp

    monkeypatch.setattr(rp.os, "cpu_count", lambda: 64)  # a CPU to spare, so the worker starts
    prof = types.SimpleNamespace(baseline_epochs=1, train_limit=1)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with rp.baselines_beside([], prof, tmp_path) as future:
        assert future is not None
        assert future.result(timeout=120) == {}  # no tasks: the worker answers at once
        executor_processes = [p for p in __import__("multiprocessing").active_children()
                              if p.name.startswith("SpawnProcess")]
        assert executor_processes
        for process in executor_processes:
            ignored = int(next(line for line in open(f"/proc/{process.pid}/status")
                               if line.startswith("SigIgn")).split()[1], 16)
            for signum in (signal.SIGINT, signal.SIGTERM):
                assert ignored & (1 << (signum - 1)), (process.pid, signum)
            blocked = int(next(line for line in open(f"/proc/{process.pid}/status")
                               if line.startswith("SigBlk")).split()[1], 16)
            assert not blocked & ((1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))), process.pid
    assert {signum: signal.getsignal(signum) for signum in before} == before  # the run's own handlers are back


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_the_baselines_worker_start_is_not_lost(tmp_path, monkeypatch, signum):
    """A stop sent to the run's process (by `kill`, a scheduler or the terminal) while the worker
    starts reaches the run's handler once the start is done, also when another thread of the run
    (torch's, tqdm's) is the one the kernel hands it to; not during the start, which the handler's
    exception would break off half way (the worker then prints a traceback)."""
    import threading
    import types
    from concurrent.futures import ProcessPoolExecutor

    from simulation import reproduce as rp

    monkeypatch.setattr(rp.os, "cpu_count", lambda: 64)
    submit = ProcessPoolExecutor.submit

    during_start: list[int] = []

    def submit_with_a_stop(self, *args, **kwargs):
        os.kill(os.getpid(), signum)  # to the process, as `kill` sends it: any thread may take it
        future = submit(self, *args, **kwargs)  # Python would run a pending handler in here
        during_start.extend(received)
        return future

    monkeypatch.setattr(ProcessPoolExecutor, "submit", submit_with_a_stop)
    other_thread_done = threading.Event()
    other = threading.Thread(target=other_thread_done.wait, args=(30,), daemon=True)
    other.start()
    received = []
    previous = signal.signal(signum, lambda got, frame: received.append(got))
    try:
        with rp.baselines_beside([], types.SimpleNamespace(baseline_epochs=1, train_limit=1), tmp_path) as future:
            assert future is not None
            future.result(timeout=120)
    finally:
        signal.signal(signum, previous)
        other_thread_done.set()
    assert during_start == []  # held while the worker started: a handler then would break off its start
    assert received == [signum]  # and raised once it had
