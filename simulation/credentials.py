"""Credentials for a deployment strangers can't use: a private CA, the SuperLink's TLS
certificate, the SuperExec shared secret and, per SuperNode, a key pair and the secret it
shares with the SuperExec beside it.

``hybnn certs --out DIR`` writes (private keys and the secret with mode 0600)::

    DIR/ca.crt, DIR/ca.key            the private certificate authority
    DIR/server.pem, DIR/server.key    the SuperLink's (and the TLS front's) certificate
    DIR/superexec.secret              --superexec-auth-secret-file of SuperLink/SuperNode/SuperExec
    DIR/supernodes/supernode-{i}      flower-supernode --auth-supernode-private-key (OpenSSH EC key)
    DIR/supernodes/supernode-{i}.pub  flwr supernode register (OpenSSH EC public key)
    DIR/supernodes/supernode-{i}.secret  --superexec-auth-secret-file of SuperNode i and of the
                                      pinned SuperExec beside it (client/pinned_superexec.py)

Existing files are never overwritten: without ``force`` it refuses; with ``force`` the
earlier files are first moved into ``DIR/replaced-<UTC time>/``.

It also renders the nginx configuration of the Fleet-only TLS front
(:func:`fleet_front_config`): the one port SuperNodes reach from outside, which
forwards Flower's Fleet API to the SuperLink and refuses everything else (the Control
API that ``flwr run`` uses and the Runtime API that ServerApps use share the
SuperLink's port).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from common.errors import HyBNNError
from common.fileio import atomic_write_bytes, check_output_dir, make_dir, write_error

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
SUPEREXEC_SECRET = "superexec.secret"
SUPERNODES_DIR = "supernodes"
DEFAULT_SUPERNODES = 3
MAX_SUPERNODES = 10_000
"""More key pairs than any deployment here registers; each takes about a millisecond to make
and all are held in memory until written, so a larger count is a typo that would run for hours."""
# Names every certificate covers: loopback, and the compose services that serve it.
DEFAULT_DNS_NAMES = ("localhost", "superlink", "fleet-front")
DEFAULT_IPS = ("127.0.0.1", "::1")
CERT_VALID_DAYS = 825

# Flower 1.42 serves these Fleet API routes (flwr/superlink/routers/fleet/router.py) under
# /v1/fleet/ on the SuperLink's one HTTP port, beside /v1/control/ (flwr run, flwr supernode
# register ...), /v1/runtime/ (ServerApps, SuperExec), /health and /docs.
FLEET_API_PREFIX = "/v1/fleet/"
FLEET_API_ROUTES = (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
)

_SUPERNODE_FILE = re.compile(r"^supernode-[0-9]+(\.pub|\.secret)?$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def supernode_key_name(index: int) -> str:
    return f"supernode-{index}"


@dataclass(frozen=True)
class Credentials:
    """The paths of one credentials directory written by :func:`make_credentials`."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    @property
    def superexec_secret(self) -> Path:
        return self.root / SUPEREXEC_SECRET

    def supernode_key(self, index: int) -> Path:
        return self.root / SUPERNODES_DIR / supernode_key_name(index)

    def supernode_public_key(self, index: int) -> Path:
        return self.root / SUPERNODES_DIR / f"{supernode_key_name(index)}.pub"

    def supernode_secret(self, index: int) -> Path:
        """The secret SuperNode ``index`` shares with its own SuperExec, and nothing else."""
        return self.root / SUPERNODES_DIR / f"{supernode_key_name(index)}.secret"

    def check(self, supernodes: int) -> None:
        """Raise :class:`HyBNNError` unless the files a deployment of ``supernodes`` needs are here."""
        if not self.root.is_dir():
            raise HyBNNError(f"--certs {self.root} is not a folder; pass the folder `hybnn certs --out` wrote.")
        needed = [self.ca_cert, self.server_cert, self.server_key]
        needed += [p for i in range(supernodes) for p in (self.supernode_key(i), self.supernode_public_key(i))]
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise HyBNNError(f"Missing credentials: {', '.join(missing)}. Write them with "
                             f"`hybnn certs --out {self.root} --supernodes {supernodes}`.")
        for key in [self.server_key] + [self.supernode_key(i) for i in range(supernodes)]:
            if key.stat().st_mode & 0o077:
                raise HyBNNError(f"{key} is readable by other users; `chmod 600 {key}`.")
        self._check_contents(supernodes)

    def _check_contents(self, supernodes: int) -> None:
        """The files belong together: the server certificate is current, signed by the CA and
        covers 127.0.0.1, its key is its own, and every SuperNode key matches its ``.pub``."""
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization

        fix = f"Write a consistent set with `hybnn certs --out DIR --supernodes {supernodes}`."

        def load(path: Path, loader, what: str):
            try:
                return loader(path.read_bytes())
            except (ValueError, TypeError, OSError, UnsupportedAlgorithm) as exc:
                raise HyBNNError(f"{path} is not a readable {what} ({exc}). {fix}") from exc

        ca = load(self.ca_cert, x509.load_pem_x509_certificate, "PEM certificate")
        server = load(self.server_cert, x509.load_pem_x509_certificate, "PEM certificate")
        server_key = load(self.server_key, lambda b: serialization.load_pem_private_key(b, None), "PEM private key")
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        as_der = lambda key: key.public_bytes(serialization.Encoding.DER, public)  # noqa: E731
        if as_der(server_key.public_key()) != as_der(server.public_key()):
            raise HyBNNError(f"{self.server_key} is not the private key of {self.server_cert}. {fix}")
        try:
            server.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise HyBNNError(f"{self.server_cert} was not signed by the CA in {self.ca_cert} "
                             f"({str(exc) or 'its signature does not verify with the CA key'}); SuperNodes would refuse the SuperLink. {fix}") from exc
        now = datetime.datetime.now(datetime.timezone.utc)
        for path, cert in ((self.ca_cert, ca), (self.server_cert, server)):
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise HyBNNError(f"{path} is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                                 f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now. {fix}")
        try:
            san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            ips = san.get_values_for_type(x509.IPAddress)
        except x509.ExtensionNotFound:
            ips = []
        if ipaddress.ip_address("127.0.0.1") not in ips:
            raise HyBNNError(f"{self.server_cert} does not cover 127.0.0.1, where this machine's SuperNodes "
                             f"connect. {fix}")
        for i in range(supernodes):
            key = load(self.supernode_key(i), lambda b: serialization.load_ssh_private_key(b, None),
                       "OpenSSH private key")
            pub = load(self.supernode_public_key(i), serialization.load_ssh_public_key, "OpenSSH public key")
            if as_der(key.public_key()) != as_der(pub):
                raise HyBNNError(f"{self.supernode_key(i)} is not the private key of "
                                 f"{self.supernode_public_key(i)}. {fix}")


def _split_hosts(hosts: tuple[str, ...] | list[str]) -> tuple[list[str], list[ipaddress._BaseAddress]]:
    names: list[str] = list(DEFAULT_DNS_NAMES)
    ips: list[ipaddress._BaseAddress] = [ipaddress.ip_address(a) for a in DEFAULT_IPS]
    for host in hosts:
        host = host.strip()
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            host = host[:-1] if host.endswith(".") else host  # a certificate names hosts without the root dot
            labels = host.split(".")
            if not host or len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
                raise HyBNNError(f"--host {host!r} is neither an IP address nor a DNS name.") from None
            if labels[-1].isdigit():  # 010.0.0.1, 999.1.1.1: no DNS name ends in a number
                raise HyBNNError(f"--host {host!r} looks like an IP address but is not a valid one.") from None
            if host.lower() not in (n.lower() for n in names):
                names.append(host)
        else:
            if ip not in ips:
                ips.append(ip)
    return names, ips


def _private_key_bytes(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificates(names: list[str], ips: list, valid_days: int) -> dict[str, bytes]:
    """The CA and the server certificate (PEM), with their private keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(minutes=5)  # tolerate small clock differences
    not_after = now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "HyBNN deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ip) for ip in ips]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return {CA_CERT: ca_cert.public_bytes(pem), CA_KEY: _private_key_bytes(ca_key),
            SERVER_CERT: server_cert.public_bytes(pem), SERVER_KEY: _private_key_bytes(server_key)}


def supernode_key_pair(comment: str) -> tuple[bytes, bytes]:
    """An EC (NIST P-384) key pair in the OpenSSH formats Flower 1.42 reads.

    ``flower-supernode --auth-supernode-private-key`` loads the private key with
    ``load_ssh_private_key`` and ``flwr supernode register`` the public key with
    ``load_ssh_public_key``; both require an EC key on a NIST curve.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


PRIVATE_FILES = (CA_KEY, SERVER_KEY, SUPEREXEC_SECRET)


def new_superexec_secret() -> bytes:
    """A fresh secret for ``--superexec-auth-secret-file``: 64 hex characters, no newline
    (Flower reads the file as exact bytes)."""
    return secrets.token_hex(32).encode()


def make_credentials(out: Path | str, hosts: tuple[str, ...] | list[str] = (), supernodes: int = DEFAULT_SUPERNODES,
                     force: bool = False, valid_days: int = CERT_VALID_DAYS) -> Credentials:
    """Write a fresh credentials directory (see the module docstring) and return its paths."""
    if not 0 <= supernodes <= MAX_SUPERNODES:
        raise HyBNNError(f"--supernodes must be from 0 to {MAX_SUPERNODES}, got {supernodes}.")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise HyBNNError(f"{root} exists and is not a directory.")
    names, ips = _split_hosts(hosts)
    check_output_dir(root)

    files = _certificates(names, ips, valid_days)
    files[SUPEREXEC_SECRET] = new_superexec_secret()
    private = set(PRIVATE_FILES)
    for i in range(supernodes):
        key, pub = supernode_key_pair(supernode_key_name(i))
        files[f"{SUPERNODES_DIR}/{supernode_key_name(i)}"] = key
        files[f"{SUPERNODES_DIR}/{supernode_key_name(i)}.pub"] = pub
        files[f"{SUPERNODES_DIR}/{supernode_key_name(i)}.secret"] = new_superexec_secret()
        private |= {f"{SUPERNODES_DIR}/{supernode_key_name(i)}", f"{SUPERNODES_DIR}/{supernode_key_name(i)}.secret"}

    # Every earlier SuperNode key counts, not only those of the new set's size: a --force
    # with fewer SuperNodes must not leave keys of the old set beside the new ones.
    earlier_keys = (sorted(f"{SUPERNODES_DIR}/{p.name}" for p in (root / SUPERNODES_DIR).iterdir()
                           if _SUPERNODE_FILE.match(p.name))
                    if (root / SUPERNODES_DIR).is_dir() else [])
    existing = sorted({name for name in files if (root / name).exists()} | set(earlier_keys))
    if existing and not force:
        raise HyBNNError(f"{root} already holds {', '.join(existing)}; refusing to overwrite them. "
                         "Use another --out, or --force to move the old files aside first.")
    for folder in (root, root / SUPERNODES_DIR):
        # An existing folder keeps its mode (`--out /tmp` must not close /tmp to everyone else),
        # but one that other users may write to would let them swap the CA or a key.
        if folder.is_dir() and folder.stat().st_mode & 0o022:
            raise HyBNNError(f"{folder} is writable by other users, who could replace the credentials in it. "
                             "Use a folder of your own (a new --out is created with mode 0700).")
    try:
        for folder in (root, root / SUPERNODES_DIR):
            if not folder.is_dir():
                make_dir(folder)
                os.chmod(folder, 0o700)
        if existing:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            backup = root / f"replaced-{stamp}"
            for name in existing:
                (backup / name).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.replace(root / name, backup / name)
            print(f"Moved the earlier {', '.join(existing)} to {backup}")
        for name, data in files.items():
            path = root / name
            atomic_write_bytes(path, data, mode=0o600 if name in private else 0o644)
    except OSError as exc:
        raise write_error(root, exc, "the credentials folder") from exc
    return Credentials(root)


# ------------------------------------------------------------------ the Fleet-only TLS front
def fleet_front_config(*, listen: str, upstream: str, certfile: Path | str, keyfile: Path | str,
                       upstream_ca_certfile: Path | str, upstream_server_name: str = "localhost",
                       state_dir: Path | str = "/tmp/fleet-front", access_log: str = "/dev/stdout",
                       error_log: str = "stderr") -> str:
    """A complete ``nginx.conf`` for the Fleet-only TLS front.

    ``listen``: what SuperNodes connect to (``0.0.0.0:9092``, ``127.0.0.1:PORT``).
    ``upstream``: the SuperLink's HTTPS port (``127.0.0.1:9093``, ``superlink:9093``);
    the front checks its certificate against ``upstream_ca_certfile`` under
    ``upstream_server_name``. Only ``POST`` to the Fleet API routes is forwarded;
    every other path (``/v1/control/`` = ``flwr run``, ``/v1/runtime/``, ``/docs``,
    ``/health``) gets 403. ``state_dir`` holds the pid file and nginx's temporary files.
    Run it with ``nginx -c FILE -g 'daemon off;'`` (any user: it needs no root unless
    the port is below 1024).
    """
    for label, value in (("listen", listen), ("upstream", upstream), ("certfile", certfile),
                         ("keyfile", keyfile), ("upstream_ca_certfile", upstream_ca_certfile),
                         ("upstream_server_name", upstream_server_name), ("state_dir", state_dir),
                         ("access_log", access_log), ("error_log", error_log)):
        if not str(value) or re.search(r"[\s;{}'\"\\$#]", str(value)):
            raise HyBNNError(f"fleet front {label} {str(value)!r} is empty or holds characters nginx would misread.")
    state = str(state_dir)
    routes = "|".join(FLEET_API_ROUTES)
    return f"""\
# Fleet-only TLS front for a Flower 1.42 SuperLink (rendered by simulation/credentials.py).
# SuperNodes reach this port; only the Fleet API is forwarded. The SuperLink's own port
# (Control API for `flwr run`, Runtime API for ServerApps) stays on loopback / the private network.
worker_processes 1;
pid {state}/nginx.pid;
error_log {error_log} warn;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {state}/client_body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    access_log {access_log};
    server_tokens off;

    upstream flower_fleet {{
        server {upstream};
        keepalive 16;
    }}

    server {{
        listen {listen} ssl;
        ssl_certificate {certfile};
        ssl_certificate_key {keyfile};
        ssl_protocols TLSv1.2 TLSv1.3;
        # Messages travel as objects of at most a few MB each.
        client_max_body_size 64m;

        # Exact Fleet API routes, matched on nginx's normalized path (dot segments and
        # percent-escapes resolved) and forwarded as that normalized path.
        location ~ ^/v1/fleet/({routes})$ {{
            limit_except POST {{ deny all; }}
            proxy_pass https://flower_fleet$uri;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {upstream_ca_certfile};
            proxy_ssl_name {upstream_server_name};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}

        # Everything else (Control API, Runtime API, docs, health): refused.
        location / {{
            return 403;
        }}
    }}
}}
"""
