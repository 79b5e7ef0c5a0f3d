"""Secure aggregation through the real ServerApp and ClientApp code, in one process.

``run_server`` drives the rounds; a grid that hands each message to the project's ClientApp
(its real handlers, each node with its own Context, real MNIST codes of a fixed encoder)
stands in for the SuperLink, so that a test can drop a client at a given stage or tamper
with a reply. The Ray simulation and the SuperLink paths are tested in test_simulation.py and
test_deploy_local.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from common.federated.wire import RECORD, SECAGG
from tests.conftest import fixed_encoder

pytestmark = pytest.mark.usefixtures("flower_task_identity")

Tamper = Callable[[int, Message, Message], Message | None]
"""(node index 0.., the message, the node's reply) -> the reply the server gets, or None (no reply)."""


class ClientAppGrid:
    """A grid whose nodes are the project's ClientApp, called in this process."""

    def __init__(self, n: int, run_config: dict, tamper: Tamper | None = None) -> None:
        from client.client_app import app

        self.app = app
        self.node_ids = [1000 + 17 * i for i in range(n)]
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=dict(run_config),
                                       node_config={"partition-id": i, "num-partitions": n})
                         for i, node in enumerate(self.node_ids)}
        self.tamper = tamper
        self.sent: list[Message] = []
        self.replies: list[tuple[Message, Message]] = []
        """Each message and the node's own reply to it, before any tampering."""

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            reply = self.app(msg, self.contexts[node])
            self.replies.append((msg, reply))
            if self.tamper is not None:
                reply = self.tamper(self.node_ids.index(node), msg, reply)
            if reply is not None:
                replies.append(reply)
        return replies


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return fixed_encoder(tmp_path_factory.mktemp("secure") / "encoder")


def run(tmp_path: Path, encoder: Path, data_root: Path, mode: str, n: int = 3, rounds: int = 2,
        tamper: Tamper | None = None, **extra) -> tuple[dict, ClientAppGrid]:
    from common.encoder.artifact import load_encoder_artifact
    from server.server_app import ServerSettings, run_server

    sha = load_encoder_artifact(encoder).sha256
    run_config = {"task": "0v1", "num-server-rounds": rounds, "local-epochs": 1, "encoder-path": str(encoder),
                  "encoder-sha256": sha, "data-root": str(data_root), "out-dir": str(tmp_path / mode),
                  "min-available-nodes": n, "secure-aggregation": mode, "seed": 3, **extra}
    grid = ClientAppGrid(n, run_config, tamper)
    settings = ServerSettings.from_run_config(run_config)
    partitions = {node: i for i, node in enumerate(grid.node_ids)}
    results = run_server(grid, settings, node_partitions=lambda _: partitions)
    return results, grid


def global_bytes(tmp_path: Path, mode: str) -> bytes:
    return (tmp_path / mode / "global" / "model.safetensors").read_bytes()


def test_a_secure_run_ends_bit_for_bit_where_the_same_aggregation_in_the_clear_does(tmp_path, encoder, mnist_root):
    secure, grid = run(tmp_path, encoder, mnist_root, "on")
    clear, _ = run(tmp_path, encoder, mnist_root, "clear")
    assert [r["test_acc"] for r in secure["rounds"]] == [r["test_acc"] for r in clear["rounds"]]
    assert global_bytes(tmp_path, "on") == global_bytes(tmp_path, "clear")
    for r in secure["rounds"]:
        assert r["secure"]["summed"] == 3 and r["secure"]["skipped"] is None
        assert len(r["clients"]) == 3 and not r["dropped"]
    assert secure["secure_aggregation"]["enabled"] is True
    assert secure["secure_aggregation"]["threshold"] == 2 and secure["secure_aggregation"]["neighbours"] == 2
    # every stage of a round was a message of its own type, and the train messages carried the shares
    types = [m.metadata.message_type for m in grid.sent]
    for action in (SECAGG.keys_action, SECAGG.shares_action, SECAGG.unmask_action):
        assert types.count(SECAGG.message_type(action)) == 3 * 2
    assert sum(t == "train" and SECAGG.record in m.content.config_records for t, m in zip(types, grid.sent)) == 6


def longest_list(value) -> int:
    if isinstance(value, dict):
        return max((longest_list(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return max([len(value), *(longest_list(v) for v in value)])
    return 0


def test_the_servers_record_of_a_secure_round_holds_no_client_update(tmp_path, encoder, mnist_root):
    results, grid = run(tmp_path, encoder, mnist_root, "on", rounds=1)
    server_json = json.loads((tmp_path / "on" / "server.json").read_text())
    for record in (results, server_json):
        # an update is 25,856 votes and 520 batch-norm numbers: no list of the record comes near
        assert longest_list(record) <= 4
        text = json.dumps(record)
        for forbidden in ("ciphertexts", "pk_enc", "train_loss", "train_acc", "seed_shares"):
            assert forbidden not in text, forbidden
    client = results["rounds"][0]["clients"][0]
    assert set(client["reported"]) == {"num_examples", "partition_id"}
    # what each client sent in stage 3 is its masked vector, 4 packed segments, and nothing else
    replies = [reply for msg, reply in grid.replies if msg.metadata.message_type == "train"]
    assert len(replies) == 3
    for reply in replies:
        assert set(reply.content) == {SECAGG.record}
        values = reply.content.config_records[SECAGG.record]
        assert set(values) == {"round", "stage", "masked", "refused"} and len(values["masked"]) == 4


def drop_at(stage: str, indices: set[int]) -> Tamper:
    message_type = "train" if stage == "masked" else SECAGG.message_type(
        {"keys": SECAGG.keys_action, "shares": SECAGG.shares_action, "unmask": SECAGG.unmask_action}[stage])

    def tamper(index: int, msg: Message, reply: Message) -> Message | None:
        return None if index in indices and msg.metadata.message_type == message_type else reply
    return tamper


def test_three_of_ten_dropping_at_the_masked_input_leave_the_sum_of_the_seven(tmp_path, encoder, mnist_root):
    results, _ = run(tmp_path, encoder, mnist_root, "on", n=10, rounds=1, tamper=drop_at("masked", {1, 4, 8}),
                     **{"secure-threshold": 7})
    r = results["rounds"][0]
    assert r["secure"]["summed"] == 7 and r["secure"]["skipped"] is None
    assert len(r["clients"]) == 7
    assert {c["reported"]["partition_id"] for c in r["clients"]} == set(range(10)) - {1, 4, 8}
    assert sorted(d["stage"] for d in r["dropped"]) == ["masked"] * 3
    assert results["status"] == "finished"


def test_four_of_ten_dropping_skip_the_round_and_the_next_one_runs(tmp_path, encoder, mnist_root):
    dropped_once = drop_at("masked", {0, 2, 5, 9})

    def first_round_only(index: int, msg: Message, reply: Message) -> Message | None:
        config = msg.content.config_records.get(RECORD.config)
        server_round = int(config["server-round"]) if config is not None else 0
        return dropped_once(index, msg, reply) if server_round == 1 else reply

    results, _ = run(tmp_path, encoder, mnist_root, "on", n=10, rounds=2, tamper=first_round_only,
                     **{"secure-threshold": 7})
    first, second = results["rounds"]
    assert first["clients"] == [] and "threshold" in first["secure"]["skipped"]
    assert second["secure"]["summed"] == 10 and second["secure"]["skipped"] is None
    assert first["test_acc"] == results["initial"]["test_acc"]  # the skipped round kept the model
    assert second["test_acc"] != first["test_acc"]  # round 2 moved it on
    assert results["status"] == "finished"


def test_a_client_that_drops_after_the_key_exchange_is_recovered(tmp_path, encoder, mnist_root):
    results, _ = run(tmp_path, encoder, mnist_root, "on", n=5, rounds=1, tamper=drop_at("shares", {3}))
    r = results["rounds"][0]
    assert r["secure"]["summed"] == 4 and [d["stage"] for d in r["dropped"]] == ["shares"]


def test_a_client_that_does_not_answer_the_unmask_still_counts(tmp_path, encoder, mnist_root):
    results, _ = run(tmp_path, encoder, mnist_root, "on", n=5, rounds=1, tamper=drop_at("unmask", {0}))
    r = results["rounds"][0]
    assert r["secure"]["summed"] == 5 and len(r["clients"]) == 5


def replace_values(stage_type: str, index: int, change: Callable[[dict], dict]) -> Tamper:
    def tamper(i: int, msg: Message, reply: Message) -> Message | None:
        if i != index or msg.metadata.message_type != stage_type or reply.has_error():
            return reply
        values = change(dict(reply.content.config_records[SECAGG.record]))
        content = RecordDict({**{k: v for k, v in reply.content.items() if k != SECAGG.record},
                              SECAGG.record: ConfigRecord(values)})
        return Message(content=content, reply_to=msg)
    return tamper


@pytest.mark.parametrize("what, change", [
    ("a masked vector of the wrong length", lambda v: {**v, "masked": [b[:-1] for b in v["masked"]]}),
    ("a replay of another round", lambda v: {**v, "round": v["round"] - 1}),
    ("a share that is garbage", None),
])
def test_a_hostile_reply_is_dropped_with_a_reason_and_the_round_goes_on(tmp_path, encoder, mnist_root, what, change):
    if change is None:
        tamper = replace_values(SECAGG.message_type(SECAGG.unmask_action), 2,
                                lambda v: {**v, "seed_shares": [b"\x00" * len(s) for s in v["seed_shares"]]})
        n, summed = 5, 5  # a bad share is one of several: the others still reconstruct
    else:
        tamper = replace_values("train", 2, change)
        n, summed = 5, 4
    results, _ = run(tmp_path, encoder, mnist_root, "on", n=n, rounds=1, tamper=tamper)
    r = results["rounds"][0]
    assert r["secure"]["summed"] == summed, (what, r["secure"])
    assert results["status"] == "finished"
    if change is not None:
        assert len(r["dropped"]) == 1 and r["dropped"][0]["stage"] == "masked" and r["dropped"][0]["reason"]


def test_settings_that_cannot_work_with_secure_aggregation_are_refused_before_the_run(tmp_path, encoder, mnist_root):
    from common.errors import HyBNNError

    for extra, words in [({"uplink-codec": "flips"}, "uplink-codec flips"),
                         ({"bn-encoding": "floats"}, "bn-encoding floats"),
                         ({"secure-threshold": 4}, "more than the 3 clients"),
                         ({"min-available-nodes": 2}, "cannot hide one client"),
                         ({"secure-group-size": 2}, "secure-group-size 2 cannot hide"),
                         ({"secure-threshold": 1}, "secure-threshold 1 would let")]:
        with pytest.raises(HyBNNError, match=words):
            run(tmp_path, encoder, mnist_root, "on", rounds=1, **extra)


def test_a_clients_masked_votes_are_uniform_modulo_their_width(tmp_path, encoder, mnist_root):
    """Chi-square over the 25,856 masked votes of each client: the unmasked votes take two values
    (0 and the weight), the masked ones must fill all 2**b residues evenly."""
    from common.packing import unpack_uint

    results, grid = run(tmp_path, encoder, mnist_root, "on", rounds=1)
    width = results["secure_aggregation"]["bits"][0]
    bins = 2**width
    # the 0.999 quantile of chi-square with bins - 1 degrees of freedom (Wilson-Hilferty)
    dof = bins - 1
    quantile = dof * (1 - 2 / (9 * dof) + 3.090 * (2 / (9 * dof)) ** 0.5) ** 3
    for msg, reply in grid.replies:
        if msg.metadata.message_type != "train":
            continue
        packed = np.frombuffer(reply.content.config_records[SECAGG.record]["masked"][0], dtype=np.uint8)
        votes = unpack_uint(packed, width, 25856)
        counts = np.bincount(votes.astype(np.int64), minlength=bins)
        expected = votes.size / bins
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < quantile, (chi2, quantile)


def test_secure_groups_end_bit_for_bit_where_their_clear_twin_does(tmp_path, encoder, mnist_root):
    secure, grid = run(tmp_path, encoder, mnist_root, "on", n=7, rounds=2, **{"secure-group-size": 3})
    clear, _ = run(tmp_path, encoder, mnist_root, "clear", n=7, rounds=2, **{"secure-group-size": 3})
    assert global_bytes(tmp_path, "on") == global_bytes(tmp_path, "clear")
    assert [r["test_acc"] for r in secure["rounds"]] == [r["test_acc"] for r in clear["rounds"]]
    for r in secure["rounds"]:
        sizes = sorted(g["clients"] for g in r["secure"]["groups"])
        assert sizes == [3, 4] and r["secure"]["summed"] == 7  # 7 // 3 groups, of 3 and 4
    # each group is a protocol of its own: a client's stage-1 message names its group's 3 or 4 clients
    keys = [m for m in grid.sent if m.metadata.message_type == SECAGG.message_type(SECAGG.keys_action)]
    assert sorted({len(m.content.config_records[SECAGG.record]["spec.clients"]) for m in keys}) == [3, 4]


def test_a_secure_group_that_loses_too_many_clients_is_left_out_and_the_others_make_the_round(
        tmp_path, encoder, mnist_root):
    from common.federated import sums

    groups = sums.groups(6, 3, 3, 1)  # the groups of round 1 for seed 3, as the server draws them
    doomed = set(groups[0][:2])  # two of one group's three: below its threshold of 2 + 1
    results, _ = run(tmp_path, encoder, mnist_root, "on", n=6, rounds=1, tamper=drop_at("masked", doomed),
                     **{"secure-group-size": 3})
    r = results["rounds"][0]
    assert r["secure"]["skipped"] is None and r["secure"]["summed"] == 3
    skipped = [g for g in r["secure"]["groups"] if g["skipped"]]
    assert len(skipped) == 1 and "threshold" in skipped[0]["skipped"]
    assert {c["reported"]["partition_id"] for c in r["clients"]} == set(groups[1])


def garbage_masked_input(index: int) -> Tamper:
    """A client that sends random bytes of the right length as its masked vector: nothing in a
    masked vector can be checked, but the sum it spoils can."""
    rng = np.random.default_rng(5)
    return replace_values("train", index, lambda v: {
        **v, "masked": [rng.integers(0, 256, len(b), dtype=np.uint8).tobytes() for b in v["masked"]]})


def test_a_garbage_masked_vector_spoils_only_its_secure_group(tmp_path, encoder, mnist_root):
    from common.federated import sums

    groups = sums.groups(6, 3, 3, 1)
    results, _ = run(tmp_path, encoder, mnist_root, "on", n=6, rounds=1, tamper=garbage_masked_input(groups[1][0]),
                     **{"secure-group-size": 3})
    r = results["rounds"][0]
    assert r["secure"]["skipped"] is None and r["secure"]["summed"] == 6 and len(r["clients"]) == 3
    spoiled = [g for g in r["secure"]["groups"] if g["skipped"]]
    assert len(spoiled) == 1 and "not one that honest clients give" in spoiled[0]["skipped"]
    assert {c["reported"]["partition_id"] for c in r["clients"]} == set(groups[0])


def test_without_groups_a_garbage_masked_vector_skips_the_round_and_the_next_one_runs(tmp_path, encoder, mnist_root):
    spoil = garbage_masked_input(1)

    def first_round_only(index: int, msg: Message, reply: Message) -> Message | None:
        config = msg.content.config_records.get(RECORD.config)
        return spoil(index, msg, reply) if config is not None and int(config["server-round"]) == 1 else reply

    results, _ = run(tmp_path, encoder, mnist_root, "on", n=3, rounds=2, tamper=first_round_only)
    first, second = results["rounds"]
    assert first["clients"] == [] and "not one that honest clients give" in first["secure"]["skipped"]
    assert second["secure"]["summed"] == 3 and len(second["clients"]) == 3


def test_clients_absent_at_the_key_exchange_do_not_thin_a_ring_the_others_exchange_keys_again(
        tmp_path, encoder, mnist_root):
    # 30 clients: a ring of 10 neighbours, 7 needed. Six absent from the start, all in a row of
    # partitions, would leave some neighbourhoods short; exchanged again among the 24 present,
    # the graph has no hole.
    absent = set(range(6))
    results, grid = run(tmp_path, encoder, mnist_root, "on", n=30, rounds=1, tamper=drop_at("keys", absent))
    r = results["rounds"][0]
    assert r["secure"]["skipped"] is None and r["secure"]["summed"] == 24
    assert sorted(d["stage"] for d in r["dropped"]) == ["keys"] * 6
    keys_sent = [m for m in grid.sent if m.metadata.message_type == SECAGG.message_type(SECAGG.keys_action)]
    assert len(keys_sent) == 30 + 24
    assert {len(m.content.config_records[SECAGG.record]["spec.clients"]) for m in keys_sent[30:]} == {24}


def error_at(stage_type: str, indices: set[int]) -> Tamper:
    """The reply Flower delivers when the ClientApp raises: an error message, without content."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    def tamper(index: int, msg: Message, reply: Message) -> Message | None:
        if index in indices and msg.metadata.message_type == stage_type:
            return Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="it raised"), reply_to=msg)
        return reply
    return tamper


@pytest.mark.parametrize("stage_type", ["train", SECAGG.message_type(SECAGG.keys_action),
                                        SECAGG.message_type(SECAGG.shares_action),
                                        SECAGG.message_type(SECAGG.unmask_action)])
def test_an_error_reply_drops_its_client_and_the_round_goes_on(tmp_path, encoder, mnist_root, stage_type):
    """An error reply has no content: the server drops its client with the error's reason (it read
    the content to count its bytes, and the ServerApp died)."""
    results, _ = run(tmp_path, encoder, mnist_root, "on", n=5, rounds=1, tamper=error_at(stage_type, {1}))
    r = results["rounds"][0]
    assert results["status"] == "finished"
    if stage_type == SECAGG.message_type(SECAGG.unmask_action):
        assert r["secure"]["summed"] == 5  # its vector was in; the others' shares unmask it
    else:
        assert r["secure"]["summed"] == 4 and len(r["dropped"]) == 1
        assert "it raised" in r["dropped"][0]["reason"] and "error code" in r["dropped"][0]["reason"]


def test_an_injected_failure_at_the_masked_input_leaves_the_sum_of_the_others(tmp_path, encoder, mnist_root):
    """client-failure-rate in a secure round: the client fails its train message (stage 3) with an
    error reply, after a key exchange it completed."""
    from client.client_app import injected_failure

    rate = 0.3
    seed = next(s for s in range(1000) if sum(injected_failure(rate, s, 1, p) for p in range(5)) == 1)
    failed = next(p for p in range(5) if injected_failure(rate, seed, 1, p))
    results, _ = run(tmp_path, encoder, mnist_root, "on", n=5, rounds=1, seed=seed,
                     **{"client-failure-rate": rate, "secure-threshold": 4})
    r = results["rounds"][0]
    assert r["secure"]["summed"] == 4 and r["secure"]["skipped"] is None
    assert {c["reported"]["partition_id"] for c in r["clients"]} == set(range(5)) - {failed}
    assert [d["stage"] for d in r["dropped"]] == ["masked"]
    assert "injected failure" in r["dropped"][0]["reason"]
