"""A private network namespace for one deployment on one machine.

Flower's open-source SuperLink serves the Fleet, Control and Runtime APIs on one port,
and the Control API has no account authentication: whoever reaches that port can list
runs, register a SuperNode key and submit an app bundle whose ServerApp runs on this
host and whose ClientApp runs on every SuperNode. A port on loopback is reachable by
every local process. So ``hybnn deploy-local`` starts its SuperLink, SuperNodes and
``flwr`` commands in a network namespace of their own, with only a loopback interface:
a process outside it (any other user's, a container's, a browser's) reaches none of
their ports, and they reach nothing beyond it. Entering the namespace of a running
deployment (``nsenter --net=/proc/PID/ns/net``) needs CAP_SYS_ADMIN over it: root, or
(under a user namespace) the operator's own user, who could as well read its keys.

Linux only. Root enters it directly: :class:`PrivateNetwork` moves only the calling
thread, so the processes it starts (``subprocess`` forks from that thread) live in the
namespace, and the thread goes back to the host's network on exit. Another user runs the
whole command under ``unshare --user --map-root-user --net`` (:func:`reexec_command`),
where the same code runs as root of a user namespace.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import socket
import signal
import struct
import subprocess
import sys

from common.errors import HyBNNError

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
REEXEC_MARKER = "HYBNN_PRIVATE_NETWORK_REEXEC"
"""Set in the environment of a command re-run under ``unshare``, so it does not re-run itself again."""

NETWORKS = ("private", "host")
DEFAULT_NETWORK = "private"

HOST_NETWORK_WARNING = (
    "WARNING: --network host: the SuperLink listens on this machine's loopback, where every local "
    "process can reach it. Its Control API has no account authentication: any local user can list the "
    "runs, register a SuperNode key of their own, and submit an app bundle whose ServerApp runs on this "
    "host and whose ClientApp runs on every SuperNode (docs/security.md).")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def can_unshare_here() -> str | None:
    """None when this process may make a network namespace itself, else why not."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are a Linux feature; this is {sys.platform}"
    if os.geteuid() != 0:
        return "only root (or root of a user namespace) may create a network namespace"
    return None


def loopback_up() -> None:
    """Bring up ``lo`` in the calling thread's network namespace (a new one starts with it down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


class PrivateNetwork:
    """``with PrivateNetwork():`` the calling thread (and every process it starts) is in a
    new network namespace with only ``lo``; on exit the thread is back on the host's network.
    The namespace ends when the last process in it does."""

    def __init__(self) -> None:
        self._host_fd: int | None = None

    def __enter__(self) -> "PrivateNetwork":
        reason = can_unshare_here()
        if reason is not None:
            raise HyBNNError(f"deploy-local cannot make its private network: {reason}. {_choices()}")
        libc = _libc()
        self._host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            os.close(self._host_fd)
            self._host_fd = None
            raise HyBNNError(f"deploy-local cannot make its private network: unshare(CLONE_NEWNET) failed "
                             f"({os.strerror(err)}; a container without CAP_SYS_ADMIN refuses it). {_choices()}")
        try:
            loopback_up()
        except OSError as exc:
            self._restore()
            raise HyBNNError(f"deploy-local made a network namespace but could not bring up its loopback "
                             f"interface ({exc.strerror}). {_choices()}") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._host_fd is None:
            return
        try:
            if _libc().setns(self._host_fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the host's network failed: {os.strerror(err)}")
        finally:
            os.close(self._host_fd)
            self._host_fd = None


def _choices() -> str:
    return ("Run it as root, or as a user who may create user namespaces (Linux: `unshare --user "
            "--map-root-user --net true` succeeds), or pass --network host to accept that every local "
            "process can reach the SuperLink's Control API.")


def reexec_command(argv: list[str]) -> list[str] | None:
    """The command that re-runs ``argv`` (this process's CLI arguments) under a user and network
    namespace of its own, for a user who is not root; None where this process can make the
    namespace itself (root) or already runs re-executed. Raises with the choices where neither works."""
    if can_unshare_here() is None or os.environ.get(REEXEC_MARKER):
        return None
    if not sys.platform.startswith("linux"):
        raise HyBNNError(f"deploy-local's private network needs Linux network namespaces; this is "
                         f"{sys.platform}. Pass --network host to accept that every local process can "
                         f"reach the SuperLink's Control API.")
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
    if unshare is None:
        raise HyBNNError(f"deploy-local's private network needs util-linux's `unshare` as a non-root user, "
                         f"and it is not on PATH. {_choices()}")
    wrapper = [unshare, "--user", "--map-root-user", "--net"]
    try:
        probe = subprocess.run([*wrapper, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HyBNNError(f"deploy-local cannot make its private network: `unshare` did not run ({exc}). "
                         f"{_choices()}") from None
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        raise HyBNNError(f"deploy-local cannot make its private network as user {os.geteuid()}: "
                         f"`unshare --user --map-root-user --net` failed ({why}; some systems restrict "
                         f"unprivileged user namespaces). {_choices()}")
    return [*wrapper, sys.executable, *argv]


def reexec(argv: list[str]) -> int | None:
    """Run ``argv`` (``[sys.executable, *argv]`` is this command) again under :func:`reexec_command`'s namespaces and return its exit status,
    or None where no re-run is needed."""
    command = reexec_command(argv)
    if command is None:
        return None
    print(f"Not root: running again as root of a user namespace with a network of its own "
          f"({' '.join(command[:4])})", file=sys.stderr, flush=True)
    env = {**os.environ, REEXEC_MARKER: "1"}
    proc = subprocess.Popen(command, env=env)
    # Ctrl-C reaches the child from the terminal; SIGTERM is passed on. Either way the child
    # stops its deployment and publishes what it has, and this process waits for it.
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
