"""``hybnn deploy-local``: FedHyBNN as separate processes on loopback.

It starts what a real deployment runs, on one machine, in a network namespace of its own
(``--network private``, the default; :mod:`simulation.netns`), so that no other process on
the machine reaches the SuperLink's unauthenticated Control API:

* one ``flower-superlink`` (Fleet, Control and Runtime API on one free loopback port),
  with TLS and SuperNode authentication: its certificate and the SuperNodes' key pairs
  come from ``--certs DIR`` (written by ``hybnn certs``) or are made fresh for the run;
* ``flwr supernode register`` of each SuperNode's public key;
* with ``--fleet-front``, the Fleet-only TLS front (nginx) that SuperNodes connect
  through, as on a real deployment (docs/security.md);
* one ``flower-supernode`` per client, each with its own Runtime API port, its private
  key, the CA certificate, and a node config naming its ``partition-id``,
  ``num-partitions``, ``encoder-path`` and ``data-root``; with ``--isolation process`` and,
  beside it, the SuperExec that starts its ClientApps only for this run's app bundle
  (:mod:`client.pinned_superexec`; the two share a secret of their own, and the process
  group: when either exits, the other and its ClientApps are stopped);
* ``flwr run <app> <connection> --stream`` on a copy of the project's git-tracked files,
  whose app bundle (:mod:`simulation.app_bundle`) is the one the SuperExecs are pinned to;
  it submits the bundle and streams the ServerApp's log until the run ends.

``--insecure`` drops TLS and authentication (a warning says what that exposes). The CLI
connection lives in a temporary ``FLWR_HOME``; runtime dependency installation is off
(the processes use this environment). Every process it started is stopped when the run
ends, fails, or is interrupted (Ctrl-C or SIGTERM): SIGTERM, then SIGKILL after a grace
period; the rounds completed so far are published with status ``stopped``. The ServerApp
writes into a staging folder, published into ``--out`` once the run has a round
(:mod:`simulation.runs`); ``--resume`` goes on from its checkpoint. The same commands, one
per machine, are in docs/federated.md and docs/security.md.
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

from common.federated import settings
from common.errors import HyBNNError
from server.resume import read_state
from simulation import runs
from simulation.app_bundle import (build_app_bundle, bundle_sha256, check_pyproject_current, stage_tracked_app,
                                   tracked_files)
from simulation.netns import DEFAULT_NETWORK
from simulation.credentials import Credentials, fleet_front_config, make_credentials, new_superexec_secret
from simulation.federate import FederateConfig, import_plotting, centralized_reference, check_config, finish_run

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DeployConfig(FederateConfig):
    """A :class:`FederateConfig` run as processes, plus the process-level settings."""

    min_nodes: int = settings.default("min-train-nodes")
    """The federation goes on with this many SuperNodes when others are gone (run config min-train-nodes)."""
    node_wait_s: float = 60.0
    """How long the server waits for all ``clients`` SuperNodes before going on without the missing
    (run config node-wait-s; shorter than the run config's default: the SuperNodes are local processes)."""
    round_timeout_s: float = 300.0
    """Run config round-timeout-s; shorter than its default, for the same reason."""
    timeout_s: float = 1800.0
    """The whole run, start-up included."""
    kill_client_after_round: int | None = None
    """Fault injection: SIGKILL the last SuperNode (that process alone, as another user's kill would)
    once this round is in server.json."""
    kill_superlink_after_round: int | None = None
    """Fault injection: SIGKILL the SuperLink (and the ServerApp below it) once this round is saved."""
    log_dir: Path | None = None
    certs: Path | None = None
    """Credentials written by ``hybnn certs`` (None: fresh ones for this run, deleted after it)."""
    insecure: bool = False
    """No TLS, no SuperNode authentication: only for comparison and debugging."""
    fleet_front: bool = False
    """SuperNodes connect through the Fleet-only nginx front instead of the SuperLink's port."""
    stop_grace_s: float = 3.0
    """How long stopped processes get to exit before SIGKILL."""
    network: str = DEFAULT_NETWORK
    """"private": the processes run in a network namespace of their own that no other process
    reaches (simulation/netns.py); "host": on this machine's loopback, reachable by every local process."""

    def run_config(self, encoder_sha256: str) -> dict:
        """:meth:`FederateConfig.run_config` with the deployment's own waits and minimum."""
        return {**super().run_config(encoder_sha256), "min-train-nodes": self.min_nodes,
                "node-wait-s": self.node_wait_s, "round-timeout-s": self.round_timeout_s}


INSECURE_WARNING = (
    "WARNING: --insecure: the SuperLink and SuperNodes talk plaintext HTTP without SuperNode "
    "authentication. Anyone who can reach the SuperLink's port can read and alter the model updates, "
    "join as a SuperNode, and submit a ServerApp that runs as your user on this host (the Control API "
    "has no account authentication).")
INSECURE_ON_HOST = " With --network host the port is on loopback: every local user of this machine can."


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


def superlink_command(port: int, credentials: Credentials | None = None) -> list[str]:
    """The SuperLink on loopback: TLS and SuperNode authentication with ``credentials``, else insecure."""
    if credentials is None:
        security = ["--insecure"]
    else:
        security = ["--ssl-certfile", str(credentials.server_cert), "--ssl-keyfile", str(credentials.server_key),
                    "--ssl-ca-certfile", str(credentials.ca_cert), "--enable-supernode-auth"]
    return [_bin("flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation"]


def supernode_command(superlink_port: int, port: int, node_config: str, credentials: Credentials | None = None,
                      index: int = 0, max_retries: int | None = None,
                      max_wait_time_s: float | None = None, superexec_secret: Path | None = None) -> list[str]:
    """SuperNode ``index``: it checks the SuperLink's certificate against the CA and signs in
    with its private key; without ``credentials``, insecure. ``max_retries``/``max_wait_time_s``:
    give up connecting after that many tries / seconds (Flower's default: never). With
    ``superexec_secret``, ``--isolation process``: it starts no ClientApp itself, a SuperExec
    holding that secret (:func:`pinned_superexec_command`) does."""
    if credentials is None:
        security = ["--insecure"]
    else:
        security = ["--root-certificates", str(credentials.ca_cert),
                    "--auth-supernode-private-key", str(credentials.supernode_key(index))]
    retry = []
    if max_retries is not None:
        retry += ["--max-retries", str(max_retries)]
    if max_wait_time_s is not None:
        retry += ["--max-wait-time", str(max_wait_time_s)]
    isolation = []
    if superexec_secret is not None:
        isolation = ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)]
    return [_bin("flower-supernode"), *security, "--superlink", f"127.0.0.1:{superlink_port}", *retry,
            *isolation, "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config]


def pinned_superexec_command(runtime_port: int, app_sha256: str, superexec_secret: Path,
                             supernode_pid: int | None = None) -> list[str]:
    """The SuperExec beside a SuperNode: it starts ClientApps only for the bundle ``app_sha256``
    (:mod:`client.pinned_superexec`). Its Runtime API is the SuperNode's, plaintext on loopback,
    where the shared secret keeps any other SuperExec out. With ``supernode_pid``, it also stops
    by itself when that process is gone."""
    parent = [] if supernode_pid is None else ["--parent-pid", str(supernode_pid)]
    return [sys.executable, "-m", "client.pinned_superexec", "--app-sha256", app_sha256,
            "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure",
            "--superexec-auth-secret-file", str(superexec_secret), *parent]


def write_superexec_secret(path: Path) -> Path:
    """A fresh secret shared by one SuperNode and its SuperExec (mode 0600)."""
    from common.fileio import atomic_write_bytes

    atomic_write_bytes(path, new_superexec_secret(), mode=0o600)
    return path


def node_config(partition_id: int, num_partitions: int, encoder: Path, data_root: Path) -> str:
    """A SuperNode's ``--node-config`` value (strings as :func:`config_string` writes them)."""
    return (f"partition-id={partition_id} num-partitions={num_partitions} "
            f"encoder-path={config_string(str(Path(encoder).resolve()))} "
            f"data-root={config_string(str(Path(data_root).resolve()))}")


def config_string(text: str) -> str:
    """``text`` as a value of Flower's ``key=value`` config syntax (``--run-config``, ``--node-config``),
    whatever characters it holds (a path with spaces, quotes, ``=``, newlines, any Unicode).

    Flower (``flwr.common.config.parse_config_args``) cuts a double-quoted value at the next double
    quote, then reads each pair as TOML: so the value is a TOML basic string in which a double quote,
    a backslash and every control character are written as escapes, never as themselves."""
    escaped = []
    for ch in text:
        if ch == '"' or ch == "\\" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def run_config_string(values: dict) -> str:
    """``flwr run --run-config`` syntax: ``key=value`` pairs, strings as :func:`config_string` writes them."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            parts.append(f"{key}={config_string(value)}")
        elif isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def write_cli_config(flwr_home: Path, superlink_port: int, name: str = "hybnn-local",
                     ca_cert: Path | None = None) -> str:
    """``$FLWR_HOME/config.toml`` with one loopback connection that checks the SuperLink's
    certificate against ``ca_cert`` (insecure without one); returns its name."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f"root-certificates = {json.dumps(str(ca_cert))}" if ca_cert is not None else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "127.0.0.1:{superlink_port}"\n{security}\n'
    )
    return name


def register_supernodes(credentials: Credentials, count: int, connection: str, env: dict, log_dir: Path) -> None:
    """``flwr supernode register`` each SuperNode's public key, so the SuperLink admits it."""
    with open(log_dir / "register.log", "w") as log:
        for i in range(count):
            cmd = [_bin("flwr"), "supernode", "register", str(credentials.supernode_public_key(i)), connection]
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            try:
                done = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=60)
            except subprocess.TimeoutExpired:
                raise HyBNNError(f"Registering supernode-{i}'s key took over 60 s; see {log_dir}/register.log.") from None
            if done.returncode != 0:
                raise HyBNNError(f"`flwr supernode register` of {credentials.supernode_public_key(i)} failed "
                                 f"(status {done.returncode}); see {log_dir}/register.log.")


def nginx_binary() -> str | None:
    """nginx from PATH or Debian's /usr/sbin, or None."""
    import shutil

    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def start_fleet_front(procs: "Processes", credentials: Credentials, superlink_port: int, env: dict,
                      state_dir: Path) -> int:
    """Start the Fleet-only TLS front on a free loopback port in front of the SuperLink; return its port."""
    nginx = nginx_binary()
    if nginx is None:
        raise HyBNNError("--fleet-front needs nginx (Debian: apt-get install -y --no-install-recommends nginx).")
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = state_dir / "nginx.conf"
    conf.write_text(fleet_front_config(
        listen=f"127.0.0.1:{port}", upstream=f"127.0.0.1:{superlink_port}", certfile=credentials.server_cert.resolve(),
        keyfile=credentials.server_key.resolve(), upstream_ca_certfile=credentials.ca_cert.resolve(),
        state_dir=state_dir.resolve(), access_log=str((state_dir / "access.log").resolve())))
    front = procs.start("fleet-front", [nginx, "-c", str(conf.resolve()), "-e", "stderr", "-g", "daemon off;"], env)
    wait_for_port(port, front, "Fleet front (nginx)", timeout_s=30)
    return port


class Processes:
    """The processes of one deployment, stopped together."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.groups: dict[str, list[str]] = {}
        """Process groups by name: their members' names, the first the group's leader."""
        self.stopped_groups: set[str] = set()
        self.guard = runs.OrphanGuard()  # stops them should this command be killed outright

    def start(self, name: str, cmd: list[str], env: dict, group: str | None = None) -> subprocess.Popen:
        """Start ``cmd`` as process ``name``, logging to ``NAME.log``, in a session of its own; with
        ``group``, in that process group instead, with everything it starts: the first process of a
        group leads it (in this command's session, so that the others may join it)."""
        placement: dict = {"start_new_session": True}
        if group is not None:
            members = self.groups.setdefault(group, [])
            placement = {"process_group": self.process(members[0]).pid if members else 0}
        log_file = open(self.log_dir / f"{name}.log", "w")
        log_file.write("$ " + shlex.join(cmd) + "\n")
        log_file.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    cwd=PROJECT_ROOT, **placement)
        except OSError as exc:  # joining a group whose processes are all gone already
            raise HyBNNError(f"Could not start {name}: {exc.strerror or exc}.") from None
        finally:
            log_file.close()
        self.procs.append((name, proc))
        if group is not None:
            self.groups[group].append(name)
        self.guard.watch(proc.pid)
        return proc

    def process(self, name: str) -> subprocess.Popen:
        return next(proc for n, proc in self.procs if n == name)

    def send(self, name: str, signum: int) -> None:
        """Signal process ``name`` alone."""
        proc = self.process(name)
        if proc.poll() is None:
            proc.send_signal(signum)

    def exited_groups(self) -> list[tuple[str, str, int]]:
        """Stop every group one of whose processes has exited, with everything in it; for each,
        ``(group, the process that exited, its exit status)``."""
        stopped = []
        for group, members in self.groups.items():
            if group in self.stopped_groups:
                continue
            for member in members:
                status = self.process(member).poll()
                if status is not None:
                    self.kill_group(group)
                    stopped.append((group, member, status))
                    break
        return stopped

    def kill_group(self, group: str) -> None:
        """SIGKILL every process of ``group``, and any process below its members that left it."""
        members = [self.process(n) for n in self.groups[group]]
        below = set().union(*(runs.descendants(p.pid) for p in members if p.poll() is None))
        runs.signal_all(below | {p.pid for p in members if p.poll() is None}, {members[0].pid}, signal.SIGKILL)
        for proc in members:
            proc.wait()
        deadline = time.monotonic() + 5.0  # SIGKILL lands at once, but not synchronously
        while runs.group_exists(members[0].pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stopped_groups.add(group)

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
        """Stop every process started here, every process of their groups and the processes
        below them: SIGTERM, then SIGKILL for what remains after ``grace_s``."""
        # A group counts while one of its members lives: until then its id cannot name another group.
        groups = {self.process(members[0]).pid for group, members in self.groups.items()
                  if group not in self.stopped_groups and any(self.process(n).poll() is None for n in members)}
        runs.stop_process_tree([proc for _, proc in reversed(self.procs)], grace_s, groups=groups)
        self.guard.close()


def _rounds_done(server_json: Path) -> int:
    try:
        return len(json.loads(server_json.read_text()).get("rounds", []))
    except (OSError, ValueError):
        return 0


def check_dataset_reachable(name: str) -> None:
    """Refuse a data set registered in this process: the SuperLink and SuperNodes are
    processes of their own, started from the command line, and cannot call its loader."""
    from common.data.datasets import SIZE_SUFFIX, registered_datasets

    m = SIZE_SUFFIX.match(name)
    base = m.group(1) if m else name
    if base in registered_datasets():
        raise HyBNNError(
            f"Data set {base!r} is registered in this process only; deploy-local's SuperLink and "
            f"SuperNodes are processes of their own and cannot read it. Save its arrays as an .npz "
            f"file (x_train, y_train, x_test, y_test, class_names) and pass --dataset npz:PATH, or "
            f"run it with `hybnn federate` (docs/datasets.md).")


def deploy_local(config: DeployConfig) -> dict:
    """Run the federation as processes on loopback; write and return results.json's content."""
    check_config(config)
    check_dataset_reachable(config.dataset)
    if not 1 <= config.min_nodes <= config.clients:
        raise HyBNNError(f"--min-nodes must be between 1 and --clients ({config.clients}).")
    check_security_options(config)
    check_network(config.network)
    if tracked_files(PROJECT_ROOT) is not None:
        check_pyproject_current(PROJECT_ROOT)  # the bundle is built from a copy, which is no checkout
    started = time.perf_counter()
    out = Path(config.out).resolve()
    with runs.StopSignals() as signals:
        return _deploy_local(config, out, started, signals)


def _deploy_local(config: DeployConfig, out: Path, started: float, signals: runs.StopSignals) -> dict:
    from common.encoder.artifact import load_encoder_artifact
    from common.encoder.features import load_codes
    from server.server_app import SERVER_RESULTS

    source = runs.resume_source(config.resume)
    artifact = load_encoder_artifact(config.encoder)
    run_config = config.run_config(artifact.sha256)
    if source is not None:
        run_config["resume-dir"] = str(source.resolve())
        print(f"Resuming {source} after round {runs.check_resumable(source, run_config)} of {config.rounds}",
              flush=True)
    print(f"Encoder {artifact.path} (sha256 {artifact.sha256[:16]}...); extracting features", flush=True)
    for split in ("train", "test"):  # once, here, so the SuperNodes never race on the cache
        load_codes(artifact, config.data_root, split, progress=config.progress, dataset=config.dataset)
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
        # What `flwr run` sends is built from this copy, so that the pin is its bundle's hash.
        app_dir = stage_tracked_app(PROJECT_ROOT, Path(tmp) / "app")
        app_sha256 = bundle_sha256(build_app_bundle(app_dir, Path(tmp) / "bundle"))
        print(f"App bundle sha256 {app_sha256}: the only one whose ClientApps the SuperNodes start", flush=True)
        with _network(config.network):
            procs = Processes(log_dir)
            try:
                credentials = _deployment_credentials(config, Path(tmp))
                link_port = free_port()
                link = procs.start("superlink", superlink_command(link_port, credentials), env)
                wait_for_port(link_port, link, "SuperLink")
                where = ("in a private network namespace that only this command's processes reach"
                         if config.network == "private" else "on this machine's loopback")
                print(f"SuperLink on 127.0.0.1:{link_port} {where} "
                      f"({'insecure' if credentials is None else 'TLS, SuperNode authentication'}); "
                      f"logs in {log_dir}", flush=True)
                connection = write_cli_config(Path(env["FLWR_HOME"]), link_port,
                                              ca_cert=None if credentials is None else credentials.ca_cert.resolve())
                fleet_port = link_port
                if credentials is not None:
                    register_supernodes(credentials, config.clients, connection, env, log_dir)
                    if config.fleet_front:
                        fleet_port = start_fleet_front(procs, credentials, link_port, env, log_dir / "fleet-front")
                        print(f"Fleet-only TLS front on 127.0.0.1:{fleet_port}", flush=True)
                for i in range(config.clients):
                    start_node(procs, i, fleet_port, app_sha256, config, credentials, env, Path(tmp))
                run_cmd = [_bin("flwr"), "run", str(app_dir), connection,
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


def start_node(procs: Processes, index: int, fleet_port: int, app_sha256: str, config: DeployConfig,
               credentials: Credentials | None, env: dict, tmp: Path) -> None:
    """SuperNode ``index`` and its pinned SuperExec, in one process group of their own."""
    secret = write_superexec_secret(tmp / f"superexec-{index}.secret")
    runtime_port = free_port()
    node = procs.start(f"supernode-{index}", supernode_command(
        fleet_port, runtime_port, node_config(index, config.clients, config.encoder, config.data_root),
        credentials, index=index, superexec_secret=secret), env, group=f"node-{index}")
    procs.start(f"superexec-{index}", pinned_superexec_command(runtime_port, app_sha256, secret, node.pid), env,
                group=f"node-{index}")


def node_exit_line(group: str, exited: str, status: int) -> str:
    """What the watch loop says when a process of a SuperNode's group exits before the run ends."""
    supernode = "supernode-" + group.split("-", 1)[1]
    if exited == supernode:
        return f"{supernode} exited (status {status}); its SuperExec and ClientApps were stopped"
    return f"{exited} exited (status {status}); {supernode} and its ClientApps were stopped"


def check_network(network: str) -> None:
    """Refuse an unknown --network, and a private one this process cannot make (before any work)."""
    from simulation import netns

    if network not in netns.NETWORKS:
        raise HyBNNError(f"--network must be one of {', '.join(netns.NETWORKS)}, not {network!r}.")
    if network == "private" and (reason := netns.can_unshare_here()) is not None:
        raise HyBNNError(f"deploy-local cannot make its private network here: {reason}. Run `hybnn "
                         f"deploy-local` (the command re-runs itself in a user namespace where Linux allows "
                         f"it), run it as root, or pass --network host to accept that every local process "
                         f"can reach the SuperLink's Control API.")


def _network(network: str):
    """The context the deployment's processes start in: a private network namespace, or none."""
    import contextlib

    from simulation import netns

    if network == "private":
        return netns.PrivateNetwork()
    print(netns.HOST_NETWORK_WARNING, file=sys.stderr, flush=True)
    return contextlib.nullcontext()


def check_security_options(config: DeployConfig) -> None:
    """Refuse contradictory or incomplete security options before any work starts."""
    if config.insecure:
        if config.certs is not None or config.fleet_front:
            raise HyBNNError("--insecure cannot be combined with --certs or --fleet-front.")
        return
    if config.certs is not None:
        Credentials(Path(config.certs).resolve()).check(config.clients)
    if config.fleet_front and nginx_binary() is None:
        raise HyBNNError("--fleet-front needs nginx (Debian: apt-get install -y --no-install-recommends nginx).")


def _deployment_credentials(config: DeployConfig, tmp: Path) -> Credentials | None:
    """The run's credentials: None with --insecure, --certs if given, else fresh ones in ``tmp``."""
    check_security_options(config)
    if config.insecure:
        print(INSECURE_WARNING + (INSECURE_ON_HOST if config.network == "host" else ""), file=sys.stderr,
              flush=True)
        return None
    if config.certs is not None:
        return Credentials(Path(config.certs).resolve())
    return make_credentials(tmp / "credentials", supernodes=config.clients)


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
            procs.send(name, signal.SIGKILL)
            killed = True
        for group, exited, status in procs.exited_groups():
            print(f"  {node_exit_line(group, exited, status)}", flush=True)
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
