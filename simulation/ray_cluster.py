"""``hybnn federate --ray-address HOST:PORT``: the simulation joins a running Ray cluster.

Flower's Ray backend hands ``backend_config["init_args"]`` to ``ray.init``; with an
``address`` there it joins that cluster instead of starting a private one, and its
actor pool holds as many simulated clients as the cluster's CPUs allow, on every node.

``ray.init`` waits minutes for a GCS that does not answer, so the address is checked
first, in seconds: its form (:func:`parse_ray_address`), then a TCP connection and one
call to the GCS's node table (:func:`check_ray_cluster`), which also tells how many
nodes and CPUs the cluster has. The worker that runs the simulation gives up when it
has not joined within :data:`JOIN_TIMEOUT_S` (:func:`exit_unless_joined`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass

from common.errors import HyBNNError

CONNECT_TIMEOUT_S = 5.0
"""Longest wait for the TCP connection and, again, for the GCS's answer."""
JOIN_TIMEOUT_S = 90.0
"""Longest wait of the simulation worker for ``ray.init`` to join the cluster."""
JOIN_FAILED_EXIT = 3
"""The worker's exit status when it could not join the cluster."""

_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_FORM = ("HOST:PORT, the address of the head node's GCS as `ray start --head --port PORT` prints it "
         "(e.g. 10.0.0.5:6379)")


@dataclass(frozen=True)
class RayCluster:
    """What the GCS said about the cluster."""

    address: str
    nodes: int
    cpus: float

    def describe(self) -> str:
        return f"Ray cluster at {self.address}: {self.nodes} node(s), {self.cpus:g} CPU(s)"


def parse_ray_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPV6]:PORT`` for an IPv6 address) as ``(host, port)``; a HyBNNError otherwise."""
    shown = repr(text)
    if not isinstance(text, str) or not text.strip():
        raise HyBNNError(f"--ray-address {shown} is empty; use {_FORM}.")
    text = text.strip()
    if "://" in text:
        raise HyBNNError(f"--ray-address {shown} has a scheme; Ray Client (ray://) and other URLs are not "
                         f"supported. Use {_FORM}, and run `hybnn federate` on a node of the cluster.")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise HyBNNError(f"--ray-address {shown} is not [IPV6]:PORT; use {_FORM}.")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HyBNNError(f"--ray-address {shown}: {host!r} is not an IPv6 address.") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise HyBNNError(f"--ray-address {shown} has no port; use {_FORM}.")
        if not host:
            raise HyBNNError(f"--ray-address {shown} has no host; use {_FORM}.")
        if ":" in host:
            raise HyBNNError(f"--ray-address {shown}: write an IPv6 address in brackets, [ADDRESS]:PORT.")
        if not _HOST_NAME.match(host):
            raise HyBNNError(f"--ray-address {shown}: {host!r} is not a host name or IP address; use {_FORM}.")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise HyBNNError(f"--ray-address {shown}: the port {port_text!r} is not a number from 1 to 65535.")
    return host, int(port_text)


def check_ray_cluster(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> RayCluster:
    """Ask the GCS at ``address`` for its nodes, within about ``2 * timeout_s`` seconds.

    A HyBNNError when nothing answers, when what answers is no Ray GCS, or when the
    cluster has no live node with a CPU for a simulated client.
    """
    host, port = parse_ray_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = (f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError)
                  else (exc.strerror or str(exc)).lower())
        raise HyBNNError(f"The Ray cluster at {address} does not answer ({reason}). "
                         f"Start it with `ray start --head --port {port}` on {host}, or check the address "
                         "and the firewall.") from None
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    channel = grpc.insecure_channel(target)
    try:
        reply = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
            gcs_service_pb2.GetAllNodeInfoRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        raise HyBNNError(f"{address} answers, but not as a Ray cluster's GCS ({exc.code().name}: "
                         f"{exc.details()}). Give the port of `ray start --head --port PORT`.") from None
    finally:
        channel.close()
    alive = [n for n in reply.node_info_list if n.state == n.ALIVE]
    cpus = sum(float(n.resources_total.get("CPU", 0.0)) for n in alive)
    if cpus < 1:
        raise HyBNNError(f"The Ray cluster at {address} has {len(alive)} live node(s) and {cpus:g} CPUs; each "
                         "simulated client needs 1 CPU. Start nodes with `ray start --address "
                         f"{address} --num-cpus N`.")
    return RayCluster(address=address, nodes=len(alive), cpus=cpus)


def backend_init_args(ray_address: str | None, cpus: int, logging_level: int) -> dict:
    """``init_args`` of Flower's Ray backend (passed to ``ray.init``): a private Ray instance
    with ``cpus`` CPUs, or the cluster at ``ray_address`` (whose nodes declare their own CPUs)."""
    args = {"logging_level": logging_level, "log_to_driver": True}
    if ray_address is None:
        return {"num_cpus": cpus, **args}
    return {"address": ray_address, **args}


def exit_unless_joined(ray_address: str, timeout_s: float = JOIN_TIMEOUT_S) -> threading.Event:
    """In the simulation worker: end the process with :data:`JOIN_FAILED_EXIT` if Ray has not
    joined the cluster within ``timeout_s``. Set the returned event to stop watching."""
    done = threading.Event()

    def watch() -> None:
        import ray

        deadline = timeout_s
        while deadline > 0 and not done.is_set():
            if ray.is_initialized():
                return
            done.wait(0.5)
            deadline -= 0.5
        if not done.is_set() and not ray.is_initialized():
            print(f"hybnn: could not join the Ray cluster at {ray_address} within {timeout_s:g} s; run "
                  "`hybnn federate` on a node of that cluster (`ray start --address ...` there first).",
                  file=sys.stderr, flush=True)
            os._exit(JOIN_FAILED_EXIT)

    threading.Thread(target=watch, name="ray-join-watchdog", daemon=True).start()
    return done
