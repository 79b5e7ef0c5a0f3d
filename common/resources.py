"""How much memory this process may still use, to refuse a model that cannot fit before building it."""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import HyBNNError


def available_memory_bytes() -> int | None:
    """Memory this process can still allocate: the smaller of the system's available memory
    and the room left under its cgroup limit (containers). ``None`` when neither is known."""
    candidates: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            candidates.append(max(0, int(limit) - int(used)))
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def use_threads(threads: int) -> None:
    """Run torch's intra-op work on ``threads`` threads (``--threads``). HyBNN's models are tiny: on a
    busy machine more threads than one mostly wait for each other (docs/scale.md)."""
    import torch

    if threads < 1:
        raise HyBNNError(f"--threads must be at least 1, got {threads}.")
    torch.set_num_threads(threads)


KEEP_HEAP_BYTES = 128 * 2**20
"""Freed memory glibc keeps for reuse instead of returning it to the system (see :func:`reuse_freed_memory`)."""
HEAP_ALLOCATION_LIMIT_BYTES = 16 * 2**20
"""Allocations up to this size come from the heap instead of their own ``mmap``."""


def reuse_freed_memory() -> bool:
    """Have glibc reuse freed memory for the next tensors instead of mapping fresh pages.

    A BNN training step allocates a dozen 1-2 MiB temporaries; by default glibc may give
    each its own ``mmap`` and unmap it when freed, so every step pays page faults to touch
    fresh zeroed pages: an element-wise op on 2048 x 128 floats took 0.9 ms that way and
    0.09 ms on reused memory. This raises the ``mmap`` threshold and the trim threshold
    (``mallopt``), keeping up to :data:`KEEP_HEAP_BYTES` of freed memory per process. It
    changes no value a computation gives. Returns whether it applied (glibc only; elsewhere
    nothing changes)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: mallopt's option numbers are glibc's
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, HEAP_ALLOCATION_LIMIT_BYTES)
                and libc.mallopt(m_trim_threshold, KEEP_HEAP_BYTES))


def process_tree_rss_bytes(pid: int | None = None) -> int:
    """Resident memory of process ``pid`` (default: this one) and all its descendants, in bytes:
    psutil when installed, else /proc."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * page
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += rss.get(current, 0)
        stack.extend(children.get(current, []))
    return total


def check_fits_in_memory(needed_bytes: int, what: str, fix: str) -> None:
    """Raise :class:`HyBNNError` if ``needed_bytes`` exceed the memory available now."""
    available = available_memory_bytes()
    if available is not None and needed_bytes > available:
        raise HyBNNError(
            f"{what} needs about {_size(needed_bytes)} of memory, but only {_size(available)} "
            f"are available. {fix}"
        )


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
