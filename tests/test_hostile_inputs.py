"""Hostile and careless inputs met through the command line: files that are not files,
credentials that do not belong together, values at the edge of their range.

Each case expects one clear error line and exit status 2 (``cli`` asserts no traceback),
or the correct result; never a hang, a silent wrong answer or a lost earlier file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.data import mnist as data
from tests.test_inputs import cli, data_root_with


# ------------------------------------------------------------------ MNIST files that are not files
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["folder", "fifo"])
@pytest.mark.parametrize("key", ["test-images", "train-labels"])
def test_an_idx_path_that_is_not_a_regular_file_is_refused_without_reading_it(kind, key, tmp_path, mnist_root, capsys):
    """A folder would be a traceback; a pipe (or a link to /dev/zero) would block or read forever."""
    name = data.IDX_FILES[key]
    root = data_root_with(tmp_path, mnist_root, {})
    target = data.raw_dir(root) / name
    target.unlink()
    if kind == "folder":
        target.mkdir()
    else:
        os.mkfifo(target)
    rc, error = cli(capsys, "data", "--data-root", root)
    assert rc == 2
    assert str(target) in error and "not a regular file" in error
    assert f"hybnn data --data-root {root}" in error


# ------------------------------------------------------------------ hybnn certs and deploy-local --certs
@pytest.mark.parametrize("make_out", [
    lambda tmp: tmp / "a-file" / "creds",       # a path under a file
    lambda tmp: Path("/dev/full") / "creds",    # under a device
])
def test_certs_into_a_folder_that_cannot_be_made_is_a_clear_error(make_out, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    rc, error = cli(capsys, "certs", "--out", make_out(tmp_path))
    assert rc == 2 and str(make_out(tmp_path)) in error


def test_certs_on_a_read_only_folder_is_a_clear_error(tmp_path, capsys):
    from tests.test_inputs import SmallDisk

    disk = SmallDisk(tmp_path, pytest.MonkeyPatch())
    try:
        ro = disk.make("ro", 64, read_only=True)
        rc, error = cli(capsys, "certs", "--out", ro / "creds")
        assert rc == 2 and "read-only" in error
    finally:
        disk.close()


def test_certs_force_with_fewer_supernodes_moves_every_earlier_key_aside(tmp_path, capsys):
    out = tmp_path / "creds"
    assert cli(capsys, "certs", "--out", out, "--supernodes", "3")[0] == 0
    old_keys = {i: (out / "supernodes" / f"supernode-{i}").read_bytes() for i in range(3)}
    assert cli(capsys, "certs", "--out", out, "--supernodes", "1", "--force")[0] == 0
    assert sorted(p.name for p in (out / "supernodes").iterdir()) == [
        "supernode-0", "supernode-0.pub", "supernode-0.secret"]
    (backup,) = out.glob("replaced-*")
    for i in range(3):
        assert (backup / "supernodes" / f"supernode-{i}").read_bytes() == old_keys[i]
        assert (backup / "supernodes" / f"supernode-{i}.pub").is_file()
        assert (backup / "supernodes" / f"supernode-{i}.secret").is_file()


def _certs(root: Path, supernodes: int = 2, **kwargs) -> Path:
    from simulation.credentials import make_credentials

    return make_credentials(root, supernodes=supernodes, **kwargs).root


def _swap(dest: Path, source: Path, name: str) -> None:
    (dest / name).write_bytes((source / name).read_bytes())
    os.chmod(dest / name, 0o600)


@pytest.mark.parametrize("damage, expected", [
    (lambda good, other: _swap(good, other, "server.key"), "is not the private key of"),
    (lambda good, other: _swap(good, other, "ca.crt"), "its signature does not verify with the CA key"),
    (lambda good, other: _swap(good, other, "supernodes/supernode-1"), "supernode-1 is not the private key of"),
    (lambda good, other: (good / "server.pem").write_text("not a certificate"), "not a readable PEM certificate"),
    (lambda good, other: (good / "supernodes" / "supernode-0.pub").write_text("ssh-ed"), "not a readable OpenSSH"),
])
def test_deploy_local_refuses_credentials_that_do_not_belong_together_before_the_work(
        damage, expected, tmp_path, capsys, monkeypatch):
    import simulation.deploy_local as deploy_local

    monkeypatch.setattr(deploy_local, "_deploy_local", lambda *a: pytest.fail("the run started"))
    good, other = _certs(tmp_path / "good"), _certs(tmp_path / "other")
    damage(good, other)
    rc, error = cli(capsys, "deploy-local", "--certs", good, "--clients", "2", "--out", tmp_path / "run")
    assert rc == 2 and expected in error and "hybnn certs" in error


def test_deploy_local_refuses_an_expired_certificate(tmp_path, capsys, monkeypatch):
    import simulation.deploy_local as deploy_local

    monkeypatch.setattr(deploy_local, "_deploy_local", lambda *a: pytest.fail("the run started"))
    expired = _certs(tmp_path / "expired", valid_days=0)  # its validity ends as it is written
    rc, error = cli(capsys, "deploy-local", "--certs", expired, "--clients", "2", "--out", tmp_path / "run")
    assert rc == 2 and "not now" in error


def test_deploy_local_refuses_fewer_supernode_keys_than_clients(tmp_path, capsys, monkeypatch):
    import simulation.deploy_local as deploy_local

    monkeypatch.setattr(deploy_local, "_deploy_local", lambda *a: pytest.fail("the run started"))
    rc, error = cli(capsys, "deploy-local", "--certs", _certs(tmp_path / "c", supernodes=2), "--clients", "3",
                    "--out", tmp_path / "run")
    assert rc == 2 and "supernode-2" in error and "--supernodes 3" in error


def test_a_consistent_set_passes_the_check(tmp_path):
    from simulation.credentials import Credentials

    Credentials(_certs(tmp_path / "c", supernodes=2)).check(2)


# ------------------------------------------------------------------ values at the edge of their range
@pytest.mark.parametrize("lr", ["1e308", "1e39", "11"])
@pytest.mark.parametrize("command", ["train", "federate"])
def test_a_huge_learning_rate_is_refused_before_the_work(command, lr, capsys, tmp_path, monkeypatch):
    """1e308 overflowed inside the optimizer (a traceback); any rate above 10 is a typo."""
    import common.bnn.pipeline

    from tests.conftest import fixed_encoder

    monkeypatch.setattr(common.bnn.pipeline, "fit", lambda *a, **k: pytest.fail("training started"))
    task = ["--task", "0v1"]
    extra = ["--rounds", "1", "--clients", "2"] if command == "federate" else []
    rc, error = cli(capsys, command, *task, *extra, "--lr", lr, "--encoder", fixed_encoder(tmp_path / "enc"),
                    "--out", tmp_path / "out")
    assert rc == 2 and "learning rate (--lr)" in error and "at most 10" in error


@pytest.mark.parametrize("args", [
    ["train", "--task", "0v1", "--out", ""],
    ["export", "--model", "", "--out", "x"],
    ["export", "--model", "x", "--out", ""],
    ["certs", "--out", ""],
    ["federate", "--data-root", ""],
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(args, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        from simulation.cli import main

        main(args)
    assert stop.value.code == 2
    assert "expected a path, got an empty string" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_out_through_a_dangling_link_stops_train_before_the_work(below, capsys, tmp_path, monkeypatch):
    import common.bnn.pipeline

    from tests.conftest import fixed_encoder

    monkeypatch.setattr(common.bnn.pipeline, "fit", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    out = tmp_path / "link" / below if below else tmp_path / "link"
    rc, error = cli(capsys, "train", "--task", "0v1", "--encoder", fixed_encoder(tmp_path / "enc"), "--out", out)
    assert rc == 2 and "symbolic link" in error and str(tmp_path / "gone") in error


@pytest.mark.parametrize("host, expected", [
    ("010.0.0.1", "looks like an IP address"), ("999.1.1.1", "looks like an IP address"),
    ("1.2.3", "looks like an IP address"), ("", "neither an IP address nor a DNS name"),
    ("*.example.org", "neither an IP address nor a DNS name"), ("a" * 64, "neither an IP address nor a DNS name"),
])
def test_certs_refuses_hosts_a_certificate_cannot_name(host, expected, tmp_path, capsys):
    rc, error = cli(capsys, "certs", "--out", tmp_path / "c", "--host", host)
    assert rc == 2 and expected in error
    assert not (tmp_path / "c").exists()


def test_certs_names_a_host_without_its_root_dot_once(tmp_path):
    from cryptography import x509

    from simulation.credentials import make_credentials

    creds = make_credentials(tmp_path / "c", hosts=["fl.example.org.", "FL.example.org", "fl.example.org"],
                             supernodes=0)
    cert = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["localhost", "superlink", "fleet-front", "fl.example.org"]


# ------------------------------------------------------------------ earlier results
def test_train_again_into_the_same_out_keeps_the_earlier_model(tmp_path, mnist_root, capsys):
    from tests.conftest import fixed_encoder

    encoder, out = fixed_encoder(tmp_path / "enc"), tmp_path / "bnn"
    common = ["train", "--task", "0v1", "--epochs", "1", "--encoder", encoder, "--data-root", mnist_root, "--out", out]
    assert cli(capsys, *common, "--seed", "1")[0] == 0
    first = {name: (out / name).read_bytes() for name in ("model.json", "model.safetensors")}
    assert cli(capsys, *common, "--seed", "2")[0] == 0
    (kept,) = out.glob("replaced-*")
    assert {name: (kept / name).read_bytes() for name in first} == first
    assert (out / "model.safetensors").read_bytes() != first["model.safetensors"]


def test_pretrain_again_into_the_same_out_keeps_the_earlier_encoder(tmp_path, mnist_root, capsys, monkeypatch):
    """The VAE's training is replaced by an untrained VAE here (an epoch takes minutes); the files are real."""
    import torch

    import common.encoder.vae
    from common.encoder.vae import BinaryVAE, VAEConfig
    from tests.conftest import fixed_encoder

    out = fixed_encoder(tmp_path / "enc")
    first = {name: (out / name).read_bytes() for name in ("manifest.json", "encoder.safetensors")}
    torch.manual_seed(99)
    monkeypatch.setattr(common.encoder.vae, "train_vae", lambda *a, **k: (BinaryVAE(VAEConfig()), []))
    assert cli(capsys, "pretrain", "--epochs", "1", "--data-root", mnist_root, "--out", out)[0] == 0
    (kept,) = out.glob("replaced-*")
    assert {name: (kept / name).read_bytes() for name in first} == first
    assert (out / "encoder.safetensors").read_bytes() != first["encoder.safetensors"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("count", ["-1", "10001", str(10**12)])
def test_certs_refuses_a_supernode_count_out_of_range_at_once(count, tmp_path, capsys):
    rc, error = cli(capsys, "certs", "--out", tmp_path / "c", "--supernodes", count)
    assert rc == 2 and "--supernodes must be from 0 to 10000" in error
    assert not (tmp_path / "c").exists()


def test_certs_into_a_shared_folder_is_refused_and_leaves_its_mode(tmp_path, capsys):
    """`--out /tmp` once made /tmp mode 0700 (and let anyone swap files in it before that)."""
    import stat as stat_mod

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    rc, error = cli(capsys, "certs", "--out", shared)
    assert rc == 2 and "writable by other users" in error
    assert stat_mod.S_IMODE(shared.stat().st_mode) == 0o1777 and list(shared.iterdir()) == []


def test_certs_into_an_existing_private_folder_keeps_its_mode(tmp_path, capsys):
    import stat as stat_mod

    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    os.chmod(mine, 0o755)
    assert cli(capsys, "certs", "--out", mine, "--supernodes", "1")[0] == 0
    assert stat_mod.S_IMODE(mine.stat().st_mode) == 0o755
    assert stat_mod.S_IMODE((mine / "supernodes").stat().st_mode) == 0o700
    assert stat_mod.S_IMODE((mine / "server.key").stat().st_mode) == 0o600


def test_deploy_local_refuses_certs_that_name_a_file(tmp_path, capsys):
    ca = _certs(tmp_path / "c") / "ca.crt"
    rc, error = cli(capsys, "deploy-local", "--certs", ca, "--clients", "2", "--out", tmp_path / "run")
    assert rc == 2 and "is not a folder" in error
