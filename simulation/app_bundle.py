"""The app bundle (FAB): what ``flwr run`` sends to the SuperLink and every SuperNode.

It holds the git-tracked Python files of the packages the ServerApp and the ClientApp
import (:data:`APP_PACKAGES`) and pyproject.toml, nothing else. Flower 1.42 builds a FAB
from every file in the app folder that passes ``.gitignore``, its built-in patterns and
``[tool.flwr.app] fab-include`` / ``fab-exclude`` (flwr/cli/build.py). A glob such as
``/common/**/*.py`` also takes an untracked ``common/secret.py``; so ``fab-include`` names
each tracked file, generated from ``git ls-files``::

    python -m simulation.app_bundle --pyproject   # rewrite fab-include after adding or removing a file
    python -m simulation.app_bundle --sha256      # the sha256 SuperNodes pin (client/pinned_superexec.py)
    python -m simulation.app_bundle --out DIR     # write the bundle itself

``tests/test_app_bundle.py`` fails when the list in pyproject.toml is stale, and
:func:`build_app_bundle` refuses to build from one. ``flwr run .`` from the checkout and
:func:`build_app_bundle` then build the same bytes (Flower writes a FAB deterministically:
sorted names, a fixed date), and their sha256 is the ``fab_hash`` the SuperLink gives the
run: it hashes the bytes it receives (``hashlib.sha256(fab).hexdigest()``).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable
from pathlib import Path

from common.errors import HyBNNError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGES = ("common", "server", "client")
"""What the apps import (pyproject's components: server.server_app, client.client_app, and common)."""
PYPROJECT = "pyproject.toml"
FAB_INCLUDE_LINE = re.compile(r"^fab-include = \[[^\]]*\]\n", re.MULTILINE)
REGENERATE = "python -m simulation.app_bundle --pyproject"


def tracked_files(project: Path) -> list[str] | None:
    """The files git tracks in ``project`` that are on disk as regular files (POSIX paths,
    sorted), or None where ``project`` is not a git checkout (an installed copy, an image)."""
    try:
        listed = subprocess.run(["git", "-C", str(project), "ls-files", "-z", "--cached"],
                                capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0 or not listed.stdout:
        return None
    names = filter(None, listed.stdout.decode("utf-8", "surrogateescape").split("\0"))
    return sorted(rel for rel in set(names)
                  if (project / rel).is_file() and not (project / rel).is_symlink())


def bundle_files(files: Iterable[str]) -> list[str]:
    """Of ``files``, those the app bundle carries besides pyproject.toml: the Python files
    of :data:`APP_PACKAGES` that Flower's built-in rules keep (they drop ``test_*.py``,
    ``__pycache__``, ...)."""
    from flwr.cli.utils import build_pathspec
    from flwr.common.constant import FAB_EXCLUDE_PATTERNS

    excluded = build_pathspec(FAB_EXCLUDE_PATTERNS)
    return sorted(f for f in files if f.split("/", 1)[0] in APP_PACKAGES and "/" in f and f.endswith(".py")
                  and not excluded.match_file(f))


def fab_include(project: Path = PROJECT_ROOT) -> list[str]:
    """The ``fab-include`` list for ``project``'s tracked files: one anchored path per file."""
    tracked = tracked_files(project)
    if tracked is None:
        raise HyBNNError(f"{project} is not a git checkout (or git is missing): the app bundle's file "
                         f"list is made from `git ls-files`.")
    return ["/" + f for f in bundle_files(tracked)]


def render_fab_include(patterns: list[str]) -> str:
    """The ``fab-include = [...]`` line(s) of pyproject.toml."""
    return "fab-include = [\n" + "".join(f'    "{p}",\n' for p in patterns) + "]\n"


def pyproject_fab_include(project: Path) -> list[str] | None:
    """The ``fab-include`` list in ``project``'s pyproject.toml (None where it has none)."""
    try:
        config = tomllib.loads((project / PYPROJECT).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise HyBNNError(f"Cannot read {project / PYPROJECT}: {exc}.") from None
    value = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    return list(value) if isinstance(value, list) else None


def update_pyproject(project: Path = PROJECT_ROOT) -> bool:
    """Rewrite pyproject.toml's ``fab-include`` from the tracked files; whether it changed."""
    from common.fileio import atomic_write_bytes

    path = project / PYPROJECT
    text = path.read_text(encoding="utf-8")
    if len(FAB_INCLUDE_LINE.findall(text)) != 1:
        raise HyBNNError(f"{path} must hold exactly one `fab-include = [...]` entry under [tool.flwr.app] "
                         f"for {REGENERATE} to rewrite.")
    new = FAB_INCLUDE_LINE.sub(lambda _: render_fab_include(fab_include(project)), text)
    if new == text:
        return False
    atomic_write_bytes(path, new.encode("utf-8"))
    return True


def check_pyproject_current(project: Path) -> None:
    """Refuse a checkout whose ``fab-include`` does not list exactly its tracked app files: the
    bundle would miss a module the apps import, or name a file that is gone."""
    expected = fab_include(project)
    listed = pyproject_fab_include(project)
    if listed != expected:
        missing = sorted(set(expected) - set(listed or []))
        extra = sorted(set(listed or []) - set(expected))
        raise HyBNNError(
            f"pyproject.toml's fab-include does not list the tracked app files of {project} "
            f"(missing: {', '.join(missing) or 'none'}; not tracked or gone: {', '.join(extra) or 'none'}). "
            f"Run `{REGENERATE}` and commit pyproject.toml.")


def build_app_bundle(project: Path, dest: Path) -> Path:
    """Build ``project``'s app bundle with Flower's own builder into folder ``dest``; its path
    (``<publisher>.<name>.<version>.<hash8>.fab``, as ``flwr build`` names it).

    In a git checkout only tracked files are read (and ``fab-include`` must be current);
    elsewhere (a staged copy of the tracked files, an installed copy) the folder's files, which
    ``fab-include`` filters exactly as ``flwr run`` does."""
    from flwr.cli.build import build_fab_from_files, get_fab_filename
    from flwr.cli.utils import collect_files

    from common.fileio import atomic_write_bytes, make_dir

    project = Path(project).resolve()
    tracked = tracked_files(project)
    if tracked is not None:
        check_pyproject_current(project)
        files: dict[str, Path] = {rel: project / rel for rel in tracked}
    else:
        files = collect_files(project)
    try:
        fab, _ = build_fab_from_files(files)
        config = tomllib.loads((project / PYPROJECT).read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # Flower's refusals (bad pattern, config, size) are ValueErrors
        raise HyBNNError(f"Cannot build the app bundle of {project}: {exc}") from None
    path = make_dir(dest, "the app bundle's folder") / get_fab_filename(config, hashlib.sha256(fab).hexdigest())
    atomic_write_bytes(path, fab)
    return path


def stage_tracked_app(project: Path, dest: Path) -> Path:
    """A copy of ``project``'s git-tracked files in ``dest``, for ``flwr run`` to build the
    bundle from, so that a file edited while a run starts cannot make its bundle differ from
    the one pinned. Outside a git checkout it returns ``project`` itself."""
    import shutil

    tracked = tracked_files(project)
    if tracked is None:
        return project
    for rel in tracked:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / rel, dest / rel)
    return dest


def bundle_sha256(path: Path) -> str:
    """The sha256 of an app bundle's bytes: the run's ``fab_hash``."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.app_bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=PROJECT_ROOT, help="the app folder (default: this checkout)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--pyproject", action="store_true", help="rewrite pyproject.toml's fab-include from git ls-files")
    what.add_argument("--sha256", action="store_true", help="print the app bundle's sha256 (the pin for SuperNodes)")
    what.add_argument("--out", type=Path, metavar="DIR", help="write the app bundle into DIR; print its path and sha256")
    args = parser.parse_args(argv)
    try:
        if args.pyproject:
            changed = update_pyproject(args.project)
            count = len(pyproject_fab_include(args.project) or [])
            print(f"{args.project / PYPROJECT}: fab-include lists {count} files ({'updated' if changed else 'unchanged'})")
        elif args.sha256:
            with tempfile.TemporaryDirectory(prefix="hybnn-fab-") as tmp:
                print(bundle_sha256(build_app_bundle(args.project, Path(tmp))))
        else:
            path = build_app_bundle(args.project, args.out)
            print(f"{path}\nsha256 {bundle_sha256(path)}")
    except HyBNNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
