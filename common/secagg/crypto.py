"""The cryptographic primitives of secure aggregation, each a thin wrapper over a library.

* key agreement: X25519 (``cryptography``), the shared secret passed through HKDF-SHA256 with
  a context, so that every use of a pair of keys gets its own key;
* authenticated encryption of the Shamir shares: ChaCha20-Poly1305, a random 12-byte nonce
  before the ciphertext;
* masks: a ChaCha20 key stream, 8 bytes per element, reduced modulo ``2**width``;
* secret sharing: pycryptodome's Shamir scheme over GF(2^128), two 16-byte blocks per 32-byte
  secret.

Every failure caused by bytes from elsewhere (a key of the wrong length, a tampered ciphertext,
a malformed share) raises :class:`SecAggError` naming what was wrong.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from common.secagg.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SHARE_INDEX_BYTES = 2
SHARE_BLOCK_BYTES = 16
SHARE_BYTES = SHARE_INDEX_BYTES + 2 * SHARE_BLOCK_BYTES
"""A share of a 32-byte secret: its index (big endian), then one 16-byte share per block."""
MAX_SHARES = 2 ** (8 * SHARE_INDEX_BYTES) - 1
_INFO_PREFIX = b"hybnn-secagg "


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_INFO_PREFIX + info).derive(secret)


def _check_bytes(value: object, length: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise SecAggError(f"{what} must be {length} bytes, got {got}")
    return value


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair: ``(private, public)``, 32 raw bytes each."""
    private = X25519PrivateKey.generate()
    return (private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def public_of(private: bytes) -> bytes:
    """The X25519 public key of a raw private key (to check a reconstructed key against)."""
    key = X25519PrivateKey.from_private_bytes(_check_bytes(private, KEY_BYTES, "an X25519 private key"))
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, context: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 of the X25519 shared secret, ``info`` naming
    the context (both ends must pass the same one). Refuses a peer key that is not 32 bytes or
    that gives the all-zero shared secret (a low-order point, which would fix the key)."""
    key = X25519PrivateKey.from_private_bytes(_check_bytes(private, KEY_BYTES, "an X25519 private key"))
    peer = X25519PublicKey.from_public_bytes(_check_bytes(peer_public, KEY_BYTES, "a peer's X25519 public key"))
    try:
        shared = key.exchange(peer)
    except ValueError as e:  # cryptography refuses the all-zero shared secret
        raise SecAggError(f"a peer's X25519 public key is a low-order point: {e}") from e
    if shared == bytes(KEY_BYTES):
        raise SecAggError("a peer's X25519 public key gives the all-zero shared secret")
    return _hkdf(shared, b"agree " + context)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 of ``plaintext`` under ``key``, ``associated`` authenticated but not sent:
    a random nonce, then the ciphertext and its tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(_check_bytes(key, KEY_BYTES, "an encryption key")).encrypt(
        nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """Inverse of :func:`encrypt`; :class:`SecAggError` when the ciphertext, its tag or the
    associated data do not match (tampered, truncated, or meant for another round or pair)."""
    if not isinstance(ciphertext, bytes) or len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError("a ciphertext is shorter than its nonce and tag")
    cipher = ChaCha20Poly1305(_check_bytes(key, KEY_BYTES, "an encryption key"))
    try:
        return cipher.decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated)
    except InvalidTag as e:
        raise SecAggError("a ciphertext does not authenticate (tampered, or meant for another round or pair)") from e


def key_stream_words(seed: bytes, count: int, domain: bytes) -> np.ndarray:
    """``count`` uint64 words of the ChaCha20 stream keyed by HKDF(seed, domain), little endian.

    The nonce is fixed (zero) because the key is used for one stream only: a new seed or domain
    gives a new key."""
    _check_bytes(seed, KEY_BYTES, "a mask seed")
    if count < 0:
        raise SecAggError(f"a mask of {count} elements")
    encryptor = Cipher(algorithms.ChaCha20(_hkdf(seed, b"mask " + domain), bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * count)), dtype="<u8").astype(np.uint64)


def width_mask(width: int) -> np.uint64:
    """``2**width - 1`` as uint64 (all ones at 64)."""
    if not 1 <= width <= 64:
        raise SecAggError(f"a segment width must lie in 1..64, got {width}")
    return np.uint64(2**width - 1)


def mask(seed: bytes, lengths: Sequence[int], widths: Sequence[int], domain: bytes) -> list[np.ndarray]:
    """A mask per segment from one 32-byte seed: segment ``i`` holds ``lengths[i]`` uint64 elements
    uniform below ``2**widths[i]`` (a power-of-two modulus of a uniform 64-bit word stays uniform).
    The segments are consecutive parts of one key stream."""
    if len(lengths) != len(widths):
        raise SecAggError(f"{len(lengths)} segment lengths but {len(widths)} widths")
    words = key_stream_words(seed, sum(int(n) for n in lengths), domain)
    out, start = [], 0
    for n, w in zip(lengths, widths):
        out.append(words[start:start + n] & width_mask(w))
        start += n
    return out


def share(secret: bytes, n: int, t: int) -> list[bytes]:
    """``n`` Shamir shares of a 32-byte secret, any ``t`` of which give it back; share ``i``
    (``i`` = 1..n) is ``SHARE_BYTES`` long and starts with its index."""
    _check_bytes(secret, KEY_BYTES, "a shared secret")
    if not 2 <= t <= n <= MAX_SHARES:
        raise SecAggError(f"Shamir sharing needs 2 <= threshold <= shares <= {MAX_SHARES}, got t={t}, n={n}")
    blocks = [Shamir.split(t, n, secret[i:i + SHARE_BLOCK_BYTES]) for i in (0, SHARE_BLOCK_BYTES)]
    return [index.to_bytes(SHARE_INDEX_BYTES, "big") + first + second
            for (index, first), (_, second) in zip(*blocks)]


def share_index(share_bytes: bytes) -> int:
    """The index (1..) a share carries; :class:`SecAggError` for a share of the wrong length or index 0."""
    _check_bytes(share_bytes, SHARE_BYTES, "a Shamir share")
    index = int.from_bytes(share_bytes[:SHARE_INDEX_BYTES], "big")
    if index == 0:
        raise SecAggError("a Shamir share with index 0 (it would be the secret itself)")
    return index


def combine(shares: Sequence[bytes], t: int) -> bytes:
    """The 32-byte secret from at least ``t`` shares of distinct indices (the ``t`` of lowest
    index are used: pycryptodome interpolates exactly the shares it is given)."""
    if t < 2:
        raise SecAggError(f"a Shamir threshold must be at least 2, got {t}")
    by_index: dict[int, bytes] = {}
    for s in shares:
        index = share_index(s)
        if index in by_index:
            raise SecAggError(f"two Shamir shares with index {index}")
        by_index[index] = s
    if len(by_index) < t:
        raise SecAggError(f"{len(by_index)} Shamir shares, {t} needed")
    chosen = [(i, by_index[i]) for i in sorted(by_index)[:t]]
    blocks = []
    for offset in (SHARE_INDEX_BYTES, SHARE_INDEX_BYTES + SHARE_BLOCK_BYTES):
        blocks.append(Shamir.combine([(i, s[offset:offset + SHARE_BLOCK_BYTES]) for i, s in chosen]))
    return b"".join(blocks)
