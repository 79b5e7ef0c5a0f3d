"""Which exact product the BNN's first layer uses on this machine: int8 or float32.

The first layer multiplies the encoder's +-1 codes by +-1 weights. Every partial sum is
a whole number below 2^24, so the float32 product is exact, and so is the int8 product
(``torch._int_mm``, int32 sums): both give the same logits, bit for bit. Which is faster
depends on the CPU and on how torch was built. With 8-bit dot-product instructions
(AVX-512 VNNI, AVX-VNNI) torch hands ``_int_mm`` to oneDNN and it runs several times
faster than float32; without them torch falls back to a plain loop that is about 50
times slower than float32 (docs/reproduce.md, "Which product: measured on each machine").

So the path is measured, not assumed: :func:`product_choice` times both products on
the first layer's shape once (a few tens of milliseconds) and keeps the faster. The
answer is cached per machine (CPU model and flags), torch version and thread count in
``$HYBNN_CACHE_DIR`` (default ``~/.cache/hybnn``), so later processes read it instead
of measuring. ``HYBNN_PRODUCT=int8`` or ``float32`` overrides the probe; ``auto`` (or
unset) probes. The same choice serves centralized training, the federated client,
continual learning and the scale simulation, since all of them train
:class:`common.bnn.model.BNN`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.errors import HyBNNError
from common.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

PRODUCTS = ("int8", "float32")
"""The exact products the first layer can use."""
ENV_OVERRIDE = "HYBNN_PRODUCT"
"""``int8``, ``float32`` or ``auto`` (the default: measure)."""
ENV_CACHE_DIR = "HYBNN_CACHE_DIR"
CACHE_VERSION = 1

PROBE_SHAPE = (2048, 200, 512)
"""(batch, inputs, outputs) timed by the probe: the training batch of the BNN recipe, the
200-bit code and the widest default hidden layer (all10's 512)."""
PROBE_REPEATS = 5


@dataclass(frozen=True)
class ProductChoice:
    """The product in use and why."""

    path: str
    """``int8`` or ``float32``."""
    reason: str
    """``probe``, ``cached probe`` or ``HYBNN_PRODUCT``."""
    int8_ms: float | None = None
    """Best probe time of one int8 product of :data:`PROBE_SHAPE`, in milliseconds."""
    float32_ms: float | None = None

    def describe(self) -> str:
        """One line for a log or a report: the path, and the measurement behind it."""
        if self.int8_ms is None or self.float32_ms is None:
            return f"BNN first-layer product: {self.path} ({self.reason})"
        batch, n_in, n_out = PROBE_SHAPE
        return (f"BNN first-layer product: {self.path} ({self.reason}: int8 {self.int8_ms:.2f} ms, "
                f"float32 {self.float32_ms:.2f} ms for a {batch}x{n_in} by {n_in}x{n_out} product "
                f"on {cpu_model()}, {torch.get_num_threads()} thread(s))")

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The CPU's feature flags (``/proc/cpuinfo``), sorted; empty where the system does not list them."""
    flags = _cpuinfo().get("flags") or _cpuinfo().get("Features") or ""
    return sorted(set(flags.split()))


@functools.cache
def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return info
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in info:
            info[key.strip()] = value.strip()
    return info


def machine_key() -> str:
    """What the measured answer depends on: CPU, torch build, oneDNN on or off, threads."""
    parts = [cpu_model(), " ".join(cpu_flags()), platform.machine(), torch.__version__,
             str(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
             str(torch.get_num_threads())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_path() -> Path:
    root = os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "hybnn"
    return Path(root) / "bnn-product.json"


def measure() -> tuple[float, float]:
    """Best-of times (ms) of the int8 and the float32 product of :data:`PROBE_SHAPE`."""
    batch, n_in, n_out = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (batch, n_in), generator=generator, dtype=torch.int8).mul_(2).sub_(1)
    w = torch.randint(0, 2, (n_out, n_in), generator=generator, dtype=torch.int8).mul_(2).sub_(1)
    wt = w.t().contiguous()
    xf, wf = x.float(), w.float()
    products = {
        "int8": lambda: torch._int_mm(x, wt),
        "float32": lambda: torch.nn.functional.linear(xf, wf),
    }
    if not torch.equal(products["int8"]().float(), products["float32"]()):
        raise HyBNNError("The int8 and float32 products of +-1 matrices disagree on this machine; "
                         "report the torch version and CPU (HYBNN_PRODUCT=float32 avoids the int8 path).")
    best = {}
    for name, run in products.items():
        run()  # warm-up: oneDNN builds its kernel on the first call
        times = []
        for _ in range(PROBE_REPEATS):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
            if times[-1] > 0.5:  # a slow fallback: one sample says enough
                break
        best[name] = min(times) * 1e3
    return best["int8"], best["float32"]


def _read_cache(path: Path, key: str) -> ProductChoice | None:
    """The cached choice for ``key``, or None; a damaged or foreign cache is ignored with a log line."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("Ignoring the BNN product cache %s: it could not be read (%s); measuring again.", path, exc)
        return None
    machines = record.get("machines") if isinstance(record, dict) else None
    if not isinstance(machines, dict):
        log.warning("Ignoring the BNN product cache %s: it is not a product cache; measuring again.", path)
        return None
    entry = machines.get(key)
    if entry is None:
        return None
    try:
        path_name, int8_ms, float32_ms = entry["path"], float(entry["int8_ms"]), float(entry["float32_ms"])
    except (KeyError, TypeError, ValueError):
        path_name, int8_ms, float32_ms = None, 0.0, 0.0
    if path_name not in PRODUCTS or not (int8_ms > 0 and float32_ms > 0):
        log.warning("Ignoring the BNN product cache %s: its entry for this machine is malformed; "
                    "measuring again.", path)
        return None
    if path_name != ("int8" if int8_ms < float32_ms else "float32"):
        log.warning("Ignoring the BNN product cache %s: its choice contradicts its own times; "
                    "measuring again.", path)
        return None
    return ProductChoice(path_name, "cached probe", int8_ms, float32_ms)


def _write_cache(path: Path, key: str, choice: ProductChoice) -> None:
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or record.get("version") != CACHE_VERSION:
            record = {}
    except (OSError, ValueError):
        record = {}
    machines = record.get("machines") if isinstance(record.get("machines"), dict) else {}
    machines[key] = {"path": choice.path, "int8_ms": choice.int8_ms, "float32_ms": choice.float32_ms,
                     "cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"version": CACHE_VERSION, "machines": machines}, indent=1).encode())
    except (OSError, HyBNNError) as exc:
        log.warning("Could not cache the BNN product choice in %s (%s); the next process measures again.",
                    path, exc)


_chosen: dict[tuple, ProductChoice] = {}
"""This process's choices, by what :func:`machine_key` can change within a process, so the
forward pass looks its path up without hashing the CPU's flags."""


def product_choice() -> ProductChoice:
    """The product the first layer uses in this process (measured or read once, then kept)."""
    override = os.environ.get(ENV_OVERRIDE, "auto").strip().lower() or "auto"
    if override not in (*PRODUCTS, "auto"):
        raise HyBNNError(f"{ENV_OVERRIDE}={os.environ[ENV_OVERRIDE]!r} is not a product; "
                         f"use one of {', '.join(PRODUCTS)} or auto (measure which is faster).")
    if override != "auto":
        return ProductChoice(override, ENV_OVERRIDE)
    memo = (torch.get_num_threads(), torch.backends.mkldnn.enabled, os.environ.get(ENV_CACHE_DIR))
    if memo in _chosen:
        return _chosen[memo]
    key = machine_key()
    path = cache_path()
    choice = _read_cache(path, key)
    if choice is None:
        int8_ms, float32_ms = measure()
        choice = ProductChoice("int8" if int8_ms < float32_ms else "float32", "probe", int8_ms, float32_ms)
        _write_cache(path, key, choice)
    log.info("%s", choice.describe())
    _chosen[memo] = choice
    return choice


def uses_int8() -> bool:
    """Whether the first layer multiplies int8 codes in integers here."""
    return product_choice().path == "int8"
