"""Writing files so that a crash never leaves a half-written one behind.

:func:`atomic_write_bytes` is the one way the project writes a file;
:func:`check_output_dir` is the check every command that writes runs on its output
folder before the work starts, so that a bad ``--out`` costs seconds, not a training.
A failed write (a full disk, a read-only file system, a path under a file) is a
:class:`~common.errors.HyBNNError` that names the path, the cause and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from common.errors import HyBNNError

PROBE_BYTES = 64 * 1024
"""What :func:`check_output_dir` writes and removes again to prove a folder takes data."""

_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "its folder does not exist",
    errno.EISDIR: "it is a folder",
}


class FileWriteError(HyBNNError):
    """A file or folder could not be written; the message names it and the cause."""


def describe_os_error(exc: OSError) -> str:
    """A short cause for ``exc``: 'the disk is full', 'the file system is read-only', ..."""
    return _CAUSES.get(exc.errno, exc.strerror or str(exc))


def write_error(path: Path | str, exc: OSError, what: str = "") -> FileWriteError:
    """The error to raise when writing ``path`` failed with ``exc``."""
    fix = ("Free some space or write somewhere else" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
           else "Choose a path in a folder you can write to")
    subject = f"{what} {path}" if what else str(path)
    return FileWriteError(
        f"Could not write {subject}: {describe_os_error(exc)} ({exc.strerror or exc}). "
        f"{fix}; nothing was half-written, and an earlier file of that name is unchanged."
    )


def atomic_write_bytes(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file beside ``path``, sync it, then rename it into place.

    Readers see either the old file or the whole new one. A failure (the disk full,
    a read-only file system) removes the temporary file, leaves ``path`` as it was and
    raises :class:`FileWriteError`. ``mode``: the file's permissions (0o600 for a secret),
    set before any byte is written.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        os.fchmod(fd, mode)  # mkstemp's 0600 would hide results from the other users of a shared folder
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise


def save_figure(fig, path: Path | str, **savefig_kwargs) -> Path:
    """Render a matplotlib figure in memory (format from the suffix), then write it atomically."""
    import io

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def make_dir(path: Path | str, what: str = "") -> Path:
    """``mkdir -p path``, with a :class:`FileWriteError` instead of an ``OSError``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # exists, but is not a folder
        raise FileWriteError(
            f"Could not create the folder {what + ' ' if what else ''}{path}: a file of that "
            "name is in the way. Pass a folder path, or move the file."
        ) from exc
    except OSError as exc:
        raise write_error(path, exc, what or "the folder") from exc
    return path


def check_output_dir(path: Path | str, what: str = "--out") -> Path:
    """Check, before any work, that ``path`` is a folder this process can write, or can create.

    Creates nothing: it writes and removes a small probe file in ``path`` or, when
    ``path`` does not exist yet, in its nearest existing ancestor (permission bits
    alone say little when running as root; a write says whether the disk takes data).
    Raises :class:`FileWriteError` naming ``what`` (the option) and the fix.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileWriteError(
            f"{what} {path} is a file, not a folder. Pass a folder path (it is created if missing)."
        )
    existing = path
    while not existing.exists():
        if existing.is_symlink():  # a link to nothing: mkdir would find "a file" in the way
            raise FileWriteError(
                f"{what} {path} cannot be created: {existing} is a symbolic link to "
                f"{os.readlink(existing)}, which does not exist. Create that folder, or remove the link."
            )
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise FileWriteError(
            f"{what} {path} cannot be created: {existing} is a file, not a folder. "
            "Pass a folder path that is free or a folder already."
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".hybnn-write-check.", dir=existing)
    except OSError as exc:
        raise _probe_error(path, existing, what, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise _probe_error(path, existing, what, exc) from exc
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return path


def _probe_error(path: Path, existing: Path, what: str, exc: OSError) -> FileWriteError:
    where = "" if existing == path else f" (checked in {existing}, where it would be created)"
    cause = ("files cannot be created there" if exc.errno == errno.ENOENT
             else describe_os_error(exc))
    fix = ("Free some space or write somewhere else." if exc.errno in (errno.ENOSPC, errno.EDQUOT)
           else "Choose a folder you can write to.")
    return FileWriteError(
        f"{what} {path} is not writable{where}: {cause} "
        f"({exc.strerror or exc}). {fix} Nothing was started."
    )


@contextlib.contextmanager
def keeping_earlier(out_dir: Path | str, names: tuple[str, ...]) -> Iterator[Path | None]:
    """Around writing the files (or folders) ``names`` into ``out_dir``: the earlier ones are first
    moved into ``out_dir/replaced-<UTC time>/`` (yielded; ``None`` when there were none), so that a new
    result never destroys an earlier one. If the writing fails, they are moved back in place."""
    import datetime

    out_dir = Path(out_dir)
    earlier = [name for name in names if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    if not earlier:
        yield None
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    kept = make_dir(out_dir / f"replaced-{stamp}", "for the earlier files")
    moved: list[str] = []
    try:
        for name in earlier:
            os.replace(out_dir / name, kept / name)
            moved.append(name)
        yield kept
    except BaseException as exc:
        for name in moved:  # the earlier files come back over any new one
            os.replace(kept / name, out_dir / name)
        for name in set(names) - set(earlier):  # a new file that had no earlier namesake goes
            new = out_dir / name
            if new.is_dir() and not new.is_symlink():
                shutil.rmtree(new, ignore_errors=True)
            else:
                new.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            kept.rmdir()  # only when empty: nothing earlier is ever deleted
        if isinstance(exc, OSError):
            raise write_error(out_dir, exc, "the earlier results in") from exc
        raise

