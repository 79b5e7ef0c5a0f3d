"""Inputs checked before the work starts, and the integrity of what is written and cached.

Every case goes through the command line as a user would meet it
(``simulation.cli.main`` returns 2 and prints one error line) and, where it applies,
through the library. A full or read-only disk is a real tmpfs mounted for the test
when this process may mount one (root); otherwise the disk is emulated by making
``fsync`` fail with ENOSPC, or ``mkstemp`` with EROFS, for files under that folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import common.fileio as fileio
from common.data import mnist as data
from common.bnn.model import BNN, BNNConfig
from common.bnn.store import load_bnn, save_bnn
from common.errors import HyBNNError
from common.fileio import FileWriteError, atomic_write_bytes, check_output_dir
from common.bnn.training import MAX_EPOCHS, TrainConfig, fit
from simulation.cli import main
from tests.conftest import fixed_encoder

HUGE = str(10**20)


# ------------------------------------------------------------------ helpers
def cli(capsys, *args) -> tuple[int, str]:
    """Run ``hybnn ARGS`` in this process; return (exit status, the one error line or '')."""
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err
    assert len(errors) <= 1, err
    return rc, errors[0] if errors else ""


class SmallDisk:
    """Folders on tiny disks: a real tmpfs where mounting is allowed, else an emulation."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.mounts: list[Path] = []
        self.budgets: dict[Path, int] = {}
        self.read_only: list[Path] = []
        self.patched = False

    def make(self, name: str, size_kib: int, *, read_only: bool = False, fill: bool = False) -> Path:
        path = self.root / name
        path.mkdir()
        opts = f"size={size_kib}k" + (",ro" if read_only else "")
        mounted = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0
        if mounted:
            self.mounts.append(path)
            if fill:
                with open(path / "filler", "wb", buffering=0) as f:
                    try:
                        while True:
                            f.write(b"\0" * 4096)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
            return path
        self._emulate()
        if read_only:
            self.read_only.append(path)
        else:
            self.budgets[path] = 0 if fill else size_kib * 1024
        return path

    def _owner(self, path: Path, folders) -> Path | None:
        path = Path(path).resolve()
        return next((f for f in folders if f.resolve() in (path, *path.parents)), None)

    def _emulate(self) -> None:
        if self.patched:
            return
        self.patched = True
        real_mkstemp, real_fsync = fileio.tempfile.mkstemp, fileio.os.fsync
        opened: dict[int, Path] = {}

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and self._owner(dir, self.read_only):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
            fd, name = real_mkstemp(*args, dir=dir, **kwargs)
            opened[fd] = Path(name)
            return fd, name

        def fsync(fd):
            owner = self._owner(opened.get(fd, Path("/")), self.budgets)
            if owner is not None:
                others = sum(p.stat().st_size for p in owner.rglob("*") if p.is_file() and p != opened[fd])
                if others + os.fstat(fd).st_size > self.budgets[owner]:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        self.monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)
        self.monkeypatch.setattr(fileio.os, "fsync", fsync)

    def close(self) -> None:
        for path in self.mounts:
            subprocess.run(["umount", str(path)], check=True)


@pytest.fixture()
def small_disk(tmp_path, monkeypatch):
    disk = SmallDisk(tmp_path, monkeypatch)
    yield disk
    disk.close()


@pytest.fixture()
def no_work(monkeypatch):
    """Make every long-running entry point fail the test if it is reached."""
    import common.edge.deploy
    import common.bnn.pipeline
    import common.encoder.vae
    import simulation.deploy_local
    import simulation.federate
    import simulation.reproduce

    def reached(*_args, **_kwargs):
        raise AssertionError("the work started although the input check should have stopped it")

    for module, name in ((common.bnn.pipeline, "train_hybnn"), (common.encoder.vae, "train_vae"),
                         (common.edge.deploy, "export_model"), (simulation.federate, "federate"),
                         (simulation.deploy_local, "deploy_local"), (simulation.reproduce, "reproduce")):
        monkeypatch.setattr(module, name, reached)


@pytest.fixture()
def encoder(tmp_path) -> Path:
    return fixed_encoder(tmp_path / "encoder")


def command_with_out(command: str, out: Path, encoder: Path, model: Path) -> list[str]:
    return {
        "train": ["train", "--task", "0v1", "--encoder", encoder, "--out", out],
        "pretrain": ["pretrain", "--out", out],
        "reproduce": ["reproduce", "--profile", "quick", "--out", out],
        "federate": ["federate", "--encoder", encoder, "--out", out],
        "deploy-local": ["deploy-local", "--encoder", encoder, "--out", out],
        "export": ["export", "--model", model, "--out", out],
    }[command]


COMMANDS_THAT_WRITE = ["train", "pretrain", "reproduce", "federate", "deploy-local", "export"]


# ------------------------------------------------------------------ the output folder
@pytest.mark.parametrize("command", COMMANDS_THAT_WRITE)
def test_an_out_that_is_a_file_stops_every_command_before_the_work(command, tmp_path, capsys, no_work, encoder):
    a_file = tmp_path / "results.txt"
    a_file.write_text("earlier results")
    rc, error = cli(capsys, *command_with_out(command, a_file, encoder, tmp_path / "model"))
    assert rc == 2 and f"--out {a_file} is a file, not a folder" in error
    assert a_file.read_text() == "earlier results"


@pytest.mark.parametrize("command", COMMANDS_THAT_WRITE)
def test_an_out_on_a_full_disk_stops_every_command_before_the_work(command, small_disk, capsys, no_work, encoder,
                                                                   tmp_path):
    full = small_disk.make("full", 64, fill=True)
    rc, error = cli(capsys, *command_with_out(command, full / "run", encoder, tmp_path / "model"))
    assert rc == 2 and "is not writable" in error and "the disk is full" in error
    assert "Free some space" in error
    assert not (full / "run").exists()


@pytest.mark.parametrize("make_out, cause", [
    (lambda tmp, disk: disk.make("ro", 64, read_only=True) / "run", "read-only"),
    (lambda tmp, disk: Path("/proc/hybnn-run"), "files cannot be created there"),
    (lambda tmp, disk: (tmp / "a-file").write_text("x") and tmp / "a-file" / "run", "a-file is a file"),
])
def test_an_out_that_cannot_be_written_stops_train_before_training(make_out, cause, tmp_path, small_disk,
                                                                   capsys, no_work, encoder):
    out = make_out(tmp_path, small_disk)
    rc, error = cli(capsys, "train", "--task", "0v1", "--encoder", encoder, "--out", out)
    assert rc == 2 and f"--out {out}" in error and cause in error


def test_the_check_writes_nothing_and_accepts_a_new_folder(tmp_path):
    out = tmp_path / "new" / "deeper"
    assert check_output_dir(out) == out
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_during_the_run_keeps_the_earlier_model(mnist_root, encoder, small_disk, capsys):
    """The check passes (64 KiB free) but the new model (100 KiB) does not fit: a clear error,
    the earlier model left whole, no temporary file."""
    disk = small_disk.make("small", 96)
    out = disk / "model"
    earlier = BNN(BNNConfig(hidden=(8,)))
    save_bnn(earlier, out, meta={"earlier": True})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, error = cli(capsys, "train", "--task", "0v1", "--encoder", encoder, "--data-root", mnist_root,
                    "--epochs", 1, "--hidden", 128, "--out", out)
    assert rc == 2 and "Could not write" in error and "the disk is full" in error
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    model, sidecar = load_bnn(out)
    assert sidecar["meta"] == {"earlier": True} and model.config.hidden == (8,)


def test_atomic_write_on_a_full_disk_leaves_the_old_file_and_no_temp(small_disk):
    disk = small_disk.make("tiny", 16)
    target = disk / "results.json"
    atomic_write_bytes(target, b"old results")
    with pytest.raises(FileWriteError, match="the disk is full") as info:
        atomic_write_bytes(target, b"x" * 64 * 1024)
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"old results"
    assert sorted(p.name for p in disk.iterdir()) == ["results.json"]


def test_atomic_write_on_a_read_only_disk_is_a_clear_error(small_disk):
    disk = small_disk.make("ro", 16, read_only=True)
    with pytest.raises(FileWriteError, match="read-only"):
        atomic_write_bytes(disk / "x.json", b"{}")


def test_atomic_write_cleans_up_when_the_rename_fails(tmp_path):
    (tmp_path / "taken").mkdir()  # a folder where the file should go: the final rename fails
    with pytest.raises(FileWriteError, match="taken"):
        atomic_write_bytes(tmp_path / "taken", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# ------------------------------------------------------------------ impossible sizes
def test_batch_size_one_is_refused_before_the_work(capsys, no_work, encoder, tmp_path):
    rc, error = cli(capsys, "train", "--task", "0v1", "--encoder", encoder, "--batch-size", 1,
                    "--out", tmp_path / "out")
    assert rc == 2 and "batch size (--batch-size) is 1" in error and "batch norm" in error
    assert not (tmp_path / "out").exists()
    with pytest.raises(HyBNNError, match="at least 2"):
        TrainConfig(batch_size=1)


def test_federate_refuses_batch_size_one_and_huge_epochs_before_the_run(capsys, encoder, tmp_path):
    for option, value, expected in (("--batch-size", 1, "batch size (--batch-size) is 1"),
                                    ("--local-epochs", HUGE, f"--local-epochs is 1e+20; at most {MAX_EPOCHS}"),
                                    ("--rounds", HUGE, f"--rounds is 1e+20; at most {MAX_EPOCHS}"),
                                    ("--rounds", 5001, "the centralized reference's epochs")):
        rc, error = cli(capsys, "federate", "--encoder", encoder, "--out", tmp_path / "fed", option, value)
        assert rc == 2 and expected in error, error
        assert not (tmp_path / "fed").exists()


def test_a_batch_larger_than_the_data_trains_on_all_of_it():
    x = torch.from_numpy(np.random.default_rng(0).choice([-1.0, 1.0], size=(50, 200)).astype(np.float32))
    y = (x[:, 0] > 0).long()
    model = BNN()
    start = [p.detach().clone() for p in model.parameters()]
    result = fit(model, x, y, TrainConfig(epochs=3, batch_size=2048), progress=False)
    assert len(result.history) == 3 and all(0 < h["loss"] for h in result.history)
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
    with pytest.raises(HyBNNError, match="at least 2"):
        fit(BNN(), x[:1], y[:1], TrainConfig(epochs=1), progress=False)


@pytest.mark.parametrize("args, expected", [
    (["train", "--task", "0v1", "--epochs", HUGE], f"from 1 to {MAX_EPOCHS}"),
    (["train", "--task", "0v1", "--hidden", str(10**9)], "of memory, but only"),
    (["train", "--task", "0v1", "--hidden", f"128,{10**12}"], "of memory, but only"),
    (["train", "--task", "0v1", "--seed", HUGE], "Option --seed: seed="),
    (["pretrain", "--epochs", HUGE], f"from 1 to {MAX_EPOCHS}"),
    (["baseline", "--model", "fp-cnn", "--task", "0v1", "--epochs", HUGE], f"from 1 to {MAX_EPOCHS}"),
])
def test_impossible_sizes_are_clear_errors(args, expected, capsys, tmp_path, encoder, monkeypatch):
    import common.bnn.pipeline
    import common.encoder.vae

    def reached(*_args, **_kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(common.bnn.pipeline, "fit", reached)
    monkeypatch.setattr(common.encoder.vae, "train_vae", reached)
    extra = ["--encoder", encoder] if args[0] == "train" else []
    extra += ["--out", tmp_path / "out"] if args[0] in ("train", "pretrain") else []
    rc, error = cli(capsys, *args, *extra)
    assert rc == 2 and expected in error, error


def test_library_configs_refuse_what_the_command_line_refuses():
    from common.encoder.vae import VAETrainConfig

    for bad in (dict(epochs=0), dict(epochs=MAX_EPOCHS + 1), dict(batch_size=1), dict(lr=float("nan")),
                dict(lr=-1.0), dict(seed=2**64), dict(final_lr_fraction=2.0)):
        with pytest.raises(HyBNNError):
            TrainConfig(**bad)
        with pytest.raises(HyBNNError):
            VAETrainConfig(**bad)
    with pytest.raises(HyBNNError, match="memory"):
        BNN(BNNConfig(hidden=(10**9,)))
    with pytest.raises(HyBNNError, match="positive whole numbers"):
        BNNConfig(hidden=(0,))


# ------------------------------------------------------------------ malformed files
def data_root_with(tmp_path: Path, mnist_root: Path, replace: dict[str, bytes]) -> Path:
    """A data root whose MNIST files are the real ones (linked), except those in ``replace``."""
    raw = data.raw_dir(tmp_path / "data")
    raw.mkdir(parents=True)
    for name in data.IDX_FILES.values():
        if name in replace:
            (raw / name).write_bytes(replace[name])
        else:
            (raw / name).symlink_to(data.raw_dir(mnist_root) / name)
    return tmp_path / "data"


def test_a_labels_file_cut_to_6_bytes_is_explained(tmp_path, mnist_root, capsys):
    name = data.IDX_FILES["test-labels"]
    root = data_root_with(tmp_path, mnist_root, {name: (data.raw_dir(mnist_root) / name).read_bytes()[:6]})
    rc, error = cli(capsys, "data", "--data-root", root)
    assert rc == 2
    assert str(data.raw_dir(root) / name) in error and "truncated inside its header" in error
    assert f"hybnn data --data-root {root}" in error


def test_randomized_pixels_are_refused_with_how_to_restore(tmp_path, mnist_root, capsys):
    name = data.IDX_FILES["test-images"]
    original = (data.raw_dir(mnist_root) / name).read_bytes()
    pixels = np.random.default_rng(0).integers(0, 256, size=len(original) - 16, dtype=np.uint8)
    root = data_root_with(tmp_path, mnist_root, {name: original[:16] + pixels.tobytes()})
    rc, error = cli(capsys, "data", "--data-root", root)
    assert rc == 2 and str(data.raw_dir(root) / name) in error and data.IDX_SHA256[name] in error
    assert f"delete it and run `hybnn data --data-root {root}`" in error
    with pytest.raises(HyBNNError, match="changed or damaged"):
        data.load_mnist(root, "train")  # any use of the data root is refused, not only `hybnn data`


def test_the_pinned_hashes_are_the_files_the_pipeline_has(mnist_root):
    for name, expected in data.IDX_SHA256.items():
        assert data.sha256_file(data.raw_dir(mnist_root) / name) == expected


@pytest.mark.parametrize("content, expected", [
    (b"", "0 bytes long"),
    (b"\x00\x00", "shorter than the 4-byte magic"),
    (b"\x08\x03\x00\x00" + bytes(8), "magic number starts with 0803"),
    (b"\x00\x00\x0d\x01" + (4).to_bytes(4, "big") + bytes(16), "type code is 0x0d"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"\x00\x00\x08\x09" + bytes(36), "9 dimensions"),
    (b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big"), "truncated inside its header"),
    (b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(7), "truncated: 7 bytes of data"),
    (b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(12), "longer than its header says"),
    (b"\x00\x00\x08\x03" + (2**32 - 1).to_bytes(4, "big") * 3, "truncated: 0 bytes"),
])
def test_every_malformed_idx_file_is_one_clear_error(tmp_path, content, expected):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(HyBNNError) as info:
        data.read_idx(path)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_a_rewritten_feature_cache_is_rebuilt_through_the_cli(tmp_path, mnist_root, encoder, capsys, caplog):
    """Codes rewritten in place (right shape, old hash) are noticed and computed again."""
    from common.encoder.artifact import load_encoder_artifact
    from common.encoder.features import cache_digest, cache_path, load_codes

    artifact = load_encoder_artifact(encoder)
    load_codes(artifact, mnist_root, "train", progress=False)
    codes, labels = load_codes(artifact, mnist_root, "test", progress=False)
    root = data_root_with(tmp_path, mnist_root, {})
    for split in ("train", "test"):
        cache_path(artifact, root, split).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cache_path(artifact, mnist_root, split), cache_path(artifact, root, split))
    damaged = cache_path(artifact, root, "test")
    np.savez(damaged, codes=codes[::-1].copy(), labels=labels, version=np.int64(2),
             sha256=np.str_(cache_digest(codes, labels)))
    train_stamp = cache_path(artifact, root, "train").stat().st_mtime_ns
    time.sleep(0.01)
    with caplog.at_level("WARNING", logger="common.encoder.features"):
        rc, _ = cli(capsys, "extract", "--encoder", encoder, "--data-root", root)
    assert rc == 0
    assert f"Feature cache {damaged} is stale or corrupt" in caplog.text and "rebuilding" in caplog.text
    assert str(cache_path(artifact, root, "train")) not in caplog.text
    with np.load(damaged) as rebuilt:
        assert np.array_equal(rebuilt["codes"], codes)
    assert cache_path(artifact, root, "train").stat().st_mtime_ns == train_stamp
