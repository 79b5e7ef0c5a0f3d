"""A deployment strangers can't use: credentials, the Fleet-only TLS front, and the
refusals of real Flower processes (unregistered or plaintext SuperNodes, `flwr run`
through the exposed port, a SuperLink that never answers)."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import HyBNNError

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install -y "
                                 "--no-install-recommends nginx); the Fleet-only front tests need it")


# ------------------------------------------------------------------ hybnn certs
def test_certs_writes_the_fixed_layout_with_private_modes(tmp_path):
    from cryptography import x509
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    from simulation.cli import main

    out = tmp_path / "creds"
    assert main(["certs", "--out", str(out), "--host", "fl.example.org", "--host", "10.1.2.3",
                 "--supernodes", "2"]) == 0
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {"ca.crt", "ca.key", "server.pem", "server.key", "superexec.secret",
                     "supernodes/supernode-0", "supernodes/supernode-0.pub",
                     "supernodes/supernode-1", "supernodes/supernode-1.pub"}
    for private in ("ca.key", "server.key", "superexec.secret", "supernodes/supernode-0", "supernodes/supernode-1"):
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o600, private
    assert len((out / "superexec.secret").read_bytes()) == 64

    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink", "fleet-front", "fl.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}

    # The exact loaders Flower 1.42 uses for `flwr supernode register` and `flower-supernode`.
    assert try_load_public_key(out / "supernodes" / "supernode-1.pub")
    keys = _try_setup_client_authentication(argparse.Namespace(
        auth_supernode_private_key=str(out / "supernodes" / "supernode-1"), auth_supernode_public_key=None))
    assert keys is not None


def test_certs_never_destroys_earlier_material(tmp_path, capsys):
    from simulation.cli import main
    from simulation.credentials import make_credentials

    out = tmp_path / "creds"
    make_credentials(out, supernodes=1)
    first_ca = (out / "ca.crt").read_bytes()
    assert main(["certs", "--out", str(out), "--supernodes", "1"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "ca.crt").read_bytes() == first_ca

    make_credentials(out, supernodes=1, force=True)
    assert (out / "ca.crt").read_bytes() != first_ca
    (backup,) = out.glob("replaced-*")
    assert (backup / "ca.crt").read_bytes() == first_ca
    assert (backup / "supernodes" / "supernode-0").is_file()


def test_certs_rejects_a_bad_host_and_missing_credentials_are_named(tmp_path):
    from simulation.credentials import Credentials, make_credentials

    with pytest.raises(HyBNNError, match="neither an IP address nor a DNS name"):
        make_credentials(tmp_path / "x", hosts=["bad host;"])
    assert not (tmp_path / "x").exists()
    make_credentials(tmp_path / "c", supernodes=1)
    with pytest.raises(HyBNNError, match="supernode-1"):
        Credentials(tmp_path / "c").check(supernodes=2)
    os.chmod(tmp_path / "c" / "server.key", 0o644)
    with pytest.raises(HyBNNError, match="readable by other users"):
        Credentials(tmp_path / "c").check(supernodes=1)


# ------------------------------------------------------------------ the Fleet-only front's config
def test_fleet_routes_match_the_installed_flower():
    """The front forwards exactly the Fleet API routes of the installed Flower."""
    from fastapi.routing import APIRoute
    from flwr.superlink.routers.fleet.router import router

    from simulation.credentials import FLEET_API_PREFIX, FLEET_API_ROUTES

    installed = {r.path for r in router.routes if isinstance(r, APIRoute)}
    assert installed == {FLEET_API_PREFIX + name for name in FLEET_API_ROUTES}


def test_fleet_front_config_refuses_injection(tmp_path):
    from simulation.credentials import fleet_front_config

    with pytest.raises(HyBNNError, match="upstream"):
        fleet_front_config(listen="0.0.0.0:9092", upstream="x; include /etc/passwd", certfile="a", keyfile="b",
                           upstream_ca_certfile="c")


@needs_nginx
def test_fleet_front_config_passes_nginx_syntax_check(tmp_path):
    from simulation.credentials import fleet_front_config, make_credentials

    creds = make_credentials(tmp_path / "creds", supernodes=0)
    state = tmp_path / "front"
    state.mkdir()
    conf = state / "nginx.conf"
    conf.write_text(fleet_front_config(listen="127.0.0.1:18443", upstream="127.0.0.1:9", certfile=creds.server_cert,
                                       keyfile=creds.server_key, upstream_ca_certfile=creds.ca_cert,
                                       state_dir=state, access_log=str(state / "access.log")))
    check = subprocess.run([NGINX, "-t", "-c", str(conf), "-e", str(state / "error.log")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
