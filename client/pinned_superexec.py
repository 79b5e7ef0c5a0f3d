"""The SuperExec that starts ClientApps on a SuperNode only for the operator's app bundle.

A SuperNode runs the ClientApp of every run its SuperLink hands it, and the open-source
SuperLink's Control API has no account authentication (docs/security.md): whoever can
submit a run chooses the code every SuperNode executes. Flower's ``--trusted-entities``
accepts only bundles signed by Flower's platform. So the SuperNode runs with
``--isolation process`` and this SuperExec beside it, pinned to one bundle's sha256:

    python -m client.pinned_superexec --app-sha256 HEX|FILE --runtime-api-address 127.0.0.1:9094 \\
        --insecure --superexec-auth-secret-file client.secret

(every option but ``--app-sha256`` is ``flower-superexec``'s). A task whose ``fab_hash`` is
the pinned one is launched as Flower's SuperExec launches it. Any other task is never
launched: it is answered with an error reply (``INVALID_FAB``, the code Flower gives a bundle
that fails verification), so the ServerApp sees this node refuse rather than wait, and it is
finished as failed. The first refused task of a run logs one line naming the run id and both
hashes.

The hash names exactly the code a ClientApp would run: the SuperLink sets a run's fab_hash to
the sha256 of the bundle's bytes, the SuperNode stores a bundle under the sha256 it computes
of its content, and a ClientApp receives the bundle stored under its run's hash.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import re
import sys
from logging import DEBUG, ERROR, INFO
from pathlib import Path

from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.plugin import AutoExecPlugin

from common.errors import HyBNNError

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
PIN_HINT = "Compute it with `python -m simulation.app_bundle --sha256` from the operator's checkout."


def read_pin(value: str) -> str:
    """``--app-sha256``: 64 hex digits; a file holding them (as ``--sha256`` or ``sha256sum``
    prints them); or the ``.fab`` file itself, whose bytes are hashed."""
    text = value.strip().lower()
    if SHA256_HEX.fullmatch(text):
        return text
    path = Path(value)
    if not path.is_file():
        raise HyBNNError(f"--app-sha256 {value!r} is neither the 64 hex digits of the app bundle's sha256 "
                         f"nor a file. {PIN_HINT}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HyBNNError(f"--app-sha256 {path}: cannot read it ({exc.strerror}).") from None
    if path.suffix == ".fab":
        return hashlib.sha256(data).hexdigest()
    words = data.decode("utf-8", "replace").split()
    if words and SHA256_HEX.fullmatch(words[0].lower()):
        return words[0].lower()
    raise HyBNNError(f"--app-sha256 {path}: the file does not start with the 64 hex digits of a sha256 "
                     f"(nor is it a .fab bundle). {PIN_HINT}")


def refusal_reason(fab_hash: str, pinned: str) -> str:
    return (f"this SuperNode runs only the app bundle with sha256 {pinned}; the run's bundle has "
            f"sha256 {fab_hash or '(none)'}, so its ClientApp was not started")


class PinnedClientAppExecPlugin(AutoExecPlugin):
    """Flower's SuperExec plugin, launching only tasks of the pinned app bundle."""

    def __init__(self, *args, app_sha256: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.app_sha256 = app_sha256
        self.refused_runs: set[int] = set()

    def launch_task(self, token: str, task: Task) -> LaunchResult:
        fab_hash = task.fab_hash if task.HasField("fab_hash") else ""
        if fab_hash == self.app_sha256:
            return super().launch_task(token, task)
        from flwr.supercore import log

        reason = refusal_reason(fab_hash, self.app_sha256)
        if task.run_id not in self.refused_runs:
            self.refused_runs.add(task.run_id)
            log(ERROR, "Refused run %d: its app bundle has sha256 %s, not the pinned %s; none of its "
                "ClientApps is started on this SuperNode", task.run_id, fab_hash or "(none)", self.app_sha256)
        else:
            log(DEBUG, "Refused task %d of run %d (app bundle %s)", task.task_id, task.run_id, fab_hash)
        try:
            self._answer_with_error(token, reason)
        except Exception as exc:  # pylint: disable=broad-except  # the SuperNode may be gone; never launch
            log(ERROR, "Could not send the refusal of task %d of run %d to the SuperNode (%s); its task "
                "expires unanswered", task.task_id, task.run_id, exc)
            return LaunchResult.failed(reason)
        # Answered and finished: nothing is left for Flower's expiry handling to do.
        return LaunchResult.accepted()

    def _answer_with_error(self, token: str, reason: str) -> None:
        """Do what a ClientApp that refuses does: take the task's message, push an error reply
        to it, and finish the task as failed. The bundle's bytes are received but never unpacked."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import RetryInvoker, exponential
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        import httpx

        # Not Flower's own invoker, which on a 401 interrupts the whole process: a refusal that
        # fails must cost this SuperExec nothing. Its loop waits meanwhile, so a few quick tries.
        retry = RetryInvoker(lambda: exponential(max_delay=1.0), httpx.TransportError, max_tries=3, max_time=10.0)
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address, insecure=self.insecure,
            root_certificates=validate_and_resolve_root_certificates(self.root_certificates_path, self.insecure),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=retry)
        saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        try:
            message, context, _, _ = pull_task_input(client)
            push_message(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message), context)
            # No context: the refused run's state on this node stays as it was.
            push_task_output(client, None, SubStatus.FAILED, reason)
        finally:
            # pull_task_input names the task this process runs; this process runs none.
            TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
            client.close()


def install(app_sha256: str) -> None:
    """Make Flower's SuperExec use :class:`PinnedClientAppExecPlugin`. Refuses a Flower whose
    SuperExec no longer builds its plugin where this expects: a pin that is not enforced must
    not start."""
    import importlib

    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
    if getattr(superexec, "AutoExecPlugin", None) is not AutoExecPlugin:
        raise HyBNNError("This Flower's SuperExec no longer creates its plugin as flwr 1.42 does "
                         "(flwr.supercore.superexec.run_superexec.AutoExecPlugin); the app bundle pin "
                         "cannot be enforced, so the pinned SuperExec does not start.")
    superexec.AutoExecPlugin = functools.partial(PinnedClientAppExecPlugin, app_sha256=app_sha256)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m client.pinned_superexec", add_help=False,
        description="flower-superexec that starts ClientApps only for one app bundle; every other "
                    "option is flower-superexec's (python -m client.pinned_superexec --app-sha256 X --help).")
    parser.add_argument("--app-sha256", metavar="HEX|FILE", required="-h" not in argv and "--help" not in argv,
                        help="the sha256 of the only app bundle whose ClientApps may run (64 hex digits, a "
                             "file holding them, or the .fab file)")
    ours, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print()
    try:
        if ours.app_sha256 is not None:
            pin = read_pin(ours.app_sha256)
            install(pin)
    except HyBNNError as exc:
        print(f"pinned_superexec: error: {exc}", file=sys.stderr)
        return 2
    from flwr.supercore import log
    from flwr.supercore.cli.flower_superexec import flower_superexec

    if ours.app_sha256 is not None:
        log(INFO, "Pinned app bundle: sha256 %s; tasks of any other bundle are refused", pin)
    sys.argv = ["flower-superexec", *rest]
    flower_superexec()
    return 0


if __name__ == "__main__":
    sys.exit(main())
