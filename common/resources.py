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
