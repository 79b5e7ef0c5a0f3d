"""The app bundle (FAB) is the project's tracked app files, built the same way by `flwr build`,
`flwr run` and `simulation.app_bundle`; the pin a SuperNode's SuperExec holds is its sha256."""

from __future__ import annotations

import hashlib
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest

from common.errors import HyBNNError
from simulation.app_bundle import PROJECT_ROOT

needs_checkout = pytest.mark.skipif(not (PROJECT_ROOT / ".git").exists(),
                                    reason="the project is not a git checkout here")


def _names(fab: Path) -> set[str]:
    with zipfile.ZipFile(fab) as z:
        return set(z.namelist())


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git checkout of the project's tracked files as they are in this working tree."""
    from simulation.app_bundle import stage_tracked_app

    repo = stage_tracked_app(PROJECT_ROOT, tmp_path / "hybnn")
    assert repo != PROJECT_ROOT
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "app")
    return repo


@needs_checkout
def test_pyproject_lists_exactly_the_tracked_app_files():
    """Fails when a module is added or removed without `python -m simulation.app_bundle --pyproject`."""
    from simulation.app_bundle import check_pyproject_current, fab_include, pyproject_fab_include

    listed = pyproject_fab_include(PROJECT_ROOT)
    assert listed == fab_include(PROJECT_ROOT), "run `python -m simulation.app_bundle --pyproject`"
    assert {"/common/__init__.py", "/server/server_app.py", "/client/client_app.py"} <= set(listed)
    assert not any(p.startswith(("/tests/", "/simulation/", "/benchmarks/")) for p in listed)
    check_pyproject_current(PROJECT_ROOT)
    components = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    for ref in components.values():  # the modules pyproject names as the apps are in the bundle
        assert "/" + ref.split(":")[0].replace(".", "/") + ".py" in listed


@needs_checkout
@pytest.mark.timeout(240)
def test_the_bundle_holds_the_tracked_app_files_and_no_untracked_one(checkout, tmp_path):
    from simulation.app_bundle import build_app_bundle, bundle_files, bundle_sha256, main, stage_tracked_app
    from simulation.deploy_local import _bin

    tracked = _git(checkout, "ls-files").split()
    strays = {"common/secret.py": "TOKEN = 'x'\n", "server/notes.md": "private\n", "secret.py": "TOKEN = 'x'\n",
              "runs/fedhybnn/server.json": "{}\n", "client/local_settings.py": "x = 1\n"}
    for rel, text in strays.items():
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text(text)
    untracked = set(_git(checkout, "status", "--porcelain", "--untracked-files=all").split())
    assert untracked >= {"common/secret.py", "client/local_settings.py", "server/notes.md"}  # runs/ is ignored

    fab = build_app_bundle(checkout, tmp_path / "built")
    expected = set(bundle_files(tracked))
    assert {"common/binarize.py", "server/strategy.py", "client/client_app.py"} <= expected
    assert _names(fab) == expected | {"pyproject.toml", ".info/CONTENT"}
    assert not set(strays) & _names(fab)

    # Deterministic, and the same bytes `flwr build` (what `flwr run .` sends) makes of the checkout
    # with its untracked files, and of deploy-local's copy of the tracked files.
    again = build_app_bundle(checkout, tmp_path / "again")
    assert again.read_bytes() == fab.read_bytes()
    (tmp_path / "flwr-build").mkdir()
    built = subprocess.run([_bin("flwr"), "build", "--app", str(checkout)], cwd=tmp_path / "flwr-build",
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    (by_flower,) = (tmp_path / "flwr-build").glob("*.fab")
    assert by_flower.name == fab.name
    assert bundle_sha256(by_flower) == bundle_sha256(fab) == hashlib.sha256(fab.read_bytes()).hexdigest()
    staged = stage_tracked_app(checkout, tmp_path / "staged")
    assert not (staged / "common" / "secret.py").exists()
    assert bundle_sha256(build_app_bundle(staged, tmp_path / "from-staged")) == bundle_sha256(fab)

    assert main(["--project", str(checkout), "--sha256"]) == 0


@needs_checkout
def test_the_printed_sha256_is_the_bundles(checkout, tmp_path, capsys):
    from simulation.app_bundle import build_app_bundle, bundle_sha256, main

    assert main(["--project", str(checkout), "--sha256"]) == 0
    assert capsys.readouterr().out.strip() == bundle_sha256(build_app_bundle(checkout, tmp_path / "b"))


@needs_checkout
def test_a_stale_file_list_is_refused_and_regenerated(checkout, tmp_path, capsys):
    from simulation.app_bundle import build_app_bundle, main

    (checkout / "common" / "new_module.py").write_text("VALUE = 1\n")
    _git(checkout, "add", "common/new_module.py")
    with pytest.raises(HyBNNError, match=r"missing: /common/new_module\.py.*simulation\.app_bundle --pyproject"):
        build_app_bundle(checkout, tmp_path / "stale")
    assert main(["--project", str(checkout), "--sha256"]) == 2
    assert "fab-include does not list" in capsys.readouterr().err

    assert main(["--project", str(checkout), "--pyproject"]) == 0
    assert "(updated)" in capsys.readouterr().out
    assert "common/new_module.py" in _names(build_app_bundle(checkout, tmp_path / "fresh"))
    assert main(["--project", str(checkout), "--pyproject"]) == 0
    assert "(unchanged)" in capsys.readouterr().out

    _git(checkout, "rm", "-qf", "common/new_module.py")  # a listed file that is gone
    with pytest.raises(HyBNNError, match=r"not tracked or gone: /common/new_module\.py"):
        build_app_bundle(checkout, tmp_path / "gone")


# ------------------------------------------------------------------ the pin
def test_the_pin_is_hex_a_file_holding_it_or_the_bundle_itself(tmp_path):
    from client.pinned_superexec import read_pin

    digest = hashlib.sha256(b"bundle").hexdigest()
    assert read_pin(digest.upper()) == digest
    (tmp_path / "pin").write_text(digest + "\n")
    assert read_pin(str(tmp_path / "pin")) == digest
    (tmp_path / "sum").write_text(f"{digest}  hybnn.hybnn.0-1-0.fab\n")  # sha256sum's format
    assert read_pin(str(tmp_path / "sum")) == digest
    (tmp_path / "app.fab").write_bytes(b"bundle")
    assert read_pin(str(tmp_path / "app.fab")) == digest
    for bad in ("", "abc", digest[:-1], digest + "0", str(tmp_path / "missing")):
        with pytest.raises(HyBNNError, match="--app-sha256"):
            read_pin(bad)
    (tmp_path / "junk").write_text("not a hash\n")
    with pytest.raises(HyBNNError, match="does not start with the 64 hex digits"):
        read_pin(str(tmp_path / "junk"))


def test_the_pinned_superexec_refuses_to_start_unpinned(tmp_path, capsys, monkeypatch):
    import importlib

    from client import pinned_superexec

    assert pinned_superexec.main(["--app-sha256", "nope", "--runtime-api-address", "127.0.0.1:1"]) == 2
    assert "--app-sha256 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no pin: argparse refuses
        pinned_superexec.main(["--runtime-api-address", "127.0.0.1:1"])
    # A Flower whose SuperExec no longer builds its plugin where the pin is installed: refused.
    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
    monkeypatch.setattr(superexec, "AutoExecPlugin", object)
    with pytest.raises(HyBNNError, match="cannot be enforced"):
        pinned_superexec.install("0" * 64)


def test_install_makes_flowers_superexec_build_the_pinned_plugin(monkeypatch):
    import importlib

    from flwr.supercore.superexec.executor import LaunchResultStatus

    from client.pinned_superexec import PinnedClientAppExecPlugin, install

    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
    monkeypatch.setattr(superexec, "AutoExecPlugin", superexec.AutoExecPlugin)  # undone after the test
    install("a" * 64)
    launched = []

    class Executor:
        def launch(self, spec):
            launched.append(spec)
            return type("R", (), {"status": LaunchResultStatus.ACCEPTED})()

    plugin = superexec.AutoExecPlugin(runtime_api_address="127.0.0.1:1", insecure=True, root_certificates_path=None,
                                      executor=Executor())
    assert isinstance(plugin, PinnedClientAppExecPlugin) and plugin.app_sha256 == "a" * 64
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611

    plugin.launch_task("token", Task(task_id=1, type="flwr-clientapp", run_id=5, fab_hash="a" * 64))
    assert [s.fab_hash for s in launched] == ["a" * 64]
    # Another bundle, or none: never launched. With no SuperNode to answer, the refusal cannot be
    # sent either, which is said, and the task is left to expire.
    for task_id, fab_hash in ((2, "b" * 64), (3, "b" * 64), (4, None)):
        result = plugin.launch_task("token", Task(task_id=task_id, type="flwr-clientapp", run_id=6, fab_hash=fab_hash))
        assert result.status == LaunchResultStatus.FAILED and "a" * 64 in result.message
    assert len(launched) == 1
    assert plugin.refused_runs == {6}
