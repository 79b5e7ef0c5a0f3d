"""Attacks by clients on the aggregation: 1 of 5 and 2 of 5 hostile replies against PackedFedAvg.

Honest clients share a target sign vector, each with a few signs of its own; hostile
clients corrupt what they send. The global model must keep the honest majority's vote,
the batch-norm numbers within the honest clients' range, the round must go on, and
the round's log must name every dropped or capped reply.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from common.federated import codec
from common.bnn.model import BNNConfig
from common.federated.wire import METRIC, RECORD, payload_to_record, record_nbytes, record_to_payload
from server.strategy import PackedFedAvg

CONFIG = BNNConfig(in_bits=64, hidden=(32,), num_classes=2)  # 64x32 + 32x2 = 2,112 binary weights
LAYOUT = codec.layout_for(CONFIG)
N_HONEST_EXAMPLES = 2000
OWN_SIGNS = 0.05
"""Share of each honest client's signs that differ from the target."""

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def honest_bn(rng: np.random.Generator) -> np.ndarray:
    """Batch-norm numbers near an honest model's: weights ~1, biases/means ~0, variances ~1."""
    bn = rng.normal(0.0, 0.1, LAYOUT.n_bn).astype(np.float32)
    offset = 0
    for name, size in zip(LAYOUT.bn_names, LAYOUT.bn_sizes):
        if name.endswith(".weight") or name.endswith(".running_var"):
            bn[offset:offset + size] = 1.0 + np.abs(bn[offset:offset + size])
        offset += size
    return bn


def message(node_id: int, arrays: ArrayRecord, metrics: dict) -> Message:
    ins = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    return Message(content=RecordDict({RECORD.arrays: arrays, RECORD.metrics: MetricRecord(metrics)}), reply_to=ins)


def honest_metrics(node_id: int, n: int = N_HONEST_EXAMPLES) -> dict:
    return {METRIC.num_examples: n, METRIC.train_loss: 0.2, METRIC.train_acc: 0.95,
            METRIC.train_seconds: 1.5, METRIC.codec_version: codec.CODEC_VERSION, METRIC.partition_id: node_id - 1}


class Federation:
    """Five clients' replies for one round: honest ones near ``target``, and the attack's."""

    def __init__(self, seed: int = 0, clients: int = 5) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.target = np.where(rng.random(LAYOUT.n_binary) < 0.5, -1.0, 1.0).astype(np.float32)
        self.signs = {}
        self.bns = {}
        for node in range(1, clients + 1):
            own = rng.random(LAYOUT.n_binary) < OWN_SIGNS
            self.signs[node] = np.where(own, -self.target, self.target).astype(np.float32)
            self.bns[node] = honest_bn(rng)

    def honest_reply(self, node: int, **metrics) -> Message:
        arrays = payload_to_record(codec.encode_signs(self.signs[node], self.bns[node]))
        return message(node, arrays, {**honest_metrics(node), **metrics})

    def replies(self, hostile: dict[int, Message]) -> list[Message]:
        return [hostile.get(node) or self.honest_reply(node) for node in self.signs]

    def honest_votes(self, hostile: set[int]) -> np.ndarray:
        """Per weight, the honest clients' sum of signs."""
        return sum(self.signs[n] for n in self.signs if n not in hostile)


def run_round(replies: list[Message], **options) -> tuple[PackedFedAvg, np.ndarray | None, np.ndarray | None]:
    strategy = PackedFedAvg(LAYOUT, **{"bn_encoding": "floats", **options})
    arrays, _ = strategy.aggregate_train(1, replies)
    if arrays is None:
        return strategy, None, None
    weights, bn = codec.decode(record_to_payload(arrays), LAYOUT)
    return strategy, weights, bn


def assert_honest_majority_kept(fed: Federation, hostile: set[int], weights: np.ndarray) -> None:
    """Where the honest clients outvote the hostile ones by count, the vote is theirs."""
    votes = fed.honest_votes(hostile)
    decided = np.abs(votes) > len(hostile)
    assert decided.mean() > 0.5  # the check covers most weights
    np.testing.assert_array_equal(weights[decided], np.sign(votes[decided]))


def assert_bn_within_honest_range(fed: Federation, hostile: set[int], bn: np.ndarray) -> None:
    honest = np.stack([fed.bns[n] for n in fed.bns if n not in hostile])
    tolerance = 1e-3 * np.maximum(1.0, np.abs(honest).max(axis=0))  # float16 on the wire
    assert np.all(bn >= honest.min(axis=0) - tolerance) and np.all(bn <= honest.max(axis=0) + tolerance)


HOSTILE_SETS = [pytest.param({5}, id="1of5"), pytest.param({4, 5}, id="2of5")]


@pytest.mark.parametrize("hostile", HOSTILE_SETS)
def test_sign_flipping_minority_loses_the_vote(hostile):
    fed = Federation()
    attack = {n: message(n, payload_to_record(codec.encode_signs(-fed.target, fed.bns[n])), honest_metrics(n))
              for n in hostile}
    strategy, weights, bn = run_round(fed.replies(attack))
    assert_honest_majority_kept(fed, hostile, weights)
    assert not strategy.rounds[1].dropped and not strategy.rounds[1].capped


@pytest.mark.parametrize("hostile", HOSTILE_SETS)
def test_random_bits(hostile):
    fed = Federation()
    blob_size = LAYOUT.n_bits_bytes + 2 * LAYOUT.n_bn
    assert LAYOUT.n_binary % 8 == 0  # no padding bits: any bytes of the right length decode
    attack = {n: message(n, ArrayRecord({"bnn": Array(fed.rng.integers(0, 256, blob_size, dtype=np.uint8))}),
                         honest_metrics(n)) for n in hostile}
    strategy, weights, bn = run_round(fed.replies(attack))
    assert weights is not None, "the round must go on"
    assert_honest_majority_kept(fed, hostile, weights)
    assert_bn_within_honest_range(fed, hostile, bn)
    # Random float16 bytes hold NaN, infinity or negative variances: such replies are named as dropped.
    assert {d["node_id"] for d in strategy.rounds[1].dropped} == hostile
    assert all("batch-norm" in d["reason"] for d in strategy.rounds[1].dropped)


@pytest.mark.parametrize("hostile", HOSTILE_SETS)
def test_random_signs_with_plausible_batch_norm(hostile):
    fed = Federation()
    attack = {n: message(n, payload_to_record(codec.encode_signs(
        fed.rng.choice([-1.0, 1.0], LAYOUT.n_binary), fed.bns[n])), honest_metrics(n)) for n in hostile}
    _, weights, _ = run_round(fed.replies(attack))
    assert_honest_majority_kept(fed, hostile, weights)


@pytest.mark.parametrize("hostile", HOSTILE_SETS)
def test_weight_hijack_is_capped_and_named(hostile, caplog):
    fed = Federation()
    attack = {n: message(n, payload_to_record(codec.encode_signs(-fed.target, fed.bns[n])),
                         honest_metrics(n, n=10**18)) for n in hostile}
    # Without a cap, the hijack works: the global model is the attacker's, bit for bit.
    _, uncapped, _ = run_round(fed.replies(attack), max_weight_vs_median=0)
    np.testing.assert_array_equal(uncapped, -fed.target)
    with caplog.at_level(logging.WARNING):
        strategy, weights, _ = run_round(fed.replies(attack))
    assert_honest_majority_kept(fed, hostile, weights)
    capped = strategy.rounds[1].capped
    assert sorted(c["node_id"] for c in capped) == sorted(hostile)
    assert all(c["reported_num_examples"] == 10**18 and c["weight"] == int(1.25 * N_HONEST_EXAMPLES)
               for c in capped)
    assert sum("its weight is capped" in r.getMessage() for r in caplog.records) == len(hostile)
    entries = {c["node_id"]: c for c in strategy.rounds[1].clients}
    assert all(entries[n]["capped"] and entries[n]["reported"]["num_examples"] == 10**18 for n in hostile)
    assert not any(entries[n]["capped"] for n in entries if n not in hostile)


def test_configured_maximum_caps_every_client():
    fed = Federation()
    strategy, weights, _ = run_round(fed.replies({}), max_num_examples=500)
    assert [c["weight"] for c in strategy.rounds[1].clients] == [500] * 5
    assert len(strategy.rounds[1].capped) == 5
    assert weights is not None


@pytest.mark.parametrize("hostile", HOSTILE_SETS)
def test_batch_norm_poisoning_within_float16_is_outvoted(hostile):
    fed = Federation()
    poison = np.full(LAYOUT.n_bn, 60000.0, dtype=np.float32)  # finite, fits float16, absurd
    attack = {n: message(n, payload_to_record(codec.encode_signs(fed.signs[n], poison)), honest_metrics(n))
              for n in hostile}
    _, _, mean_bn = run_round(fed.replies(attack), bn_aggregation="mean")
    assert mean_bn.max() > 10000  # the weighted mean follows the attacker
    strategy, weights, bn = run_round(fed.replies(attack))
    assert_bn_within_honest_range(fed, hostile, bn)
    assert not strategy.rounds[1].dropped


@pytest.mark.parametrize("hostile", HOSTILE_SETS)
@pytest.mark.parametrize("poison, reason", [
    (1e6, "outside what the float16 downlink holds"),
    (-1.0, "running variance is negative"),
    (0.0, "running variance is zero or negative"),
])
def test_batch_norm_out_of_range_is_dropped_not_fatal(hostile, poison, reason):
    fed = Federation()
    attack = {}
    for n in hostile:
        bn = fed.bns[n].copy()
        if poison == 1e6:
            bn[:] = poison
        else:
            bn[-1] = poison  # the last number is a running variance
        attack[n] = message(n, payload_to_record(codec.encode_signs(fed.signs[n], bn, "float32")), honest_metrics(n))
    strategy, weights, bn = run_round(fed.replies(attack))
    assert weights is not None
    assert_bn_within_honest_range(fed, hostile, bn)
    dropped = strategy.rounds[1].dropped
    assert {d["node_id"] for d in dropped} == hostile and all(reason in d["reason"] for d in dropped)


def test_float32_batch_norm_is_accepted_when_the_downlink_is_float32():
    fed = Federation()
    bn = fed.bns[5].copy()
    bn[:] = 1e6
    attack = {5: message(5, payload_to_record(codec.encode_signs(fed.signs[5], bn, "float32")), honest_metrics(5))}
    strategy, weights, _ = run_round(fed.replies(attack), bn_dtype="float32")
    assert weights is not None and not strategy.rounds[1].dropped


@pytest.mark.parametrize("hostile", HOSTILE_SETS)
def test_metric_forgery_cannot_overwrite_the_servers_measurements(hostile, caplog):
    fed = Federation()
    forged = {"node-id": 999, "uplink-bytes": 1, "sign-flips": 0, "reply-bytes": 1, "weight": 10**9,
              "capped": 0, "downlink-bytes": 1}
    attack = {n: fed.honest_reply(n, **forged) for n in hostile}
    with caplog.at_level(logging.INFO):
        strategy, weights, _ = run_round(fed.replies(attack))
    entries = {c["node_id"]: c for c in strategy.rounds[1].clients}
    assert set(entries) == {1, 2, 3, 4, 5}
    for n in hostile:
        entry = entries[n]
        assert entry["uplink_bytes"] == record_nbytes(attack[n].content[RECORD.arrays]) > 1
        assert entry["weight"] == N_HONEST_EXAMPLES and entry["capped"] is False
        assert not {"node_id", "uplink_bytes", "sign_flips", "weight"} & set(entry["reported"])
    assert sum("does not know, ignored" in r.getMessage() for r in caplog.records) == len(hostile)
    assert_honest_majority_kept(fed, set(), weights)


@pytest.mark.parametrize("hostile", HOSTILE_SETS)
@pytest.mark.parametrize("bad", [
    {METRIC.train_acc: 1e308},
    {METRIC.train_acc: -0.1},
    {METRIC.train_loss: [0.1, 0.2]},
    {METRIC.train_loss: -1.0},
    {METRIC.train_loss: float("inf")},
    {METRIC.train_seconds: float("nan")},
    {METRIC.num_examples: 100.0},
    {METRIC.num_examples: [100]},
    {METRIC.num_examples: -5},
    {METRIC.partition_id: 1.5},
    {METRIC.codec_version: [1]},
], ids=lambda bad: "-".join(f"{k}={v}" for k, v in bad.items()))
def test_malformed_metrics_are_dropped_and_the_round_goes_on(hostile, bad):
    fed = Federation()
    attack = {n: fed.honest_reply(n, **bad) for n in hostile}
    strategy, weights, _ = run_round(fed.replies(attack))
    assert weights is not None
    assert {d["node_id"] for d in strategy.rounds[1].dropped} == hostile
    assert {c["node_id"] for c in strategy.rounds[1].clients} == {1, 2, 3, 4, 5} - hostile


def test_missing_num_examples_is_dropped():
    fed = Federation()
    reply = fed.honest_reply(5)
    metrics = {k: v for k, v in honest_metrics(5).items() if k != METRIC.num_examples}
    reply = message(5, reply.content[RECORD.arrays], metrics)
    strategy, _, _ = run_round(fed.replies({5: reply}))
    assert [d["node_id"] for d in strategy.rounds[1].dropped] == [5]
    assert METRIC.num_examples in strategy.rounds[1].dropped[0]["reason"]


@pytest.mark.parametrize("hostile", HOSTILE_SETS)
def test_a_second_reply_from_the_same_node_is_dropped(hostile):
    fed = Federation()
    replies = fed.replies({})
    # Each hostile node answers again with negated signs and a large claim.
    replies += [message(n, payload_to_record(codec.encode_signs(-fed.target, fed.bns[n])), honest_metrics(n))
                for n in hostile]
    strategy, weights, _ = run_round(replies, max_weight_vs_median=0)
    assert sorted(d["node_id"] for d in strategy.rounds[1].dropped) == sorted(hostile)
    assert all("second reply" in d["reason"] for d in strategy.rounds[1].dropped)
    assert [c["node_id"] for c in strategy.rounds[1].clients] == [1, 2, 3, 4, 5]
    honest_only = np.sign(fed.honest_votes(set()))  # five votes: no ties
    np.testing.assert_array_equal(weights, honest_only)


def test_a_failure_while_aggregating_keeps_the_model_and_the_run(monkeypatch):
    from common.federated import robust

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(robust, "aggregate_bn", broken)
    fed = Federation()
    strategy = PackedFedAvg(LAYOUT, bn_encoding="floats")
    assert strategy.aggregate_train(1, fed.replies({})) == (None, None)
    assert len(strategy.rounds[1].dropped) == 5
    assert all("disk on fire" in d["reason"] for d in strategy.rounds[1].dropped)


def test_median_batch_norm_equals_mean_for_identical_clients():
    """Honest clients with the same statistics get the same global batch norm either way."""
    fed = Federation()
    for n in fed.bns:
        fed.bns[n] = fed.bns[1]
    _, _, median_bn = run_round(fed.replies({}))
    _, _, mean_bn = run_round(fed.replies({}), bn_aggregation="mean")
    np.testing.assert_allclose(median_bn, mean_bn, rtol=1e-3)


def test_an_error_reply_cannot_flood_or_escape_the_log_and_results():
    """A SuperNode chooses its error reason: terminal escapes, forged log lines, megabytes of text."""
    from flwr.app import Error

    fed = Federation()
    replies = fed.replies({})
    evil = "\x1b[2J\x1b]0;pwned\x07\nINFO: Round 1: global test accuracy 1.0000\r" + "A" * 1_000_000
    ins = Message(content=RecordDict(), dst_node_id=5, message_type="train")
    replies[4] = Message(Error(code=0, reason=evil), reply_to=ins)
    strategy, _, _ = run_round(replies)
    (dropped,) = strategy.rounds[1].dropped
    reason = dropped["reason"]
    assert dropped["node_id"] == 5 and len(reason) < 1000
    assert not any(ch in reason for ch in "\x1b\x07\n\r")
    assert "\\x1b[2J" in reason and reason.endswith(f"({len('error code 0: ' + evil)} characters)")
    assert [c["node_id"] for c in strategy.rounds[1].clients] == [1, 2, 3, 4]


def test_averaged_metrics_stay_finite_for_the_largest_finite_claims():
    from common.federated import robust

    big = float(np.finfo(np.float64).max)
    averaged = robust.averaged_metrics([{METRIC.train_loss: big}, {METRIC.train_loss: big, METRIC.train_seconds: 1.0}],
                                       [2500, 2000])
    assert np.isfinite(averaged[METRIC.train_loss]) and averaged[METRIC.train_loss] <= big
    assert averaged[METRIC.train_seconds] == 1.0


# ------------------------------------------------------------------ flips outside the round's flip block
FLIP_BLOCKS = 4
BLOCK_ROUND = 2  # block 2 of 4: binary weights [1056, 1584) of 2,112


def flip_round(fed: Federation, server_round: int = BLOCK_ROUND, **options) -> tuple[PackedFedAvg, np.ndarray]:
    """A strategy that sent the target as ``server_round``'s global model, and the signs it sent."""
    strategy = PackedFedAvg(LAYOUT, **{"bn_encoding": "floats", "uplink_codec": "flips",
                                       "flip_blocks": FLIP_BLOCKS, **options})
    sent = strategy.encode_global(fed.target, fed.bns[1])
    strategy.set_reference(server_round, sent)
    reference, _ = codec.decode(record_to_payload(sent), LAYOUT)
    return strategy, reference


def flip_replies(fed: Federation, reference: np.ndarray, outside: dict[int, list[int]],
                 as_signs: set[int] = frozenset()) -> list[Message]:
    """Every client flips a few weights inside the round's block; ``outside[node]``: further
    positions it flips outside the block; ``as_signs``: nodes that send full signs, not flips."""
    from common.federated import flipcodec

    start, stop = flipcodec.flip_block(BLOCK_ROUND, FLIP_BLOCKS, LAYOUT.n_binary)
    replies = []
    for node in fed.signs:
        new = reference.copy()
        inside = fed.rng.choice(np.arange(start, stop), size=20, replace=False)
        new[inside] *= -1
        new[outside.get(node, [])] *= -1
        payload = (codec.encode_signs(new, fed.bns[node]) if node in as_signs
                   else flipcodec.encode_flips(reference, new, fed.bns[node]))
        replies.append(message(node, payload_to_record(payload), honest_metrics(node)))
    return replies


def test_flips_outside_the_round_s_flip_block_are_dropped_and_named(caplog):
    """From round 2 on with flip blocks, a client trains only the round's block: an update that
    flips any weight outside it (as flips, or as full signs) is left out, the round goes on."""
    fed = Federation()
    strategy, reference = flip_round(fed)
    hostile = {5: [0, 1, 2], 4: [2111]}
    replies = flip_replies(fed, reference, hostile, as_signs={4})
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(BLOCK_ROUND, replies)
    log = strategy.rounds[BLOCK_ROUND]
    assert [c["node_id"] for c in log.clients] == [1, 2, 3]
    assert {d["node_id"]: d["reason"] for d in log.dropped} == {
        5: "malformed: 3 of its 23 sign flips lie outside this round's flip block, binary weights [1056, 1584) "
           "(flip-blocks); a client trains only the round's block",
        4: "malformed: 1 of its 21 sign flips lie outside this round's flip block, binary weights [1056, 1584) "
           "(flip-blocks); a client trains only the round's block"}
    assert "Round 2: the reply of node 5 is left out of this round: malformed: 3 of its 23" in caplog.text
    weights, _ = codec.decode(record_to_payload(arrays), LAYOUT)
    outside_block = np.ones(LAYOUT.n_binary, dtype=bool)
    outside_block[1056:1584] = False
    np.testing.assert_array_equal(weights[outside_block], reference[outside_block])


@pytest.mark.parametrize("server_round, options", [
    pytest.param(1, {}, id="round-1-trains-every-weight"),
    pytest.param(BLOCK_ROUND, {"flip_blocks": 1}, id="one-block"),
    pytest.param(BLOCK_ROUND, {"flip_block_rounds": 1}, id="after-flip-block-rounds"),
    pytest.param(BLOCK_ROUND, {"uplink_codec": "signs"}, id="signs-uplink"),
])
def test_flips_anywhere_pass_where_the_clients_train_every_weight(server_round, options):
    fed = Federation()
    strategy, reference = flip_round(fed, server_round, **options)
    replies = flip_replies(fed, reference, {5: [0, 1, 2], 4: [2111]}, as_signs={4})
    strategy.aggregate_train(server_round, replies)
    assert [c["node_id"] for c in strategy.rounds[server_round].clients] == [1, 2, 3, 4, 5]
    assert strategy.rounds[server_round].dropped == []


def test_more_flip_blocks_than_binary_weights_are_refused_when_the_strategy_is_made():
    from common.errors import HyBNNError

    with pytest.raises(HyBNNError, match="flip-blocks 2113 is more than the 2112 binary weights"):
        PackedFedAvg(LAYOUT, uplink_codec="flips", flip_blocks=LAYOUT.n_binary + 1)
    PackedFedAvg(LAYOUT, uplink_codec="signs", flip_blocks=LAYOUT.n_binary + 1)  # blocks only shape the flips uplink


def test_sybil_nodes_claiming_held_or_unplanned_partitions_do_not_vote(caplog):
    """Six extra nodes against five honest ones: three claim partitions the honest nodes hold since
    round 1, three claim partitions the planned federation (5) does not have. One partition, one voter:
    the global model is the honest-only one, bit for bit, and every refusal is named."""
    fed = Federation()
    sybil_claims = {101: 0, 102: 1, 103: 4, 104: 5, 105: 6, 106: 1000}
    sybils = [message(node, payload_to_record(codec.encode_signs(-fed.target, fed.bns[1])),
                      {**honest_metrics(1), METRIC.partition_id: claim}) for node, claim in sybil_claims.items()]

    def two_rounds(extra: list[Message]) -> tuple[PackedFedAvg, ArrayRecord]:
        strategy = PackedFedAvg(LAYOUT, bn_encoding="floats", num_partitions=5)
        strategy.aggregate_train(1, fed.replies({}))  # the honest nodes hold partitions 0..4 from round 1
        arrays, _ = strategy.aggregate_train(2, extra + fed.replies({}))  # the Sybils' replies arrive first
        return strategy, arrays

    # Counted, the six would set the global model: six against five on every weight.
    np.testing.assert_array_equal(np.sign(fed.honest_votes(set()) - 6 * fed.target), -fed.target)
    _, honest_only = two_rounds([])
    with caplog.at_level(logging.WARNING):
        strategy, attacked = two_rounds(sybils)
    assert record_to_payload(attacked)["bnn"].tobytes() == record_to_payload(honest_only)["bnn"].tobytes()
    assert [c["node_id"] for c in strategy.rounds[2].clients] == [1, 2, 3, 4, 5]
    dropped = {d["node_id"]: d["reason"] for d in strategy.rounds[2].dropped}
    assert sorted(dropped) == sorted(sybil_claims)
    for node, claim in sybil_claims.items():
        assert f"claims partition {claim}" in dropped[node]
        assert ("which node" in dropped[node]) == (claim < 5)
        assert any(f"node {node} is left out" in r.getMessage() and f"partition {claim}" in r.getMessage()
                   for r in caplog.records)
    assert strategy.voters.holders == {p: p + 1 for p in range(5)}


def test_a_metric_key_with_terminal_escapes_and_a_newline_is_escaped_in_the_log(caplog):
    fed = Federation()
    evil = "\x1b[31mred\nINFO: Round 1: global test accuracy 1.0000"
    replies = fed.replies({5: fed.honest_reply(5, **{evil: 1.0, "x" * 10_000: 2.0})})
    with caplog.at_level(logging.INFO):
        strategy, _, _ = run_round(replies)
    (line,) = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert "node 5" in line and "\\x1b[31mred\\nINFO: Round 1" in line
    assert not any(ch in line for ch in "\x1b\n\r") and len(line) < 1000
    assert [c["node_id"] for c in strategy.rounds[1].clients] == [1, 2, 3, 4, 5]  # counted, the key ignored
    assert all(evil not in c["reported"] for c in strategy.rounds[1].clients)
