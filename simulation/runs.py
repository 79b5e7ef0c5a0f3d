"""What `federate` and `deploy-local` share around a run: its folder, stopping, resuming.

* Output folder: a run writes into a fresh staging folder ``<out>/.run-<time>-<pid>/``.
  Its files go into ``<out>`` only once it has a round of its own (:func:`publish`); a run
  that reached nothing leaves ``<out>`` as it was. A new run (not ``--resume``) keeps the
  earlier run's files in ``<out>/replaced-<UTC time>/`` (:func:`common.fileio.keeping_earlier`),
  checkpoint included; a resumed run goes on with the earlier one and replaces it. A run cut
  off before publishing (the machine stopped) keeps its checkpoint in the staging folder,
  where ``--resume <out>`` finds it. A staging folder with no checkpoint, of a process that
  is gone, holds nothing to resume: the next run in ``<out>`` removes it (:func:`prune_staging`).
* Stopping: :class:`StopSignals` turns the first SIGINT or SIGTERM into
  ``KeyboardInterrupt`` and ignores the ones that follow while the run stops, so a
  second Ctrl-C never interrupts the clean-up.
* Process trees: :func:`stop_process_tree` stops a child and every process it started,
  including those that moved to their own session (Ray's raylet and workers).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from common.errors import HyBNNError
from server.resume import STAGING_LOCK_NAME

STAGING_PREFIX = ".run-"
LOCK_NAME = STAGING_LOCK_NAME
PUBLISH_LOCK_NAME = ".publish.lock"
"""In an output folder: locked while a run publishes into it."""
STOPPED_EXIT_STATUS = 130
PUBLISH_LAST = "results.json"
"""Moved into place last: while it is the earlier run's, the others may already be new."""


_held_locks: dict[Path, int] = {}
"""Staging folders of this process and their lock's file descriptor, held until the process ends."""


def staging_dir(out: Path) -> Path:
    """A new, empty staging folder inside ``out`` (same file system, so publishing is a rename),
    locked by this process (:data:`LOCK_NAME`) for as long as it lives, so that ``--resume``
    and publishing never take the folder of a run still going on."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prune_staging(out)
    path = out / f"{STAGING_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path.mkdir()
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _held_locks[path] = fd
    return path


def _staging_pid(path: Path) -> int | None:
    """The process id in a staging folder's name (``.run-<date>-<time>-<pid>``)."""
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def prune_staging(out: Path) -> list[Path]:
    """Remove the staging folders in ``out`` of runs that ended without a checkpoint (a run that
    failed or was killed before its first round): nothing there to resume or publish. A folder
    whose lock is held or whose process lives is a run going on and stays; so does one with a
    checkpoint (``--resume`` takes it). Each removal is said on stderr; the removed folders."""
    from server.resume import read_state, run_in_progress

    removed = []
    for path in sorted(Path(out).glob(f"{STAGING_PREFIX}*")):
        pid = _staging_pid(path)
        if (not path.is_dir() or path.is_symlink() or path in _held_locks or run_in_progress(path)
                or (pid is not None and is_alive(pid)) or read_state(path) is not None):
            continue
        shutil.rmtree(path, ignore_errors=True)
        print(f"Removed {path}: the staging folder of a run that ended without a checkpoint "
              "(nothing in it to resume).", file=sys.stderr, flush=True)
        removed.append(path)
    return removed


def publish(staging: Path, out: Path, keep_earlier: bool = True) -> Path | None:
    """Move everything in ``staging`` into ``out``, ``results.json`` last; then remove ``staging``.
    With ``keep_earlier`` (a new run), the earlier entries of those names are first moved into
    ``out/replaced-<UTC time>/`` (returned); without it (a resumed run, which goes on with the
    earlier one) they are replaced. Two runs publishing into one ``out`` at once take turns, so
    ``out`` holds one run's complete set, never a mix or a crash."""
    from common.fileio import keeping_earlier

    staging, out = Path(staging), Path(out)
    with open(out / PUBLISH_LOCK_NAME, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not keep_earlier:
            _publish(staging, out)
            return None
        names = tuple(p.name for p in staging.iterdir() if p.name != LOCK_NAME)
        with keeping_earlier(out, names) as kept:
            _publish(staging, out)
        return kept


def _publish(staging: Path, out: Path) -> None:
    names = sorted(p.name for p in staging.iterdir() if p.name != LOCK_NAME)
    names.sort(key=lambda name: name == PUBLISH_LAST)
    for name in names:
        source, target = staging / name, out / name
        if source.is_dir() or (target.is_dir() and not target.is_symlink()):
            # A rename cannot replace a non-empty folder, nor a folder by a file or the other way
            # round: move the old one aside first.
            old = staging / f".old-{name}"
            if target.exists() or target.is_symlink():
                os.replace(target, old)
            os.replace(source, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(source, target)
    shutil.rmtree(staging, ignore_errors=True)
    fd = _held_locks.pop(staging, None)
    if fd is not None:
        os.close(fd)


def has_aggregated_round(server: dict) -> bool:
    """Whether a run aggregated at least one reply: only then are its results its own."""
    return any(r.get("clients") for r in server.get("rounds", []))


def failure_message(server: dict) -> str:
    """Why a run aggregated nothing, with the clients' reasons."""
    from server.server_app import failure_reasons

    if server.get("failure"):
        return str(server["failure"])
    reasons = failure_reasons(server.get("rounds", []))
    if not server.get("rounds"):
        return "no round completed"
    return ("no client reply could be aggregated in any round; the clients' reasons: "
            + ("; ".join(reasons) if reasons else "none replied"))


def resume_source(resume: Path | None) -> Path | None:
    """The run folder ``--resume DIR`` continues: DIR, or its unpublished run saved last."""
    if resume is None:
        return None
    from server.resume import latest_run_dir

    if not Path(resume).is_dir():
        raise HyBNNError(f"--resume {resume}: no such folder.")
    return latest_run_dir(Path(resume))


def check_resumable(source: Path, run_config: dict) -> int:
    """Refuse, before anything starts, a checkpoint the run could not continue; its round."""
    from dataclasses import asdict

    from common.federated import codec
    from common.bnn.model import BNNConfig
    from common.encoder.artifact import load_encoder_artifact
    from common.data.datasets import get_dataset
    from common.data.tasks import task_for_dataset
    from server import resume
    from server.server_app import ServerSettings

    from server.server_app import earlier_record

    settings = ServerSettings.from_run_config(run_config)
    checkpoint = resume.load_checkpoint(source)
    state = checkpoint.state
    artifact = load_encoder_artifact(settings.encoder_path)
    num_classes = task_for_dataset(settings.task, settings.dataset).num_classes
    config = BNNConfig.for_task(int(artifact.config.latent_bits), num_classes)
    layout = codec.layout_for(config)
    bnn = {"config": config.to_dict(), "binary_weights": layout.n_binary, "bn_numbers": layout.n_bn}
    fingerprint = get_dataset(settings.dataset).fingerprint(settings.data_root)
    resume.check_matches(state, resume.identity(asdict(settings), artifact.sha256, codec.CODEC_VERSION, bnn,
                                                fingerprint))
    resume.check_payload(checkpoint, layout)
    earlier_record(checkpoint)
    return checkpoint.round


def forget_source(source: Path | None, out: Path) -> None:
    """After a resumed run is published, the unpublished run it continued is superseded."""
    if (source is not None and source.name.startswith(STAGING_PREFIX)
            and source.parent.resolve() == Path(out).resolve()):  # --resume /abs/out --out out alike
        shutil.rmtree(source, ignore_errors=True)


class StopSignals:
    """While active (main thread only), the first SIGINT/SIGTERM raises ``KeyboardInterrupt``;
    later ones only print that the run is stopping. After :meth:`defer` no signal raises: it is
    only recorded in ``signum``, so that writing the results is never cut short."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferred = False
        self._previous: dict[int, object] = {}

    def defer(self) -> None:
        self._deferred = True

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None and not self._deferred:
            self.signum = signum
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        print("Stopping; the results reached so far are being written.", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def stop_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """In a child process: once ``parent_pid``, which started it, is gone (killed outright, by
    SIGKILL or the OOM killer), stop every process below this one and exit, so that no run
    goes on orphaned, writing into a staging folder that ``--resume`` may then take.

    A watching thread, not a signal: the main thread may sit in a C call (Ray, gRPC) for long."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        print("The command that started this run is gone; stopping.", file=sys.stderr, flush=True)
        below = descendants(os.getpid())
        signal_all(below, set(), signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(is_alive(pid) for pid in below):
            time.sleep(0.1)
        signal_all({pid for pid in below | descendants(os.getpid()) if is_alive(pid)}, set(), signal.SIGKILL)
        os._exit(STOPPED_EXIT_STATUS)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


class OrphanGuard:
    """A small watcher process for processes that run programs of their own (SuperLink,
    SuperNodes): should this process die without closing the guard (SIGKILL, the OOM killer),
    the guard stops every process registered with it and every process below them.

    It learns of the death by the end of its stdin: only this process holds the pipe's other end."""

    def __init__(self) -> None:
        project = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-m", "simulation.runs", "--guard"], stdin=subprocess.PIPE,
                                     cwd=project, env=env, start_new_session=True, text=True)

    def watch(self, pid: int) -> None:
        self.proc.stdin.write(f"{pid}\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """The registered processes were stopped here: the guard leaves them be and exits."""
        try:
            self.proc.stdin.write("done\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _guard_main() -> int:
    """:class:`OrphanGuard`'s process: read pids until ``done`` (exit) or the end of stdin (stop them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the command, which closes the guard
    pids: set[int] = set()
    for line in sys.stdin:
        if line.strip() == "done":
            return 0
        pids.add(int(line))
    seen = set(pids)
    for pid in pids:
        seen |= descendants(pid)
    signal_all({pid for pid in seen if is_alive(pid)}, {pid for pid in pids if is_alive(pid)}, signal.SIGTERM)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and any(is_alive(pid) for pid in seen):
        time.sleep(0.1)
        for pid in pids:
            seen |= descendants(pid)
    signal_all({pid for pid in seen if is_alive(pid)}, set(), signal.SIGKILL)
    return 0


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid``."""
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def signal_all(pids: set[int], groups: set[int], signum: int) -> None:
    for group in groups:
        try:
            os.killpg(group, signum)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def stop_process_tree(procs: subprocess.Popen | list[subprocess.Popen], grace_s: float = 1.0,
                      groups: set[int] = frozenset()) -> None:
    """SIGTERM each of ``procs`` (each started in its own session or process group), every
    process of ``groups`` (process group ids) and everything below them; SIGKILL what is left
    after ``grace_s``. Processes that left a tree (a daemon reparented to init) are still
    caught by the pids seen earlier."""
    procs = [procs] if isinstance(procs, subprocess.Popen) else list(procs)
    leaders = {proc.pid for proc in procs if proc.poll() is None}
    seen: set[int] = set()
    for proc in procs:
        seen |= descendants(proc.pid)
    signal_all(seen | leaders, leaders | set(groups), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        for proc in procs:
            seen |= descendants(proc.pid)
        if (all(proc.poll() is not None for proc in procs) and not any(is_alive(pid) for pid in seen)
                and not any(group_exists(g) for g in groups)):
            return
        time.sleep(0.1)
    for proc in procs:
        seen |= descendants(proc.pid)
    signal_all({pid for pid in seen if is_alive(pid)} | {p.pid for p in procs if p.poll() is None},
               {p.pid for p in procs if p.poll() is None} | set(groups), signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass


def group_members(pgid: int) -> set[int]:
    """The living (not zombie) processes of process group ``pgid``, from /proc."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.add(int(entry.name))
    return members


def group_exists(pgid: int) -> bool:
    """Whether process group ``pgid`` has a living process in it."""
    return bool(group_members(pgid))


def is_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


if __name__ == "__main__":
    if sys.argv[1:] == ["--guard"]:
        sys.exit(_guard_main())
    sys.exit("usage: python -m simulation.runs --guard (started by `hybnn deploy-local`)")
