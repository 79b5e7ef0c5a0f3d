"""SecAgg+ (Bell et al., CCS 2020, after Bonawitz et al., CCS 2017) for a semi-honest server.

The server learns the sum, segment by segment modulo ``2**width``, of the vectors of the clients
that stayed to the end, and nothing about any one of them, as long as it follows the protocol
and fewer than :func:`local_threshold` of a client's neighbourhood share their secrets with it.

Four stages, each a pure function on the client and a collect method of :class:`ServerRound`:

1. keys: each client makes two X25519 key pairs (one to encrypt shares, one for pairwise
   masks) and a self-mask seed, and sends the two public keys;
2. shares: each client Shamir-shares its self-mask seed and its mask private key among itself
   and its present neighbours, and sends each neighbour its shares, encrypted;
3. masked input: each client sends ``x + self mask + pairwise masks`` (a pairwise mask is added
   by the smaller id of a pair and subtracted by the larger, so pairs cancel in the sum);
4. unmask: each survivor reveals its shares of the survivors' self-mask seeds and of the
   dropped clients' mask private keys (never both for one client), and the server removes the
   masks.

Neighbours. In a small round (up to 21 clients, :func:`neighbourhood_degree`) everyone is
everyone's neighbour (Bonawitz et al.); otherwise the
clients lie on a ring in an order drawn from the round's graph seed and each is linked to the
``k / 2`` before and after it, ``k = 2 ceil(log2 N)``: a client's work then grows with
``log N`` rather than ``N``.

Client state between stages and every message are flat dicts of bytes, ints, strs and lists of
those, which fit Flower's ``ConfigRecord`` as they are. Every server message carries the round's
spec (:func:`spec_to_config`), so a client needs nothing else to answer.

Anything a peer sends may be hostile. A client refuses a bad request with :class:`SecAggError`;
the server drops the offending client with a reason (:attr:`ServerRound.dropped`) and goes on
with the others, or raises :class:`RoundSkipped` when too few remain.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from common.packing import pack_uint, packed_length, unpack_uint
from common.secagg import crypto
from common.secagg.errors import RoundSkipped, SecAggError

MAX_CLIENT_ID = 2**63 - 1
"""Client ids are Flower node ids; a ConfigRecord int is a signed 64-bit integer."""
SEED_BYTES = 32

STAGES = ("keys", "shares", "masked", "unmask")
"""The stages, in order; a client's state records the last one it answered."""

SHARES_PLAINTEXT_BYTES = 2 * crypto.SHARE_BYTES
SHARES_CIPHERTEXT_BYTES = crypto.NONCE_BYTES + SHARES_PLAINTEXT_BYTES + crypto.TAG_BYTES
"""What one client sends another in stage 2: its share of the seed and of the mask key, encrypted."""

Message = dict[str, object]
State = dict[str, object]


# ----------------------------------------------------------------------------- the round's spec

def default_threshold(n: int) -> int:
    """``max(2, ceil(2 n / 3))`` clients of ``n`` must stay to the end.

    A third may drop. Two thirds is more than half, so no two disjoint groups of answering
    clients could each hold enough shares to reconstruct a different secret of the same client
    (one its seed, the other its key). With two clients the sum reveals the other's vector to
    each, so fewer than three clients are refused."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise SecAggError(f"secure aggregation needs at least 3 clients, got {n}: with 2 the sum gives each "
                          "the other's vector")
    return max(2, -(-2 * n // 3))


@dataclass(frozen=True)
class RoundSpec:
    """What every party of one round must agree on; the server sends it with every message.

    ``round_id`` is bound into every key derivation, associated data and message, so that
    nothing of another round is accepted. ``clients`` are sorted and distinct; ``threshold``
    of them must stay to the end. The summed vector has one segment per entry of ``lengths``,
    segment ``i`` summed modulo ``2**widths[i]``. ``graph_seed`` (32 random bytes the server
    draws) orders the ring of neighbours."""

    round_id: int
    clients: tuple[int, ...]
    threshold: int
    lengths: tuple[int, ...]
    widths: tuple[int, ...]
    graph_seed: bytes

    def __post_init__(self) -> None:
        _require_int(self.round_id, "the round id", 0, MAX_CLIENT_ID)
        if not isinstance(self.clients, tuple) or len(self.clients) < 3:
            raise SecAggError(f"secure aggregation needs at least 3 clients, got {_count(self.clients)}: "
                              "with 2 the sum gives each the other's vector")
        for c in self.clients:
            _require_int(c, "a client id", 0, MAX_CLIENT_ID)
        if any(a >= b for a, b in zip(self.clients, self.clients[1:])):
            raise SecAggError("the round's client ids must be sorted and distinct")
        _require_int(self.threshold, "the threshold", 2, len(self.clients),
                     f" (2..the round's {len(self.clients)} clients)")
        if not isinstance(self.lengths, tuple) or not isinstance(self.widths, tuple):
            raise SecAggError("the segment lengths and widths must be tuples")
        if not self.lengths or len(self.lengths) != len(self.widths):
            raise SecAggError(f"{len(self.lengths)} segment lengths and {len(self.widths)} widths: "
                              "at least one segment, as many widths as lengths")
        for n in self.lengths:
            _require_int(n, "a segment length", 1, 2**31)
        for w in self.widths:
            _require_int(w, "a segment width", 1, 64)
        if not isinstance(self.graph_seed, bytes) or len(self.graph_seed) != SEED_BYTES:
            raise SecAggError(f"the graph seed must be {SEED_BYTES} bytes")

    @property
    def total_length(self) -> int:
        return sum(self.lengths)


def new_round_spec(round_id: int, clients: Sequence[int], lengths: Sequence[int], widths: Sequence[int],
                   threshold: int | None = None) -> RoundSpec:
    """A round's spec with a fresh graph seed, the clients sorted and the threshold
    :func:`default_threshold` unless given."""
    ordered = tuple(sorted(clients))
    return RoundSpec(round_id=round_id, clients=ordered,
                     threshold=default_threshold(len(ordered)) if threshold is None else threshold,
                     lengths=tuple(lengths), widths=tuple(widths), graph_seed=os.urandom(SEED_BYTES))


def neighbourhood_degree(spec: RoundSpec) -> int:
    """How many neighbours each client has: ``k = 2 ceil(log2 N)``, or ``N - 1`` in a small round,
    ``N <= 2 k + 1`` (up to 21 clients). There a ring would link each client to more than half of
    the others anyway, and linking all makes any ``threshold`` survivors enough: ten clients at
    threshold 7 survive any three dropouts, which a ring of degree 8 does not."""
    n = len(spec.clients)
    k = 2 * (n - 1).bit_length()  # (n-1).bit_length() is ceil(log2 n) for n >= 2
    return n - 1 if n <= 2 * k + 1 else k


@lru_cache(maxsize=16)
def _neighbour_table(spec: RoundSpec) -> dict[int, tuple[int, ...]]:
    n, k = len(spec.clients), neighbourhood_degree(spec)
    if k == n - 1:
        return {c: tuple(j for j in spec.clients if j != c) for c in spec.clients}
    # A keyed hash of each id is a permutation the server cannot steer after drawing the seed.
    order = sorted(spec.clients, key=lambda c: hmac.new(spec.graph_seed, _u64(c), hashlib.sha256).digest())
    table = {}
    for position, c in enumerate(order):
        linked = {order[(position + d) % n] for d in range(1, k // 2 + 1)}
        linked |= {order[(position - d) % n] for d in range(1, k // 2 + 1)}
        table[c] = tuple(sorted(linked))
    return table


def neighbours(spec: RoundSpec, client: int) -> tuple[int, ...]:
    """``client``'s neighbours (sorted, itself excluded): those it shares secrets and pairwise masks with."""
    table = _neighbour_table(spec)
    if client not in table:
        raise SecAggError(f"client {client} is not a client of round {spec.round_id}")
    return table[client]


def local_threshold(spec: RoundSpec) -> int:
    """The Shamir threshold within one neighbourhood (``k + 1`` clients, itself included):
    ``ceil(threshold (k + 1) / N)``, at least 2; ``threshold`` itself in a small round."""
    n, k = len(spec.clients), neighbourhood_degree(spec)
    if k == n - 1:
        return spec.threshold
    return max(2, -(-spec.threshold * (k + 1) // n))


_SPEC_KEYS = ("spec.round", "spec.clients", "spec.threshold", "spec.lengths", "spec.widths", "spec.graph_seed")


def spec_to_config(spec: RoundSpec) -> Message:
    """The spec as a flat dict (keys ``spec.*``, so that it merges into any stage's message)."""
    return {"spec.round": spec.round_id, "spec.clients": list(spec.clients), "spec.threshold": spec.threshold,
            "spec.lengths": list(spec.lengths), "spec.widths": list(spec.widths),
            "spec.graph_seed": spec.graph_seed}


def spec_from_config(config: Mapping[str, object]) -> RoundSpec:
    """Inverse of :func:`spec_to_config`; other keys of ``config`` are ignored."""
    if not isinstance(config, Mapping):
        raise SecAggError("a round's spec must come as a dict")
    missing = [k for k in _SPEC_KEYS if k not in config]
    if missing:
        raise SecAggError(f"the round's spec lacks {', '.join(missing)}")
    return RoundSpec(round_id=config["spec.round"], clients=tuple(_int_list(config["spec.clients"], "spec.clients")),
                     threshold=config["spec.threshold"],
                     lengths=tuple(_int_list(config["spec.lengths"], "spec.lengths")),
                     widths=tuple(_int_list(config["spec.widths"], "spec.widths")),
                     graph_seed=config["spec.graph_seed"])


def spec_digest(spec: RoundSpec) -> bytes:
    """SHA-256 of the spec: a client's state holds it to refuse a spec changed between stages."""
    h = hashlib.sha256(b"hybnn-secagg spec")
    for part in (spec.round_id, spec.threshold, len(spec.clients), *spec.clients, len(spec.lengths),
                 *spec.lengths, *spec.widths):
        h.update(_u64(part))
    h.update(spec.graph_seed)
    return h.digest()


# ----------------------------------------------------------------------------- field checks

def _count(value: object) -> object:
    return len(value) if isinstance(value, (tuple, list)) else value


def _require_int(value: object, what: str, low: int, high: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecAggError(f"{what} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise SecAggError(f"{what} {value} outside {low}..{high}{hint}")
    return value


def _int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise SecAggError(f"{what} must be a list of ints, got {type(value).__name__}")
    return [_require_int(v, f"an element of {what}", 0, MAX_CLIENT_ID) for v in value]


def _bytes_list(value: object, what: str, length: int | None = None) -> list[bytes]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, bytes) for v in value):
        raise SecAggError(f"{what} must be a list of bytes")
    if length is not None:
        for v in value:
            if len(v) != length:
                raise SecAggError(f"an element of {what} is {len(v)} bytes, expected {length}")
    return list(value)


def _field(message: Mapping[str, object], key: str) -> object:
    if key not in message:
        raise SecAggError(f"the message lacks its {key!r} field")
    return message[key]


def _check_header(message: object, spec: RoundSpec, stage: str) -> Mapping[str, object]:
    """A message must be a dict of this round and this stage: anything else is a replay or a mix-up."""
    if not isinstance(message, Mapping):
        raise SecAggError(f"a {stage} message must be a dict, got {type(message).__name__}")
    round_id = _field(message, "round")
    if round_id != spec.round_id or isinstance(round_id, bool):
        raise SecAggError(f"a {stage} message of round {round_id!r}, this is round {spec.round_id} (a replay?)")
    if _field(message, "stage") != stage:
        raise SecAggError(f"a message of stage {message['stage']!r} where stage {stage!r} was asked")
    return message


def _ids(value: object, what: str, allowed: Sequence[int] | frozenset[int] | set[int]) -> list[int]:
    ids = _int_list(value, what)
    if len(set(ids)) != len(ids):
        raise SecAggError(f"{what} names a client twice")
    stray = sorted(set(ids) - set(allowed))
    if stray:
        raise SecAggError(f"{what} names {stray}, not allowed here")
    return ids


# ----------------------------------------------------------------------------- derivations

def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def _pair(round_id: int, a: int, b: int) -> bytes:
    return _u64(round_id) + _u64(min(a, b)) + _u64(max(a, b))


def _share_key_context(round_id: int, a: int, b: int) -> bytes:
    return b"share-key " + _pair(round_id, a, b)


def _shares_aad(round_id: int, sender: int, receiver: int) -> bytes:
    return b"hybnn-secagg shares " + _u64(round_id) + _u64(sender) + _u64(receiver)


def _pair_seed_context(round_id: int, a: int, b: int) -> bytes:
    return b"pair-seed " + _pair(round_id, a, b)


def _pair_domain(round_id: int, a: int, b: int) -> bytes:
    return b"pair " + _pair(round_id, a, b)


def _self_domain(round_id: int, client: int) -> bytes:
    return b"self " + _u64(round_id) + _u64(client)


def _share_group(owner: int, holders: Sequence[int]) -> list[int]:
    """Who holds ``owner``'s shares: share ``i`` (1..) goes to the ``i``-th of these."""
    return sorted({owner, *holders})


def _split(flat: np.ndarray, spec: RoundSpec) -> list[np.ndarray]:
    out, start = [], 0
    for n, w in zip(spec.lengths, spec.widths):
        out.append(flat[start:start + n] & crypto.width_mask(w))
        start += n
    return out


def _check_vector(vector: Sequence[np.ndarray], spec: RoundSpec) -> np.ndarray:
    """The vector as one flat uint64 array; :class:`SecAggError` unless its segments match the spec."""
    if len(vector) != len(spec.lengths):
        raise SecAggError(f"the vector has {len(vector)} segments, the round {len(spec.lengths)}")
    parts = []
    for i, (segment, n, w) in enumerate(zip(vector, spec.lengths, spec.widths)):
        segment = np.asarray(segment)
        if segment.shape != (n,):
            raise SecAggError(f"segment {i} has shape {segment.shape}, the round ({n},)")
        if segment.dtype.kind not in "ui":
            raise SecAggError(f"segment {i} holds {segment.dtype}, not integers")
        if segment.dtype.kind == "i" and n and int(segment.min()) < 0:
            raise SecAggError(f"segment {i} holds a negative element")
        segment = segment.astype(np.uint64)
        if w < 64 and n and int(segment.max()) >> w:
            raise SecAggError(f"segment {i} holds {int(segment.max())}, beyond its {w} bits")
        parts.append(segment)
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- client side

def _check_state(state: Mapping[str, object], spec: RoundSpec, me: int, stage: str) -> None:
    """The state must be ``me``'s, of this round and spec, and have answered the stage before ``stage`` last."""
    if not isinstance(state, Mapping) or "stage" not in state:
        raise SecAggError("a client's secure-aggregation state is missing or malformed")
    if state.get("round") != spec.round_id:
        raise SecAggError(f"a request of round {spec.round_id} on a state of round {state.get('round')} "
                          "(a replay from another round?)")
    if state.get("me") != me:
        raise SecAggError(f"the state is client {state.get('me')}'s, not {me}'s")
    if state.get("spec_digest") != spec_digest(spec):
        raise SecAggError(f"round {spec.round_id}'s spec changed between stages")
    if state["stage"] not in STAGES:
        raise SecAggError(f"the state names an unknown stage {state['stage']!r}")
    done, wanted = STAGES.index(state["stage"]), STAGES.index(stage)
    if done >= wanted:
        raise SecAggError(f"stage {stage!r} was already answered this round "
                          f"(the state has answered {state['stage']!r})")
    if done != wanted - 1:
        raise SecAggError(f"stage {stage!r} asked before stage {STAGES[wanted - 1]!r}")


def _peer_keys(state: Mapping[str, object]) -> dict[int, tuple[bytes, bytes]]:
    ids, enc, msk = state["peer_ids"], state["peer_pk_enc"], state["peer_pk_mask"]
    k = crypto.KEY_BYTES
    return {j: (enc[i * k:(i + 1) * k], msk[i * k:(i + 1) * k]) for i, j in enumerate(ids)}


def client_keys(spec: RoundSpec, me: int) -> tuple[State, Message]:
    """Stage 1: fresh key pairs and self-mask seed; the reply carries the two public keys."""
    if me not in spec.clients:
        raise SecAggError(f"client {me} is not a client of round {spec.round_id}")
    sk_enc, pk_enc = crypto.new_keypair()
    sk_mask, pk_mask = crypto.new_keypair()
    state: State = {"round": spec.round_id, "me": me, "stage": "keys", "spec_digest": spec_digest(spec),
                    "sk_enc": sk_enc, "pk_enc": pk_enc, "sk_mask": sk_mask, "pk_mask": pk_mask,
                    "self_seed": os.urandom(SEED_BYTES)}
    return state, {"round": spec.round_id, "stage": "keys", "pk_enc": pk_enc, "pk_mask": pk_mask,
                   "seed_commitment": seed_commitment(spec.round_id, me, state["self_seed"])}


def keys_from_message(message: Mapping[str, object], spec: RoundSpec) -> dict[int, tuple[bytes, bytes]]:
    """The public keys in the server's stage-2 message: ``{neighbour: (pk_enc, pk_mask)}``."""
    _check_header(message, spec, "shares")
    ids = _ids(_field(message, "ids"), "ids", spec.clients)
    enc = _bytes_list(_field(message, "pk_enc"), "pk_enc", crypto.KEY_BYTES)
    msk = _bytes_list(_field(message, "pk_mask"), "pk_mask", crypto.KEY_BYTES)
    if not len(ids) == len(enc) == len(msk):
        raise SecAggError(f"{len(ids)} ids, {len(enc)} pk_enc and {len(msk)} pk_mask: the lists must be parallel")
    return {j: (e, m) for j, e, m in zip(ids, enc, msk)}


def client_shares(state: State, spec: RoundSpec, me: int,
                  public_keys: Mapping[int, tuple[bytes, bytes]]) -> tuple[State, Message]:
    """Stage 2: share the self-mask seed and the mask private key among ``me`` and the neighbours
    in ``public_keys`` (those that answered stage 1), and encrypt each neighbour's pair of shares
    to it."""
    _check_state(state, spec, me, "shares")
    mine = set(neighbours(spec, me))
    stray = sorted(set(public_keys) - mine)
    if stray:
        raise SecAggError(f"public keys of {stray}, which are not client {me}'s neighbours")
    peers = sorted(public_keys)
    t = local_threshold(spec)
    if 1 + len(peers) < t:
        raise SecAggError(f"only {len(peers)} of client {me}'s {len(mine)} neighbours are present; "
                          f"sharing its secrets needs {t - 1}")
    seen = {state["pk_enc"]: me, state["pk_mask"]: me}
    for j in peers:
        pair = public_keys[j]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise SecAggError(f"client {j}'s public keys must be a pair (pk_enc, pk_mask)")
        for key in pair:
            if not isinstance(key, bytes) or len(key) != crypto.KEY_BYTES:
                raise SecAggError(f"a public key of client {j} is not {crypto.KEY_BYTES} bytes")
            if key in seen:
                raise SecAggError(f"client {j}'s public key duplicates client {seen[key]}'s")
            seen[key] = j
    group = _share_group(me, peers)
    seed_shares = crypto.share(state["self_seed"], len(group), t)
    key_shares = crypto.share(state["sk_mask"], len(group), t)
    to, ciphertexts = [], []
    for index, holder in enumerate(group):
        if holder == me:
            continue
        key = crypto.agree(state["sk_enc"], public_keys[holder][0], _share_key_context(spec.round_id, me, holder))
        to.append(holder)
        ciphertexts.append(crypto.encrypt(key, seed_shares[index] + key_shares[index],
                                          _shares_aad(spec.round_id, me, holder)))
    own = group.index(me)
    state = {**state, "stage": "shares", "peer_ids": peers,
             "peer_pk_enc": b"".join(public_keys[j][0] for j in peers),
             "peer_pk_mask": b"".join(public_keys[j][1] for j in peers),
             "own_seed_share": seed_shares[own], "own_key_share": key_shares[own]}
    return state, {"round": spec.round_id, "stage": "shares", "to": to, "ciphertexts": ciphertexts}


def ciphertexts_from_message(message: Mapping[str, object], spec: RoundSpec) -> dict[int, bytes]:
    """The shares addressed to this client in the server's stage-3 message: ``{sender: ciphertext}``."""
    _check_header(message, spec, "masked")
    senders = _ids(_field(message, "from"), "from", spec.clients)
    ciphertexts = _bytes_list(_field(message, "ciphertexts"), "ciphertexts")
    if len(senders) != len(ciphertexts):
        raise SecAggError(f"{len(senders)} senders and {len(ciphertexts)} ciphertexts: the lists must be parallel")
    return dict(zip(senders, ciphertexts))


def client_masked_input(state: State, spec: RoundSpec, me: int, vector: Sequence[np.ndarray],
                        received: Mapping[int, bytes]) -> tuple[State, Message]:
    """Stage 3: keep the neighbours' shares addressed to ``me`` and send ``vector`` masked.

    A sender whose ciphertext does not decrypt to two well-formed shares is left out (named in
    the reply's ``refused``, so the server leaves it out of the sum): ``me`` neither holds its
    shares nor masks with it."""
    _check_state(state, spec, me, "masked")
    x = _check_vector(vector, spec)
    peer_keys = _peer_keys(state)
    stray = sorted(set(received) - set(peer_keys))
    if stray:
        raise SecAggError(f"shares from {stray}, which did not send client {me} keys as its neighbours")
    held, seed_shares, key_shares, refused = [], [], [], []
    for sender in sorted(received):
        try:
            key = crypto.agree(state["sk_enc"], peer_keys[sender][0], _share_key_context(spec.round_id, me, sender))
            plain = crypto.decrypt(key, received[sender], _shares_aad(spec.round_id, sender, me))
            if len(plain) != SHARES_PLAINTEXT_BYTES:
                raise SecAggError(f"{len(plain)} bytes of shares, expected {SHARES_PLAINTEXT_BYTES}")
            seed_share, key_share = plain[:crypto.SHARE_BYTES], plain[crypto.SHARE_BYTES:]
            if crypto.share_index(seed_share) != crypto.share_index(key_share):
                raise SecAggError("the seed share and the key share carry different indices")
        except SecAggError:
            refused.append(sender)
            continue
        held.append(sender)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    t = local_threshold(spec)
    if 1 + len(held) < t:
        raise SecAggError(f"client {me} holds the shares of only {len(held)} neighbours; the round needs {t - 1}")
    total = x + crypto.key_stream_words(state["self_seed"], spec.total_length, _self_domain(spec.round_id, me))
    for j in held:
        seed = crypto.agree(state["sk_mask"], peer_keys[j][1], _pair_seed_context(spec.round_id, me, j))
        words = crypto.key_stream_words(seed, spec.total_length, _pair_domain(spec.round_id, me, j))
        total = total + words if me < j else total - words  # uint64 wraps: arithmetic modulo 2**64
    masked = [pack_uint(segment, w).tobytes() for segment, w in zip(_split(total, spec), spec.widths)]
    held_ids = sorted([me, *held])
    shares_by = {me: (state["own_seed_share"], state["own_key_share"]),
                 **{j: (s, k) for j, s, k in zip(held, seed_shares, key_shares)}}
    # The private keys and the seed are not needed again; only the shares go on to stage 4.
    kept = {k: v for k, v in state.items() if k not in ("sk_enc", "sk_mask", "self_seed")}
    state = {**kept, "stage": "masked", "held_ids": held_ids,
             "held_seed_shares": b"".join(shares_by[j][0] for j in held_ids),
             "held_key_shares": b"".join(shares_by[j][1] for j in held_ids)}
    return state, {"round": spec.round_id, "stage": "masked", "masked": masked, "refused": refused}


def unmask_request_from_message(message: Mapping[str, object], spec: RoundSpec) -> tuple[list[int], list[int]]:
    """``(survivors, dropped)`` from the server's stage-4 message."""
    _check_header(message, spec, "unmask")
    return (_ids(_field(message, "survivors"), "survivors", spec.clients),
            _ids(_field(message, "dropped"), "dropped", spec.clients))


def client_unmask(state: State, spec: RoundSpec, me: int, survivors: Sequence[int],
                  dropped: Sequence[int]) -> tuple[State, Message]:
    """Stage 4: reveal the shares ``me`` holds of the survivors' self-mask seeds and of the
    dropped neighbours' mask private keys.

    ``survivors`` are all the clients whose masked input the server holds, ``dropped`` the
    neighbours whose shares ``me`` holds and that did not send it. Nothing is revealed unless
    the request is consistent: no client in both lists, ``me`` a survivor, at least
    ``threshold`` survivors, and never the key share of a client whose seed share ``me``
    revealed (or the reverse): with both the server could unmask that client."""
    survivors = _ids(survivors, "survivors", spec.clients)
    dropped = _ids(dropped, "dropped", spec.clients)
    survivors_set, dropped_set = set(survivors), set(dropped)
    if isinstance(state, Mapping) and state.get("stage") == "unmask":
        both = (survivors_set & set(state.get("revealed_key_of", []))) | (
            dropped_set & set(state.get("revealed_seed_of", [])))
        if both:
            raise SecAggError(f"client {me} already revealed the other share of {sorted(both)}; revealing "
                              "this one too would unmask them")
    _check_state(state, spec, me, "unmask")
    both = sorted(survivors_set & dropped_set)
    if both:
        raise SecAggError(f"{both} listed both as survivors and as dropped: revealing both shares would unmask them")
    if me not in survivors_set:
        raise SecAggError(f"client {me} is not among the survivors it is asked to unmask")
    if len(survivors) < spec.threshold:
        raise SecAggError(f"only {len(survivors)} survivors, the round's threshold is {spec.threshold}")
    held = state["held_ids"]
    peers = set(state["peer_ids"])
    for j in sorted(dropped_set):
        if j not in peers:
            raise SecAggError(f"asked to unmask dropped client {j}, which is not client {me}'s neighbour")
        if j not in held:
            raise SecAggError(f"asked to unmask dropped client {j}, whose shares client {me} does not hold")
    unheld = sorted((survivors_set & peers) - set(held))
    if unheld:
        raise SecAggError(f"survivors {unheld} are neighbours whose shares client {me} does not hold")
    s = crypto.SHARE_BYTES
    seed_of = [j for j in held if j in survivors_set]
    key_of = [j for j in held if j in dropped_set]
    seed_shares = [state["held_seed_shares"][held.index(j) * s:(held.index(j) + 1) * s] for j in seed_of]
    key_shares = [state["held_key_shares"][held.index(j) * s:(held.index(j) + 1) * s] for j in key_of]
    kept = {k: v for k, v in state.items() if k not in ("held_seed_shares", "held_key_shares")}
    state = {**kept, "stage": "unmask", "revealed_seed_of": seed_of, "revealed_key_of": key_of}
    return state, {"round": spec.round_id, "stage": "unmask", "seed_of": seed_of, "seed_shares": seed_shares,
                   "key_of": key_of, "key_shares": key_shares}


# ----------------------------------------------------------------------------- server side

def seed_commitment(round_id: int, client: int, seed: bytes) -> bytes:
    """SHA-256 of a client's self-mask seed, bound to the round and the client: sent in stage 1, so
    that the server can tell a seed rebuilt from a wrong share from the client's own."""
    return hashlib.sha256(b"hybnn-secagg seed" + _u64(round_id) + _u64(client) + seed).digest()


MAX_REBUILD_TRIES = 64
"""Subsets of the shares tried when the first ``t`` rebuild a secret that fails its check."""


def rebuild(shares: Sequence[tuple[int, bytes]], t: int, is_right) -> tuple[bytes | None, list[int]]:
    """A secret from ``(holder, share)`` pairs, the first ``t``-subset whose secret passes
    ``is_right`` (at most :data:`MAX_REBUILD_TRIES` subsets): ``(secret, holders of shares that
    contradict it)``; ``(None, [])`` when no subset tried passes."""
    from itertools import combinations, islice

    for subset in islice(combinations(range(len(shares)), t), MAX_REBUILD_TRIES):
        secret = crypto.combine([shares[i][1] for i in subset], t)
        if not is_right(secret):
            continue
        bad = []
        for i in sorted(set(range(len(shares))) - set(subset)):
            # a share agrees with the polynomial iff it can stand in for one of the subset's
            swapped = [shares[i][1]] + [shares[j][1] for j in subset[1:]]
            if crypto.combine(swapped, t) != secret:
                bad.append(shares[i][0])
        return secret, bad
    return None, []


def _is_low_order(public: bytes) -> bool:
    """A low-order point gives the all-zero shared secret with every private key (X25519 clamps
    private keys to multiples of the cofactor), so one trial agreement finds it."""
    try:
        crypto.agree(crypto.new_keypair()[0], public, b"check")
    except SecAggError:
        return True
    return False


def _internal(**kwargs: object):
    """A field of the server's own bookkeeping: not a constructor argument, and kept out of its
    repr (which would print keys and masked inputs)."""
    return field(init=False, repr=False, **kwargs)


@dataclass
class ServerRound:
    """The server's side of one round: call :meth:`request_keys`, then :meth:`collect_keys`,
    :meth:`collect_shares`, :meth:`collect_masked` and :meth:`aggregate` in turn with the
    clients' replies (``{client id: reply}``, clients that did not answer left out). Each
    collect returns the next stage's message per client still in the round.

    It holds the clients' public keys and masked inputs (until the sum is made), never an
    unmasked vector: it never has one."""

    spec: RoundSpec
    _done: str = _internal(default="")
    _dropped: dict[str, list[tuple[int, str]]] = _internal(default_factory=lambda: {s: [] for s in STAGES})
    _answered: dict[str, int] = _internal(default_factory=lambda: {s: 0 for s in STAGES})
    _skipped: str = _internal(default="")
    _keys: dict[int, tuple[bytes, bytes]] = _internal(default_factory=dict)
    _present: dict[int, tuple[int, ...]] = _internal(default_factory=dict)
    _partners: dict[int, frozenset[int]] = _internal(default_factory=dict)
    _masked: dict[int, np.ndarray] = _internal(default_factory=dict)
    _held: dict[int, frozenset[int]] = _internal(default_factory=dict)
    _survivors: tuple[int, ...] = _internal(default=())
    _unmask_keys_of: tuple[int, ...] = _internal(default=())
    _commitments: dict[int, bytes] = _internal(default_factory=dict)

    def __post_init__(self) -> None:
        self._neighbours = {c: frozenset(neighbours(self.spec, c)) for c in self.spec.clients}
        self._local_threshold = local_threshold(self.spec)

    # -- bookkeeping

    def _begin(self, stage: str) -> None:
        if self._skipped:
            raise SecAggError(f"round {self.spec.round_id} was skipped: {self._skipped}")
        if self._done == STAGES[-1]:
            raise SecAggError(f"round {self.spec.round_id} is complete; a stage {stage!r} cannot come now")
        expected = STAGES[STAGES.index(self._done) + 1] if self._done else STAGES[0]
        if stage != expected:
            raise SecAggError(f"the server collected stage {self._done or 'none'!r} last; {stage!r} cannot come now")

    def _drop(self, stage: str, client: int, reason: str) -> None:
        self._dropped[stage].append((client, reason))

    def _skip(self, stage: str, reason: str) -> RoundSkipped:
        self._skipped = f"stage {stage}: {reason}"
        return RoundSkipped(f"round {self.spec.round_id} skipped at stage {stage}: {reason}")

    def _take(self, stage: str, replies: Mapping[int, object], asked: Sequence[int] | frozenset[int],
              parse) -> dict[int, object]:
        """Each asked client's parsed reply; unasked, malformed and missing replies are dropped."""
        if not isinstance(replies, Mapping):
            raise SecAggError("the replies must be a dict {client id: reply}")
        asked = set(asked)
        parsed = {}
        for client, reply in replies.items():
            if client not in asked:
                self._drop(stage, client, f"replied to stage {stage!r} without being asked")
                continue
            try:
                parsed[client] = parse(client, _check_header(reply, self.spec, stage))
            except SecAggError as e:
                self._drop(stage, client, str(e))
        for client in sorted(asked - set(replies)):
            self._drop(stage, client, f"no reply to stage {stage!r}")
        self._answered[stage] = len(parsed)
        return parsed

    def _keep_sharing(self, stage: str, alive: set[int]) -> set[int]:
        """Drop, until none is left to drop, each client with too few present neighbours to
        share its secrets among (or to be unmasked by)."""
        t = self._local_threshold
        changed = True
        while changed:
            changed = False
            for c in sorted(alive):
                present = len(self._neighbours[c] & alive)
                if 1 + present < t:
                    alive.discard(c)
                    self._drop(stage, c, f"only {present} of its neighbours remain; its shares need {t - 1}")
                    changed = True
        return alive

    def _require_threshold(self, stage: str, alive: set[int] | frozenset[int]) -> None:
        if len(alive) < self.spec.threshold:
            raise self._skip(stage, f"{len(alive)} clients remain, the threshold is {self.spec.threshold}")

    def _message(self, stage: str, **fields: object) -> Message:
        return {**spec_to_config(self.spec), "round": self.spec.round_id, "stage": stage, **fields}

    # -- the stages

    def request_keys(self) -> Message:
        """The stage-1 message, the same for every client of the round."""
        return self._message("keys")

    def collect_keys(self, replies: Mapping[int, Mapping[str, object]]) -> dict[int, Message]:
        """Stage 1's replies: per client still in the round, the stage-2 message with its
        present neighbours' public keys."""
        self._begin("keys")

        def parse(client: int, reply: Mapping[str, object]) -> tuple[bytes, bytes]:
            keys = (_field(reply, "pk_enc"), _field(reply, "pk_mask"))
            for name, key in zip(("pk_enc", "pk_mask"), keys):
                if not isinstance(key, bytes) or len(key) != crypto.KEY_BYTES:
                    raise SecAggError(f"its {name} is not {crypto.KEY_BYTES} bytes")
                if _is_low_order(key):
                    raise SecAggError(f"its {name} is a low-order point")
            commitment = _field(reply, "seed_commitment")
            if not isinstance(commitment, bytes) or len(commitment) != 32:
                raise SecAggError("its seed_commitment is not 32 bytes")
            self._commitments[client] = commitment
            return keys

        keys = self._take("keys", replies, self.spec.clients, parse)
        owners: dict[bytes, list[int]] = {}
        for client, pair in keys.items():
            for key in pair:
                owners.setdefault(key, []).append(client)
        for key, clients in owners.items():
            if len(clients) > 1:
                for client in sorted(set(clients)):
                    if client in keys:
                        others = sorted(set(clients) - {client})
                        self._drop("keys", client, f"a public key duplicated by {others or 'its other key'}")
                        del keys[client]
        alive = self._keep_sharing("keys", set(keys))
        self._require_threshold("keys", alive)
        self._keys = {c: keys[c] for c in alive}
        self._present = {c: tuple(sorted(self._neighbours[c] & alive)) for c in alive}
        self._done = "keys"
        return {c: self._message("shares", ids=list(p), pk_enc=[self._keys[j][0] for j in p],
                                 pk_mask=[self._keys[j][1] for j in p])
                for c, p in self._present.items()}

    def collect_shares(self, replies: Mapping[int, Mapping[str, object]]) -> dict[int, Message]:
        """Stage 2's replies: route the encrypted shares; per client still in the round, the
        stage-3 message with the shares addressed to it."""
        self._begin("shares")

        def parse(client: int, reply: Mapping[str, object]) -> dict[int, bytes]:
            to = _ids(_field(reply, "to"), "to", self._present[client])
            ciphertexts = _bytes_list(_field(reply, "ciphertexts"), "ciphertexts", SHARES_CIPHERTEXT_BYTES)
            if len(to) != len(ciphertexts):
                raise SecAggError(f"{len(to)} recipients and {len(ciphertexts)} ciphertexts")
            missing = sorted(set(self._present[client]) - set(to))
            if missing:
                raise SecAggError(f"sent no shares to its present neighbours {missing}")
            return dict(zip(to, ciphertexts))

        routes = self._take("shares", replies, self._present, parse)
        alive = self._keep_sharing("shares", set(routes))
        self._require_threshold("shares", alive)
        self._partners = {c: frozenset(self._neighbours[c] & alive) for c in alive}
        self._done = "shares"
        return {c: self._message("masked", **{"from": sorted(p), "ciphertexts": [routes[j][c] for j in sorted(p)]})
                for c, p in self._partners.items()}

    def collect_masked(self, replies: Mapping[int, Mapping[str, object]]) -> dict[int, Message]:
        """Stage 3's replies: keep the masked inputs; per survivor, the stage-4 message."""
        self._begin("masked")
        spec = self.spec

        def parse(client: int, reply: Mapping[str, object]) -> tuple[np.ndarray, frozenset[int]]:
            masked = _bytes_list(_field(reply, "masked"), "masked")
            if len(masked) != len(spec.lengths):
                raise SecAggError(f"{len(masked)} masked segments, the round has {len(spec.lengths)}")
            segments = []
            for i, (data, n, w) in enumerate(zip(masked, spec.lengths, spec.widths)):
                if len(data) != packed_length(n * w):
                    raise SecAggError(f"masked segment {i} is {len(data)} bytes; {n} elements of {w} bits "
                                      f"take {packed_length(n * w)}")
                segments.append(unpack_uint(np.frombuffer(data, dtype=np.uint8), w, n))
            refused = _ids(_field(reply, "refused"), "refused", self._partners[client])
            return np.concatenate(segments), frozenset(refused)

        taken = self._take("masked", replies, self._partners, parse)
        refused_by: dict[int, list[int]] = {}
        for client, (_, refused) in taken.items():
            for sender in refused:
                refused_by.setdefault(sender, []).append(client)
        for sender in sorted(set(refused_by) & set(taken)):
            self._drop("masked", sender, f"clients {sorted(refused_by[sender])} could not decrypt the shares it sent")
        survivors = frozenset(taken) - set(refused_by)
        self._require_threshold("masked", survivors)
        # What each survivor holds, and so masked with: its partners less those it refused.
        self._held = {c: self._partners[c] - taken[c][1] for c in survivors}
        self._masked = {c: taken[c][0] for c in survivors}
        unmask_keys_of = set().union(*self._held.values()) - survivors
        t = self._local_threshold
        for owner in sorted(survivors | unmask_keys_of):
            holders = sum(1 for h in survivors if owner in self._held[h]) + (owner in survivors)
            if holders < t:
                what = "self-mask seed" if owner in survivors else "mask key"
                raise self._skip("masked", f"client {owner}'s {what} has {holders} holders left, {t} needed")
        self._survivors = tuple(sorted(survivors))
        self._unmask_keys_of = tuple(sorted(unmask_keys_of))
        self._done = "masked"
        return {c: self._message("unmask", survivors=list(self._survivors),
                                 dropped=sorted(self._held[c] & unmask_keys_of)) for c in self._survivors}

    def aggregate(self, replies: Mapping[int, Mapping[str, object]]) -> list[np.ndarray]:
        """Stage 4's replies: reconstruct the survivors' self-mask seeds and the dropped clients'
        mask keys, remove the masks, and return the survivors' sum, one uint64 array per
        segment modulo ``2**width``."""
        self._begin("unmask")
        spec, t = self.spec, self._local_threshold
        survivors = set(self._survivors)
        seed_shares: dict[int, list[bytes]] = {c: [] for c in self._survivors}
        key_shares: dict[int, list[bytes]] = {c: [] for c in self._unmask_keys_of}

        def parse(client: int, reply: Mapping[str, object]) -> list[tuple[dict[int, list[bytes]], int, bytes]]:
            found = []
            for kind, bucket in (("seed", seed_shares), ("key", key_shares)):
                owners = _ids(_field(reply, f"{kind}_of"), f"{kind}_of", spec.clients)
                shares = _bytes_list(_field(reply, f"{kind}_shares"), f"{kind}_shares")
                if len(owners) != len(shares):
                    raise SecAggError(f"{len(owners)} {kind}_of and {len(shares)} {kind}_shares")
                found += [(bucket, owner, share_bytes) for owner, share_bytes in zip(owners, shares)]
            return found

        for client, found in self._take("unmask", replies, self._survivors, parse).items():
            for bucket, owner, share_bytes in found:
                reason = self._share_problem(client, owner, share_bytes, bucket is seed_shares)
                if reason:
                    self._drop("unmask", client, reason)
                else:
                    bucket[owner].append((client, share_bytes))
        total = sum(self._masked.values()).astype(np.uint64)  # uint64 wraps: arithmetic modulo 2**64
        self._masked = {}  # the masked inputs are not needed once summed

        def secret_of(owner: int, kind: str, shares: list[tuple[int, bytes]], is_right) -> bytes:
            """The owner's secret, checked; a holder whose share contradicts it is named."""
            if len(shares) < t:
                raise self._skip("unmask", f"{len(shares)} shares of client {owner}'s {kind} came back, {t} needed")
            secret, bad = rebuild(shares, t, is_right)
            if secret is None:
                raise self._skip("unmask", f"client {owner}'s {kind}, rebuilt from its shares, does not match "
                                           f"what it committed to in stage 1 (holders sent wrong shares)")
            for holder in bad:
                self._drop("unmask", holder, f"its share of client {owner}'s {kind} is wrong (it contradicts the "
                                             f"{kind} the other shares rebuild, which the client committed to); "
                                             "its vector is still summed")
            return secret

        try:
            for owner in self._survivors:
                seed = secret_of(owner, "self-mask seed", seed_shares[owner],
                                 lambda secret, owner=owner: seed_commitment(spec.round_id, owner, secret)
                                 == self._commitments[owner])
                total -= crypto.key_stream_words(seed, spec.total_length, _self_domain(spec.round_id, owner))
            for owner in self._unmask_keys_of:
                private = secret_of(owner, "mask key", key_shares[owner],
                                    lambda secret, owner=owner: crypto.public_of(secret) == self._keys[owner][1])
                for s in self._survivors:
                    if owner in self._held[s]:
                        seed = crypto.agree(private, self._keys[s][1], _pair_seed_context(spec.round_id, s, owner))
                        words = crypto.key_stream_words(seed, spec.total_length, _pair_domain(spec.round_id, s, owner))
                        # Survivor s added the pair's mask if s < owner, else subtracted it: undo that.
                        total = total - words if s < owner else total + words
        except SecAggError as e:
            if isinstance(e, RoundSkipped):
                raise
            raise self._skip("unmask", str(e)) from e
        self._done = "unmask"
        return _split(total, spec)

    def _share_problem(self, holder: int, owner: int, share_bytes: bytes, is_seed: bool) -> str:
        """Why a share from ``holder`` of ``owner``'s secret cannot be used ('' if it can)."""
        kind = "self-mask seed" if is_seed else "mask key"
        wanted = owner in self._survivors if is_seed else owner in self._unmask_keys_of
        holds = owner == holder or owner in self._held.get(holder, ())
        if not wanted or not holds:
            return f"sent a share of client {owner}'s {kind}, which it was not asked for"
        try:
            index = crypto.share_index(share_bytes)
        except SecAggError as e:
            return f"its share of client {owner}'s {kind}: {e}"
        expected = _share_group(owner, self._present[owner]).index(holder) + 1
        if index != expected:
            return f"its share of client {owner}'s {kind} has index {index}, it was given index {expected}"
        return ""

    # -- the record

    @property
    def summed_clients(self) -> tuple[int, ...]:
        """The survivors: the clients whose vectors are in the sum."""
        return self._survivors

    @property
    def dropped(self) -> dict[str, list[tuple[int, str]]]:
        """Per stage, the clients dropped there (or whose reply was not used) and why."""
        return {stage: list(entries) for stage, entries in self._dropped.items()}

    def record(self) -> dict[str, object]:
        """Counts, ids and reasons of the round, for the run's record (no vectors, no keys)."""
        return {"round": self.spec.round_id, "clients": len(self.spec.clients), "threshold": self.spec.threshold,
                "neighbours_per_client": neighbourhood_degree(self.spec), "local_threshold": self._local_threshold,
                "answered": dict(self._answered), "completed_stage": self._done, "skipped": self._skipped,
                "summed": list(self._survivors), "unmasked_keys_of": list(self._unmask_keys_of),
                "dropped": {stage: [[c, r] for c, r in entries] for stage, entries in self._dropped.items()}}
