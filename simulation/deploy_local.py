"""``hybnn deploy-local``: FedHyBNN as separate processes on loopback.

It starts what a real deployment runs, on one machine:

* one ``flower-superlink`` (Fleet, Control and Runtime API on one free port);
* one ``flower-supernode`` per client, each with its own ClientAppIo port and a node
  config naming its ``partition-id``, ``num-partitions``, ``encoder-path`` and
  ``data-root``;
* ``flwr run <project> <connection> --stream``, which builds the app bundle, submits
  it, and streams the ServerApp's log until the run ends.

The CLI connection lives in a temporary ``FLWR_HOME``; runtime dependency
installation is off (the processes use this environment). Every process it started
is stopped when the run ends, fails, or is interrupted (Ctrl-C or SIGTERM): SIGTERM,
then SIGKILL after a grace period; the rounds completed so far are published with
status ``stopped``. The ServerApp writes into a staging folder, published into
``--out`` once the run has a round (:mod:`simulation.runs`); ``--resume`` goes on from
its checkpoint. The same commands, one per machine, are in docs/federated.md.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import HyBNNError
from server.resume import read_state
from simulation import runs
from simulation.federate import FederateConfig, import_plotting, centralized_reference, check_config, finish_run

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DeployConfig(FederateConfig):
    """A :class:`FederateConfig` run as processes, plus the process-level settings."""

    min_nodes: int = 1
    """The federation goes on with this many SuperNodes when others are gone."""
    node_wait_s: float = 60.0
    """How long the server waits for all ``clients`` SuperNodes before going on without the missing."""
    round_timeout_s: float = 300.0
    timeout_s: float = 1800.0
    """The whole run, start-up included."""
    kill_client_after_round: int | None = None
    """Fault injection: SIGKILL the last SuperNode once this round is in server.json."""
    kill_superlink_after_round: int | None = None
    """Fault injection: SIGKILL the SuperLink (and the ServerApp below it) once this round is saved."""
    log_dir: Path | None = None
    stop_grace_s: float = 3.0
    """How long stopped processes get to exit before SIGKILL."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HyBNNError(f"The {what} exited with status {proc.returncode} while starting; see its log.")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise HyBNNError(f"The {what} did not open port {port} within {timeout_s:.0f} s; see its log.")


def _bin(name: str) -> str:
    """A Flower executable of this environment (beside this Python), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def superlink_command(port: int) -> list[str]:
    return [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation"]


def supernode_command(superlink_port: int, port: int, node_config: str) -> list[str]:
    return [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
            "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config]


def node_config(partition_id: int, num_partitions: int, encoder: Path, data_root: Path) -> str:
    """A SuperNode's ``--node-config`` value (string values quoted, as Flower's parser needs)."""
    return (f"partition-id={partition_id} num-partitions={num_partitions} "
            f"encoder-path='{Path(encoder).resolve()}' data-root='{Path(data_root).resolve()}'")


def run_config_string(values: dict) -> str:
    """``flwr run --run-config`` syntax: ``key=value`` pairs, strings quoted."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            parts.append(f'{key}="{value}"')
        elif isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def write_cli_config(flwr_home: Path, superlink_port: int, name: str = "hybnn-local") -> str:
    """``$FLWR_HOME/config.toml`` with one insecure loopback connection; returns its name."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "127.0.0.1:{superlink_port}"\ninsecure = true\n'
    )
    return name


class Processes:
    """The processes of one deployment, stopped together."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log_file = open(self.log_dir / f"{name}.log", "w")
        log_file.write("$ " + shlex.join(cmd) + "\n")
        log_file.flush()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                cwd=PROJECT_ROOT, start_new_session=True)
        log_file.close()
        self.procs.append((name, proc))
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` and every process below it (a SuperLink's SuperExec and
        ServerApp run in sessions of their own)."""
        for n, proc in self.procs:
            if n == name and proc.poll() is None:
                for pid in [proc.pid, *runs.descendants(proc.pid)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()

    def stop_all(self, grace_s: float = 3.0) -> None:
        """Stop every process started here and the processes below them: SIGTERM, then
        SIGKILL for what remains after ``grace_s``."""
        runs.stop_process_tree([proc for _, proc in reversed(self.procs)], grace_s)


def _rounds_done(server_json: Path) -> int:
    try:
        return len(json.loads(server_json.read_text()).get("rounds", []))
    except (OSError, ValueError):
        return 0


def deploy_local(config: DeployConfig) -> dict:
    """Run the federation as processes on loopback; write and return results.json's content."""
    from common.encoder import load_encoder_artifact
    from common.features import load_codes
    from server.server_app import SERVER_RESULTS

    check_config(config)
    if not 1 <= config.min_nodes <= config.clients:
        raise HyBNNError(f"--min-nodes must be between 1 and --clients ({config.clients}).")
    started = time.perf_counter()
    out = Path(config.out).resolve()
    with runs.StopSignals() as signals:
        return _deploy_local(config, out, started, signals)


def _deploy_local(config: DeployConfig, out: Path, started: float, signals: runs.StopSignals) -> dict:
    from common.encoder import load_encoder_artifact
    from common.features import load_codes
    from server.server_app import SERVER_RESULTS

    source = runs.resume_source(config.resume)
    artifact = load_encoder_artifact(config.encoder)
    run_config = config.run_config(artifact.sha256)
    run_config.update({"min-available-nodes": config.clients, "min-train-nodes": config.min_nodes,
                       "node-wait-s": config.node_wait_s, "round-timeout-s": config.round_timeout_s})
    if source is not None:
        run_config["resume-dir"] = str(source.resolve())
        print(f"Resuming {source} after round {runs.check_resumable(source, run_config)} of {config.rounds}",
              flush=True)
    print(f"Encoder {artifact.path} (sha256 {artifact.sha256[:16]}...); extracting features", flush=True)
    for split in ("train", "test"):  # once, here, so the SuperNodes never race on the cache
        load_codes(artifact, config.data_root, split, progress=config.progress)
    print(f"Centralized HyBNN on {config.task}, "
          f"{config.reference_epochs} epochs", flush=True)
    centralized = centralized_reference(artifact, config)

    import_plotting()  # now, not in the seconds a stopped run has to write its results
    staging = runs.staging_dir(out)
    run_config["out-dir"] = str(staging)
    server_json = staging / SERVER_RESULTS
    log_dir = Path(config.log_dir or staging / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hybnn-flwr-") as tmp:
        env = dict(os.environ)
        # The SuperLink and SuperNodes start helpers (flower-superexec, flwr-clientapp) by name.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update({"FLWR_HOME": str(Path(tmp) / "flwr-home"),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONUNBUFFERED": "1"})
        procs = Processes(log_dir)
        try:
            link_port = free_port()
            link = procs.start("superlink", superlink_command(link_port), env)
            wait_for_port(link_port, link, "SuperLink")
            print(f"SuperLink on 127.0.0.1:{link_port}; logs in {log_dir}", flush=True)
            for i in range(config.clients):
                cmd = supernode_command(link_port, free_port(),
                                        node_config(i, config.clients, config.encoder, config.data_root))
                procs.start(f"supernode-{i}", cmd, env)
            connection = write_cli_config(Path(env["FLWR_HOME"]), link_port)
            run_cmd = [_bin("flwr"), "run", str(PROJECT_ROOT), connection,
                       "--run-config", run_config_string(run_config), "--stream"]
            print(f"Submitting: {shlex.join(run_cmd[:4])} --run-config ... --stream", flush=True)
            runner = procs.start("flwr-run", run_cmd, env)
            _watch(config, procs, runner, server_json, started)
        except KeyboardInterrupt:
            print("Stopping the deployment ...", file=sys.stderr, flush=True)
        except HyBNNError as exc:
            print(f"The run did not end normally: {exc}", file=sys.stderr, flush=True)
        finally:
            signals.defer()
            procs.stop_all(config.stop_grace_s)
    return finish_run(server_json, staging, out, centralized, {**config.to_dict(), "mode": "deploy-local"},
                      started, signals.stopped, source, config.rounds)


def _watch(config: DeployConfig, procs: Processes, runner: subprocess.Popen, server_json: Path,
           started: float) -> None:
    """Wait for ``flwr run`` to end; report progress; inject the configured fault."""
    seen = 0
    killed = False
    while runner.poll() is None:
        if time.perf_counter() - started > config.timeout_s:
            raise HyBNNError(f"The run took longer than {config.timeout_s:.0f} s and was stopped.")
        done = _rounds_done(server_json)
        if done != seen:
            seen = done
            print(f"  round {done}/{config.rounds} done", flush=True)
        if (config.kill_client_after_round is not None and not killed
                and done >= config.kill_client_after_round):
            name = f"supernode-{config.clients - 1}"
            print(f"  killing {name} (fault injection)", flush=True)
            procs.kill(name)
            killed = True
        if (config.kill_superlink_after_round is not None
                and (read_state(server_json.parent) or {}).get("round", 0) >= config.kill_superlink_after_round):
            print("  killing the SuperLink (fault injection)", flush=True)
            procs.kill("superlink")
            raise HyBNNError(f"The SuperLink was killed after round {done}.")
        if done >= config.rounds and _finished(server_json):
            # The ServerApp is done; give flwr run a moment to notice, then stop waiting.
            try:
                runner.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            return
        time.sleep(0.5)
    if runner.returncode not in (0, None) and not _finished(server_json):
        raise HyBNNError(f"`flwr run` exited with status {runner.returncode}; read its log for the cause. "
                         "If it could not reach the SuperLink, check that the SuperLink is running.")


def _finished(server_json: Path) -> bool:
    try:
        return json.loads(server_json.read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False
