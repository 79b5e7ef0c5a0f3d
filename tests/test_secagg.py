"""Secure aggregation (common/secagg): the server's sum is the survivors' exact sum, dropouts
and hostile messages cost only the offending clients, and nothing a client sends alone
reveals its vector."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import numpy as np
import pytest

from common.errors import HyBNNError
from common.federated.sums import plain_sum
from common.packing import unpack_uint
from common.secagg import crypto
from common.secagg.errors import RoundSkipped, SecAggError
from common.secagg.protocol import (
    SHARES_CIPHERTEXT_BYTES,
    RoundSpec,
    ServerRound,
    ciphertexts_from_message,
    client_keys,
    client_masked_input,
    client_shares,
    client_unmask,
    default_threshold,
    keys_from_message,
    local_threshold,
    neighbourhood_degree,
    neighbours,
    new_round_spec,
    spec_from_config,
    spec_to_config,
    unmask_request_from_message,
)

WIDTHS = (1, 11, 17, 64)
LENGTHS = (40, 25, 16, 9)

Edit = Callable[[str, dict], None]


def _clients(n: int, rng: np.random.Generator) -> list[int]:
    """Flower-like node ids: large, spread over the signed 64-bit range."""
    ids = set()
    while len(ids) < n:
        ids.add(int(rng.integers(1, 2**63 - 1, dtype=np.int64)))
    return sorted(ids)


def _vector(spec: RoundSpec, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.integers(0, 2**w, n, dtype=np.uint64) if w < 64
            else rng.integers(0, 2**64, n, dtype=np.uint64) for n, w in zip(spec.lengths, spec.widths)]


def _spec(n: int, seed: int = 0, threshold: int | None = None, lengths=LENGTHS, widths=WIDTHS,
          round_id: int = 7) -> RoundSpec:
    return new_round_spec(round_id, _clients(n, np.random.default_rng(seed)), lengths, widths, threshold)


def run_round(spec: RoundSpec, vectors: dict[int, list[np.ndarray]], silent: dict[str, set[int]] | None = None,
              edit: Edit | None = None, server: ServerRound | None = None,
              carry: Callable[[dict], dict] = dict) -> tuple[ServerRound, list[np.ndarray]]:
    """One round of all four stages, as the transport would run it: every client gets only the
    server's message (the spec travels in it), ``silent[stage]`` lists clients that do not answer
    that stage, and ``edit(stage, replies)`` may change the replies before the server sees them.
    ``carry`` is what a message, a reply or a client's state goes through between two stages."""
    silent = silent or {}
    edit = edit or (lambda stage, replies: None)
    server = server or ServerRound(spec)
    states: dict[int, dict] = {}

    def answer(stage: str, messages: dict[int, dict], respond) -> dict[int, dict]:
        replies = {}
        for c, message in messages.items():
            if c in silent.get(stage, set()):
                continue
            message = carry(message)
            states[c], reply = respond(c, message, spec_from_config(message))
            states[c], replies[c] = carry(states[c]), carry(reply)
        edit(stage, replies)
        return replies

    request = server.request_keys()
    replies = answer("keys", {c: request for c in spec.clients}, lambda c, m, s: client_keys(s, c))
    messages = server.collect_keys(replies)
    replies = answer("shares", messages,
                     lambda c, m, s: client_shares(states[c], s, c, keys_from_message(m, s)))
    messages = server.collect_shares(replies)
    replies = answer("masked", messages, lambda c, m, s: client_masked_input(
        states[c], s, c, vectors[c], ciphertexts_from_message(m, s)))
    messages = server.collect_masked(replies)
    replies = answer("unmask", messages,
                     lambda c, m, s: client_unmask(states[c], s, c, *unmask_request_from_message(m, s)))
    return server, server.aggregate(replies)


def _vectors(spec: RoundSpec, seed: int = 1) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {c: _vector(spec, rng) for c in spec.clients}


def _assert_sum(spec: RoundSpec, total: list[np.ndarray], vectors: dict, summed: set[int] | list[int]) -> None:
    expected = plain_sum([vectors[c] for c in sorted(summed)], spec.widths)
    assert len(total) == len(expected)
    for got, want in zip(total, expected):
        assert got.dtype == np.uint64
        np.testing.assert_array_equal(got, want)


def _dropped_ids(server: ServerRound, stage: str) -> set[int]:
    return {c for c, _ in server.dropped[stage]}


def _spread(spec: RoundSpec, count: int, most: int) -> list[int]:
    """``count`` clients of which no neighbourhood (a client and its neighbours) holds more than ``most``."""
    closed = {c: {c, *neighbours(spec, c)} for c in spec.clients}
    chosen: list[int] = []
    for c in spec.clients:
        if all(len(closed[d] & {*chosen, c}) <= most for d in spec.clients):
            chosen.append(c)
    assert len(chosen) >= count
    return chosen[:count]


# ----------------------------------------------------------------------------- primitives

def test_agreement_is_symmetric_per_context_and_refuses_bad_keys():
    a_sk, a_pk = crypto.new_keypair()
    b_sk, b_pk = crypto.new_keypair()
    assert len(a_sk) == len(a_pk) == 32
    assert crypto.agree(a_sk, b_pk, b"ctx") == crypto.agree(b_sk, a_pk, b"ctx")
    assert crypto.agree(a_sk, b_pk, b"ctx") != crypto.agree(a_sk, b_pk, b"other")
    with pytest.raises(SecAggError, match="32 bytes"):
        crypto.agree(a_sk, b_pk[:31], b"ctx")
    for low_order in (bytes(32), (1).to_bytes(32, "little")):
        with pytest.raises(SecAggError, match="low-order|all-zero"):
            crypto.agree(a_sk, low_order, b"ctx")
    assert issubclass(SecAggError, HyBNNError) and issubclass(RoundSkipped, SecAggError)


def test_encryption_refuses_tampering_and_other_associated_data():
    key = os.urandom(32)
    ct = crypto.encrypt(key, b"two shares", b"round 7 from 1 to 2")
    assert crypto.decrypt(key, ct, b"round 7 from 1 to 2") == b"two shares"
    assert crypto.encrypt(key, b"two shares", b"a")[:12] != crypto.encrypt(key, b"two shares", b"a")[:12]
    with pytest.raises(SecAggError, match="another round"):
        crypto.decrypt(key, ct, b"round 6 from 1 to 2")
    flipped = ct[:20] + bytes([ct[20] ^ 1]) + ct[21:]
    with pytest.raises(SecAggError, match="does not authenticate"):
        crypto.decrypt(key, flipped, b"round 7 from 1 to 2")
    with pytest.raises(SecAggError, match="shorter"):
        crypto.decrypt(key, ct[:20], b"round 7 from 1 to 2")


def test_masks_are_deterministic_within_width_and_depend_on_seed_and_domain():
    seed = os.urandom(32)
    masks = crypto.mask(seed, [1000, 1000, 1000], [1, 17, 64], b"d")
    again = crypto.mask(seed, [1000, 1000, 1000], [1, 17, 64], b"d")
    for m, a, w in zip(masks, again, (1, 17, 64)):
        assert m.dtype == np.uint64 and m.shape == (1000,)
        np.testing.assert_array_equal(m, a)
        if w < 64:
            assert int(m.max()) < 2**w
    assert int(masks[2].max()) >= 2**63  # the 64-bit segment uses all its bits
    assert set(np.unique(masks[0])) == {0, 1}
    other_domain = crypto.mask(seed, [1000], [64], b"e")[0]
    other_seed = crypto.mask(bytes([seed[0] ^ 1]) + seed[1:], [1000], [64], b"d")[0]
    assert np.count_nonzero(other_domain == crypto.mask(seed, [1000], [64], b"d")[0]) == 0
    assert np.count_nonzero(other_seed == crypto.mask(seed, [1000], [64], b"d")[0]) == 0
    with pytest.raises(SecAggError, match="32 bytes"):
        crypto.mask(seed[:16], [10], [8], b"d")


def test_shamir_any_t_shares_give_the_secret_back():
    secret = os.urandom(32)
    shares = crypto.share(secret, 7, 4)
    assert [crypto.share_index(s) for s in shares] == list(range(1, 8))
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == crypto.SHARE_BYTES
    assert crypto.combine(shares[3:], 4) == secret
    assert crypto.combine([shares[6], shares[0], shares[4], shares[2]], 4) == secret
    with pytest.raises(SecAggError, match="3 Shamir shares, 4 needed"):
        crypto.combine(shares[:3], 4)
    with pytest.raises(SecAggError, match="34 bytes"):
        crypto.combine(shares[:3] + [shares[3][:-1]], 4)
    with pytest.raises(SecAggError, match="index 0"):
        crypto.combine(shares[:3] + [bytes(crypto.SHARE_BYTES)], 4)
    with pytest.raises(SecAggError, match="two Shamir shares with index 1"):
        crypto.combine(shares[:3] + [shares[0]], 4)
    with pytest.raises(SecAggError, match="threshold"):
        crypto.share(secret, 3, 4)


# ----------------------------------------------------------------------------- the spec and the graph

def test_default_threshold_and_small_rounds_refused():
    assert [default_threshold(n) for n in (3, 4, 9, 10, 40, 100)] == [2, 3, 6, 7, 27, 67]
    with pytest.raises(SecAggError, match="at least 3 clients"):
        default_threshold(2)
    with pytest.raises(SecAggError, match="at least 3 clients"):
        new_round_spec(1, [5, 9], [4], [8])


@pytest.mark.parametrize("change, message", [
    (dict(threshold=10), r"threshold 10 outside 2\.\.9"),
    (dict(threshold=1), "threshold 1 outside"),
    (dict(widths=(8, 65)), "width 65 outside"),
    (dict(widths=(8, 0)), "width 0 outside"),
    (dict(widths=(8,)), "as many widths as lengths"),
    (dict(clients=(3, 2, 1, 4, 5, 6, 7, 8, 9)), "sorted and distinct"),
    (dict(clients=(1, 1, 2, 3, 4, 5, 6, 7, 8)), "sorted and distinct"),
    (dict(clients=(-1, 1, 2, 3, 4, 5, 6, 7, 8)), "client id -1 outside"),
    (dict(graph_seed=b"short"), "graph seed"),
    (dict(round_id=True), "round id must be an int"),
])
def test_spec_validation(change, message):
    base = dict(round_id=1, clients=tuple(range(1, 10)), threshold=6, lengths=(3, 4), widths=(8, 64),
                graph_seed=bytes(32))
    RoundSpec(**base)
    with pytest.raises(SecAggError, match=message):
        RoundSpec(**{**base, **change})


def test_spec_travels_as_a_flat_config():
    spec = _spec(12)
    config = spec_to_config(spec)
    assert all(isinstance(v, (int, bytes)) or (isinstance(v, list) and all(isinstance(x, int) for x in v))
               for v in config.values())
    assert spec_from_config({**config, "round": 3, "other": b"x"}) == spec
    with pytest.raises(SecAggError, match="lacks spec.threshold"):
        spec_from_config({k: v for k, v in config.items() if k != "spec.threshold"})
    with pytest.raises(SecAggError, match="must be an int"):
        spec_from_config({**config, "spec.widths": [8, 8, True, 8]})
    with pytest.raises(SecAggError, match="graph seed"):
        spec_from_config({**config, "spec.graph_seed": b"\x00" * 31})


def test_small_rounds_link_everyone_large_rounds_a_ring():
    for n in (3, 5, 9, 10, 21):
        spec = _spec(n)
        assert neighbourhood_degree(spec) == n - 1
        assert local_threshold(spec) == spec.threshold
        assert all(neighbours(spec, c) == tuple(d for d in spec.clients if d != c) for c in spec.clients)
    spec = _spec(40)
    assert neighbourhood_degree(spec) == 12  # 2 ceil(log2 40)
    assert local_threshold(spec) == 9  # ceil(27 * 13 / 40)
    assert neighbourhood_degree(_spec(22)) == 10  # 2 ceil(log2 22): the first ring
    table = {c: neighbours(spec, c) for c in spec.clients}
    for c, linked in table.items():
        assert len(linked) == 12 and c not in linked
        assert all(c in table[j] for j in linked)  # the relation is symmetric
    # The ring follows the graph seed: another seed, another ring; the same seed, the same one.
    reseeded = RoundSpec(spec.round_id, spec.clients, spec.threshold, spec.lengths, spec.widths, os.urandom(32))
    assert {c: neighbours(reseeded, c) for c in spec.clients} != table
    same = RoundSpec(spec.round_id, spec.clients, spec.threshold, spec.lengths, spec.widths, spec.graph_seed)
    assert {c: neighbours(same, c) for c in spec.clients} == table
    with pytest.raises(SecAggError, match="not a client"):
        neighbours(spec, 12345)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("n", [3, 5, 9, 10, 40])
def test_round_trip_gives_the_exact_sum(n):
    spec = _spec(n, seed=n)
    vectors = _vectors(spec, seed=n)
    server, total = run_round(spec, vectors)
    _assert_sum(spec, total, vectors, spec.clients)
    assert server.summed_clients == spec.clients
    assert all(not entries for entries in server.dropped.values())


def test_dropouts_up_to_the_threshold_are_tolerated_one_more_skips_the_round():
    spec = _spec(9, threshold=6)
    vectors = _vectors(spec)
    gone = set(spec.clients[2:5])
    server, total = run_round(spec, vectors, silent={"masked": gone})
    _assert_sum(spec, total, vectors, set(spec.clients) - gone)
    assert _dropped_ids(server, "masked") == gone
    assert server.record()["unmasked_keys_of"] == sorted(gone)
    with pytest.raises(RoundSkipped, match="5 clients remain, the threshold is 6"):
        run_round(spec, vectors, silent={"masked": gone | {spec.clients[0]}})


def test_ten_clients_at_threshold_seven_survive_any_three_dropouts_not_four():
    # At N = 10 everyone is everyone's neighbour: any 7 survivors hold every secret's shares.
    spec = _spec(10, seed=6)
    assert (spec.threshold, neighbourhood_degree(spec), local_threshold(spec)) == (7, 9, 7)
    vectors = _vectors(spec)
    for gone in (set(spec.clients[:3]), set(spec.clients[3:6]), {spec.clients[0], spec.clients[4], spec.clients[9]}):
        server, total = run_round(spec, vectors, silent={"masked": gone})
        _assert_sum(spec, total, vectors, set(spec.clients) - gone)
    with pytest.raises(RoundSkipped, match="6 clients remain, the threshold is 7"):
        run_round(spec, vectors, silent={"masked": set(spec.clients[:4])})


def test_dropouts_at_every_stage():
    spec = _spec(9, seed=3, threshold=4)
    vectors = _vectors(spec)
    silent = {"keys": {spec.clients[0]}, "shares": {spec.clients[4]}, "masked": {spec.clients[7]},
              "unmask": {spec.clients[1], spec.clients[8]}}
    server, total = run_round(spec, vectors, silent=silent)
    # Silent at unmask only: its masked input is in, and still summed.
    summed = set(spec.clients) - silent["keys"] - silent["shares"] - silent["masked"]
    _assert_sum(spec, total, vectors, summed)
    assert set(server.summed_clients) == summed
    for stage, gone in silent.items():
        assert _dropped_ids(server, stage) == gone
    assert server.record()["answered"] == {"keys": 8, "shares": 7, "masked": 6, "unmask": 4}


def test_ring_round_with_dropouts_at_every_stage():
    spec = _spec(40, seed=4)
    vectors = _vectors(spec)
    # Neighbourhoods of 13 need 9 holders: at most 4 of the 6 lost in any one.
    gone = _spread(spec, 6, most=4)
    silent = {"keys": {gone[0]}, "shares": {gone[1]}, "masked": {gone[2], gone[3]}, "unmask": {gone[4], gone[5]}}
    server, total = run_round(spec, vectors, silent=silent)
    summed = set(spec.clients) - set(gone[:4])
    _assert_sum(spec, total, vectors, summed)
    assert set(server.summed_clients) == summed
    for stage, lost in silent.items():
        assert _dropped_ids(server, stage) == lost


def test_too_few_shares_back_skips_the_round_naming_the_secret():
    spec = _spec(9, threshold=6)
    vectors = _vectors(spec)
    gone = set(spec.clients[:3])
    with pytest.raises(RoundSkipped, match="5 shares of client .*self-mask seed came back, 6 needed") as caught:
        run_round(spec, vectors, silent={"masked": gone, "unmask": {spec.clients[5]}})
    assert "unmask" in str(caught.value)


def test_a_client_left_with_too_few_neighbours_is_dropped_and_so_may_its_neighbours_be():
    spec = _spec(40, seed=5)
    vectors = _vectors(spec)
    victim = spec.clients[0]
    # Five of victim's twelve neighbours never answer: it keeps 7 + itself, fewer than the 9
    # holders its shares need. Its ring neighbours lose the same five and then victim itself:
    # the thin neighbourhoods fall one after the other, and the round with them.
    silent_ones = set(neighbours(spec, victim)[:5])
    server = ServerRound(spec)
    with pytest.raises(RoundSkipped, match="stage keys: .* the threshold is 27"):
        run_round(spec, vectors, silent={"keys": silent_ones}, server=server)
    thin = {c for c, r in server.dropped["keys"] if "its shares need 8" in r}
    assert victim in thin and thin.isdisjoint(silent_ones)
    assert _dropped_ids(server, "keys") == thin | silent_ones
    assert server.record()["skipped"].startswith("stage keys")


# ----------------------------------------------------------------------------- what the server sees

def test_masked_input_is_uniform_and_differs_from_the_input():
    spec = _spec(3, lengths=(20000, 500), widths=(8, 64))
    captured: dict[int, list[bytes]] = {}
    vectors = {c: [np.zeros(20000, dtype=np.uint64), np.zeros(500, dtype=np.uint64)] for c in spec.clients}
    vectors[spec.clients[1]][1] = np.arange(500, dtype=np.uint64)

    def keep(stage: str, replies: dict) -> None:
        if stage == "masked":
            captured.update({c: r["masked"] for c, r in replies.items()})

    _, total = run_round(spec, vectors, edit=keep)
    np.testing.assert_array_equal(total[1], np.arange(500, dtype=np.uint64))
    elements = unpack_uint(np.frombuffer(captured[spec.clients[0]][0], dtype=np.uint8), 8, 20000)
    counts = np.bincount(elements.astype(np.int64), minlength=256)
    expected = 20000 / 256
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    # 330.52 is chi-square's 0.999 quantile at 255 degrees of freedom (mpmath's regularized
    # incomplete gamma: P(255/2, 330.52/2) = 0.999); a uniform mask exceeds it once in 1000 runs.
    assert chi_square < 330.52
    for c in spec.clients[:2]:
        wide = unpack_uint(np.frombuffer(captured[c][1], dtype=np.uint8), 64, 500)
        assert np.count_nonzero(wide == vectors[c][1]) == 0
    first, second = (unpack_uint(np.frombuffer(captured[c][1], dtype=np.uint8), 64, 500) for c in spec.clients[:2])
    assert np.count_nonzero(first == second) == 0


def _walk(value, found: list) -> None:
    found.append(value)
    if isinstance(value, dict):
        for k, v in value.items():
            _walk(k, found)
            _walk(v, found)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _walk(v, found)


def test_the_record_holds_counts_ids_and_reasons_and_the_server_no_vector():
    spec = _spec(9, threshold=6, lengths=(300,), widths=(20,))
    vectors = _vectors(spec)
    server, total = run_round(spec, vectors, silent={"masked": {spec.clients[3]}})
    found: list = []
    _walk(server.record(), found)
    assert all(isinstance(v, (int, str)) for v in found if not isinstance(v, (dict, list)))
    assert server.record()["dropped"]["masked"][0][0] == spec.clients[3]
    assert server.record()["summed"] == sorted(set(spec.clients) - {spec.clients[3]})
    held: list = []
    _walk(vars(server), held)
    arrays = [v for v in held if isinstance(v, np.ndarray)]
    assert not [a for a in arrays if a.size == spec.total_length], "a vector-length array stayed in the server"
    assert total[0].shape == (300,)


# ----------------------------------------------------------------------------- hostile inputs

def _replace(stage: str, client: int, change: Callable[[dict], dict]) -> Edit:
    def edit(at: str, replies: dict) -> None:
        if at == stage and client in replies:
            replies[client] = change(dict(replies[client]))
    return edit


@pytest.mark.parametrize("stage, change, reason", [
    ("keys", lambda r: {**r, "pk_enc": r["pk_enc"][:31]}, "pk_enc is not 32 bytes"),
    ("keys", lambda r: {**r, "pk_mask": bytes(32)}, "pk_mask is a low-order point"),
    ("keys", lambda r: {**r, "round": r["round"] - 1}, "round 6, this is round 7"),
    ("keys", lambda r: {k: v for k, v in r.items() if k != "pk_mask"}, "lacks its 'pk_mask'"),
    ("shares", lambda r: {**r, "ciphertexts": [c[:-1] for c in r["ciphertexts"]]},
     f"expected {SHARES_CIPHERTEXT_BYTES}"),
    ("shares", lambda r: {**r, "to": r["to"][:-1], "ciphertexts": r["ciphertexts"][:-1]}, "sent no shares to"),
    ("shares", lambda r: {**r, "to": r["to"] + [99], "ciphertexts": r["ciphertexts"] * 2}, r"names \[99\]"),
    ("shares", lambda r: {**r, "stage": "keys"}, "stage 'keys' where stage 'shares' was asked"),
    ("masked", lambda r: {**r, "masked": [r["masked"][0] + b"\0", *r["masked"][1:]]}, "masked segment 0 is"),
    ("masked", lambda r: {**r, "masked": r["masked"][:-1]}, "3 masked segments"),
    ("masked", lambda r: {**r, "round": r["round"] - 1}, "a replay"),
    ("masked", lambda r: {**r, "masked": "not bytes"}, "list of bytes"),
])
def test_a_malformed_reply_drops_that_client_only(stage, change, reason):
    spec = _spec(9, threshold=6)
    vectors = _vectors(spec)
    bad = spec.clients[4]
    server, total = run_round(spec, vectors, edit=_replace(stage, bad, change))
    assert [c for c, _ in server.dropped[stage]] == [bad]
    assert any(re.search(reason, r) for _, r in server.dropped[stage]), server.dropped[stage]
    assert bad not in server.summed_clients
    _assert_sum(spec, total, vectors, set(spec.clients) - {bad})


def test_garbage_shares_between_clients_drop_their_sender():
    spec = _spec(9, threshold=6)
    vectors = _vectors(spec)
    bad = spec.clients[2]
    garbage = _replace("shares", bad, lambda r: {**r, "ciphertexts": [os.urandom(SHARES_CIPHERTEXT_BYTES)
                                                                      for _ in r["ciphertexts"]]})
    server, total = run_round(spec, vectors, edit=garbage)
    # The server cannot read shares; the receivers refuse them, and the server leaves the sender out.
    assert [c for c, _ in server.dropped["masked"]] == [bad]
    assert "could not decrypt the shares it sent" in server.dropped["masked"][0][1]
    _assert_sum(spec, total, vectors, set(spec.clients) - {bad})


def test_a_bad_unmask_share_is_not_used_and_the_sum_stands():
    spec = _spec(9, threshold=6)
    vectors = _vectors(spec)
    bad = spec.clients[6]

    def corrupt(r: dict) -> dict:
        shares = list(r["seed_shares"])
        shares[0] = shares[0][:-3]  # wrong length
        shares[1] = shares[1][:1] + b"\xff" + shares[1][2:]  # an index it was never given
        return {**r, "seed_shares": shares, "seed_of": r["seed_of"], "key_of": [spec.clients[0]],
                "key_shares": [bytes(crypto.SHARE_BYTES)]}

    server, total = run_round(spec, vectors, edit=_replace("unmask", bad, corrupt))
    reasons = [r for c, r in server.dropped["unmask"] if c == bad]
    assert {c for c, _ in server.dropped["unmask"]} == {bad}
    assert any("34 bytes" in r for r in reasons)
    assert any("has index" in r for r in reasons)
    assert any("mask key, which it was not asked for" in r for r in reasons)
    _assert_sum(spec, total, vectors, spec.clients)  # still summed: only its bad shares were set aside


def test_duplicate_public_keys_drop_both_holders():
    spec = _spec(9, threshold=6)
    vectors = _vectors(spec)
    copier, victim = spec.clients[1], spec.clients[5]

    def copy(stage: str, replies: dict) -> None:
        if stage == "keys":
            replies[copier] = {**replies[copier], "pk_mask": replies[victim]["pk_mask"]}

    server, total = run_round(spec, vectors, edit=copy)
    assert _dropped_ids(server, "keys") == {copier, victim}
    assert all("duplicated" in r for _, r in server.dropped["keys"])
    _assert_sum(spec, total, vectors, set(spec.clients) - {copier, victim})


def test_replies_to_a_stage_not_asked_are_dropped():
    spec = _spec(9, threshold=6)
    vectors = _vectors(spec)
    late = spec.clients[3]
    state, reply = client_keys(spec, late)

    def sneak_in(stage: str, replies: dict) -> None:
        if stage == "shares":
            replies[late] = {"round": spec.round_id, "stage": "shares", "to": [], "ciphertexts": []}
        if stage == "masked":
            replies[123] = {"round": spec.round_id, "stage": "masked"}

    server, total = run_round(spec, vectors, silent={"keys": {late}}, edit=sneak_in)
    assert server.dropped["shares"] == [(late, "replied to stage 'shares' without being asked")]
    assert server.dropped["masked"] == [(123, "replied to stage 'masked' without being asked")]
    _assert_sum(spec, total, vectors, set(spec.clients) - {late})
    with pytest.raises(SecAggError, match="round 7 is complete"):
        server.collect_keys({})


class _Clients:
    """Three clients of one round, stage by stage, for the client-side refusals."""

    def __init__(self, round_id: int = 7) -> None:
        self.spec = new_round_spec(round_id, [11, 22, 33, 44], [8], [16], threshold=3)
        self.server = ServerRound(self.spec)
        self.states, replies = {}, {}
        for c in self.spec.clients:
            self.states[c], replies[c] = client_keys(self.spec, c)
        self.keys_messages = self.server.collect_keys(replies)
        replies = {}
        self.after_keys = dict(self.states)
        for c, m in self.keys_messages.items():
            self.states[c], replies[c] = client_shares(self.states[c], self.spec, c, keys_from_message(m, self.spec))
        self.share_messages = self.server.collect_shares(replies)
        self.after_shares = dict(self.states)
        replies = {}
        for c, m in self.share_messages.items():
            self.states[c], replies[c] = client_masked_input(
                self.states[c], self.spec, c, [np.arange(8, dtype=np.uint64)], ciphertexts_from_message(m, self.spec))
        self.unmask_messages = self.server.collect_masked(replies)


def test_client_refuses_stages_out_of_order_and_twice():
    run = _Clients()
    spec, me = run.spec, 11
    with pytest.raises(SecAggError, match="stage 'masked' asked before stage 'shares'"):
        client_masked_input(run.after_keys[me], spec, me, [np.zeros(8, dtype=np.uint64)], {})
    with pytest.raises(SecAggError, match="stage 'shares' was already answered"):
        client_shares(run.after_shares[me], spec, me, keys_from_message(run.keys_messages[me], spec))
    with pytest.raises(SecAggError, match="stage 'keys' where stage 'masked' was asked"):
        ciphertexts_from_message({**run.share_messages[me], "stage": "keys"}, spec)


def test_client_refuses_another_rounds_messages():
    run, previous = _Clients(round_id=7), _Clients(round_id=6)
    me = 22
    with pytest.raises(SecAggError, match="round 6 on a state of round 7"):
        client_shares(run.after_keys[me], previous.spec, me, keys_from_message(previous.keys_messages[me],
                                                                              previous.spec))
    with pytest.raises(SecAggError, match="round 6, this is round 7"):
        keys_from_message(previous.keys_messages[me], run.spec)
    # Shares made for round 6 do not decrypt in round 7 (another key, and the round in the AAD): refused.
    received = ciphertexts_from_message(run.share_messages[me], run.spec)
    stale = ciphertexts_from_message(previous.share_messages[me], previous.spec)
    _, reply = client_masked_input(run.after_shares[me], run.spec, me, [np.zeros(8, dtype=np.uint64)],
                                   {**received, 11: stale[11]})
    assert reply["refused"] == [11]


def test_client_refuses_shares_it_cannot_use():
    run = _Clients()
    spec, me = run.spec, 33
    received = ciphertexts_from_message(run.share_messages[me], spec)
    wrong_len = {j: ct[:-1] for j, ct in received.items()}
    with pytest.raises(SecAggError, match="holds the shares of only 0 neighbours; the round needs 2"):
        client_masked_input(run.after_shares[me], spec, me, [np.zeros(8, dtype=np.uint64)], wrong_len)
    with pytest.raises(SecAggError, match="not a client of round|did not send client 33 keys"):
        client_masked_input(run.after_shares[me], spec, me, [np.zeros(8, dtype=np.uint64)], {**received, 99: b"x"})
    with pytest.raises(SecAggError, match="beyond its 16 bits"):
        client_masked_input(run.after_shares[me], spec, me, [np.full(8, 2**16, dtype=np.uint64)], received)
    with pytest.raises(SecAggError, match=r"shape \(7,\)"):
        client_masked_input(run.after_shares[me], spec, me, [np.zeros(7, dtype=np.uint64)], received)
    with pytest.raises(SecAggError, match="negative"):
        client_masked_input(run.after_shares[me], spec, me, [-np.ones(8, dtype=np.int64)], received)


def test_client_refuses_duplicate_and_foreign_public_keys():
    run = _Clients()
    spec, me = run.spec, 44
    keys = keys_from_message(run.keys_messages[me], spec)
    duplicated = {**keys, 11: (keys[22][0], keys[11][1])}
    with pytest.raises(SecAggError, match="client 22's public key duplicates client 11's"):
        client_shares(run.after_keys[me], spec, me, duplicated)
    own = {**keys, 11: (run.after_keys[me]["pk_enc"], keys[11][1])}
    with pytest.raises(SecAggError, match="duplicates client 44's"):
        client_shares(run.after_keys[me], spec, me, own)
    with pytest.raises(SecAggError, match="sharing its secrets needs 2"):
        client_shares(run.after_keys[me], spec, me, {11: keys[11]})


def test_client_never_reveals_both_shares_of_one_client():
    run = _Clients()
    spec, me = run.spec, 22
    survivors, dropped = unmask_request_from_message(run.unmask_messages[me], spec)
    assert survivors == [11, 22, 33, 44] and dropped == []
    state = run.states[me]
    with pytest.raises(SecAggError, match=r"\[33\] listed both as survivors and as dropped"):
        client_unmask(state, spec, me, [11, 22, 33], [33])
    with pytest.raises(SecAggError, match="not among the survivors"):
        client_unmask(state, spec, me, [11, 33, 44], [])
    with pytest.raises(SecAggError, match="only 2 survivors, the round's threshold is 3"):
        client_unmask(state, spec, me, [11, 22], [33])
    with pytest.raises(SecAggError, match="not a client of round|names"):
        client_unmask(state, spec, me, [11, 22, 33], [55])
    state, reply = client_unmask(state, spec, me, survivors, dropped)
    assert reply["seed_of"] == [11, 22, 33, 44] and reply["key_of"] == []
    assert all(len(s) == crypto.SHARE_BYTES for s in reply["seed_shares"])
    with pytest.raises(SecAggError, match=r"already revealed the other share of \[33\]"):
        client_unmask(state, spec, me, [11, 22, 44], [33])
    with pytest.raises(SecAggError, match="stage 'unmask' was already answered"):
        client_unmask(state, spec, me, survivors, dropped)
    assert run.server.aggregate({me: reply, 11: client_unmask(run.states[11], spec, 11, survivors, [])[1],
                                 33: client_unmask(run.states[33], spec, 33, survivors, [])[1]})[0].tolist() \
        == [4 * i for i in range(8)]


def _through_config_record(values: dict) -> dict:
    """A dict as Flower carries it: a ConfigRecord, serialized and parsed back."""
    from flwr.app import ConfigRecord
    from flwr.common import serde

    return dict(serde.config_record_from_proto(serde.config_record_to_proto(ConfigRecord(values))))


def test_a_round_survives_flowers_config_records():
    spec = _spec(5, seed=8)
    vectors = _vectors(spec)
    server, total = run_round(spec, vectors, silent={"masked": {spec.clients[1]}}, carry=_through_config_record)
    _assert_sum(spec, total, vectors, set(spec.clients) - {spec.clients[1]})


def test_client_state_and_messages_fit_a_flower_config_record():
    run = _Clients()
    allowed = (bytes, int, str, float, bool)
    for state in [*run.after_keys.values(), *run.after_shares.values(), *run.states.values()]:
        for key, value in state.items():
            assert isinstance(key, str)
            assert isinstance(value, allowed) or (
                isinstance(value, list) and all(isinstance(v, int) for v in value)), key
    for messages in (run.keys_messages, run.share_messages, run.unmask_messages):
        for message in messages.values():
            for value in message.values():
                assert isinstance(value, allowed) or (isinstance(value, list) and all(
                    isinstance(v, allowed) for v in value) and len({type(v) for v in value}) <= 1)
    # Secrets leave the state once they are shared and used.
    assert not {"sk_enc", "sk_mask", "self_seed"} & set(run.states[11])


def _corrupt_seed_shares(liars: set[int], owner_of_interest=None):
    """An edit that makes ``liars`` send wrong self-mask-seed shares (right index, wrong value)."""
    def edit(stage: str, replies: dict[int, dict]) -> None:
        if stage != "unmask":
            return
        for c in liars:
            reply = replies[c]
            reply["seed_shares"] = [s[:2] + bytes(b ^ 0x5A for b in s[2:]) for s in reply["seed_shares"]]
    return edit


def test_a_wrong_seed_share_is_found_by_the_seed_commitment_and_the_sum_stays_exact():
    # Nine clients, threshold 6: each seed has 9 shares, 6 rebuild it. One liar's shares are
    # outvoted by the commitment check; its own vector is still summed, and it is named.
    spec = _spec(9, seed=11, threshold=6)
    vectors = _vectors(spec)
    liar = spec.clients[4]
    server, total = run_round(spec, vectors, edit=_corrupt_seed_shares({liar}))
    _assert_sum(spec, total, vectors, spec.clients)
    named = {c for c, reason in server.dropped["unmask"] if "is wrong" in reason}
    assert named == {liar}


def test_too_many_wrong_seed_shares_skip_the_round_instead_of_a_wrong_sum():
    # Four liars of nine at threshold 6: only 5 right shares of each seed remain, and every
    # 6-subset holds a wrong one; the commitment refuses each, and the round is skipped.
    spec = _spec(9, seed=12, threshold=6)
    vectors = _vectors(spec)
    with pytest.raises(RoundSkipped, match="does not match what it committed to"):
        run_round(spec, vectors, edit=_corrupt_seed_shares(set(spec.clients[:4])))
