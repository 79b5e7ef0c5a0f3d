"""Secure aggregation on the Message API: the strategy's side of a secure round's messages.

A secure round (``secure-aggregation = "on"``, docs/security.md) runs the four stages of
:mod:`common.secagg.protocol` as rounds of messages of the strategy:

1. ``train.secagg_keys`` (in ``configure_train``): the round's spec; each client answers with its
   public keys and, in clear, its ``num-examples`` and ``partition-id``, from which the server
   caps and scales the weights (:func:`common.federated.sums.quantized_weights`);
2. ``train.secagg_shares`` (in ``configure_train``): the neighbours' public keys and the client's
   weight; each client answers with its shares, encrypted to each neighbour;
3. ``train`` (Flower's own round): the global model and the shares addressed to the client; each
   client trains and answers with its summable vector (:func:`common.federated.sums.client_vector`),
   masked;
4. ``train.secagg_unmask`` (in ``aggregate_train``): who sent a masked vector and who did not; each
   client answers with the shares that remove the masks, and the server has the sum.

With secure groups (``secure-group-size``) the sampled clients are drawn into groups
(:func:`common.federated.sums.groups`), each group runs the protocol on its own, and the stages
of all groups go out together; a group that cannot end with a checked sum is left out of the
round, the others make it.

A client's stage is addressed by its index in its group (1 .. N, the sampled nodes in order): a
Flower node id is an unsigned 64-bit number, which a ConfigRecord's signed integers do not hold.
This module only turns Messages into the protocol's dicts and back, and measures bytes; every
check of what a client sends is the protocol's, and a client it drops is logged with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common.federated import robust, sums
from common.federated.wire import METRIC, RECORD, SECAGG, record_nbytes
from common.secagg import protocol

STAGES = ("keys", "shares", "masked", "unmask")
"""The protocol's stages, as the round's record names them."""


class RoundSkipped(Exception):
    """A secure round that cannot end with a sum; the message says why."""


@dataclass
class SecureRoundState:
    """What the server holds of one secure round between ``configure_train`` and ``aggregate_train``."""

    spec: protocol.RoundSpec
    server: protocol.ServerRound
    nodes: dict[int, int]
    """Index in the round (1 .. N) -> node id."""
    weights: dict[int, int] = field(default_factory=dict)
    """Index -> the client's weight in the sums (capped, scaled)."""
    uplink: dict[int, int] = field(default_factory=dict)
    """Index -> serialized bytes of all the client's replies so far."""
    dropped: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in STAGES})
    """Per stage, the clients that left the round then: node id and why."""
    stage3: dict[int, dict] = field(default_factory=dict)
    """Index -> the protocol values of the client's ``train`` message (the shares addressed to it)."""
    reported: dict[int, dict] = field(default_factory=dict)
    """Index -> the plaintext metadata the client sent in stage 1 (num-examples, partition-id)."""
    skipped: str | None = None
    """Why the round ended without a sum, if it did."""
    reasons: dict[int, str] = field(default_factory=dict)
    """Index -> why the stage being collected left the client out before the protocol saw its reply."""

    def index_of(self) -> dict[int, int]:
        return {node: i for i, node in self.nodes.items()}

    def drop(self, stage: str, index: int, reason: str) -> None:
        node = self.nodes.get(index)
        reason = robust.printable(reason)
        self.dropped[stage].append({"node_id": node, "reason": reason})
        log(WARNING, "Round %d, secure aggregation, stage %s: node %s leaves the round: %s",
            self.spec.round_id, stage, node, reason)

    def record(self) -> dict:
        """The round's secure-aggregation entry for results.json: counts, ids, reasons, bytes; no update."""
        return {"clients": len(self.nodes), "threshold": self.spec.threshold,
                "neighbours": protocol.neighbourhood_degree(self.spec),
                "local_threshold": protocol.local_threshold(self.spec), "bits": list(self.spec.widths),
                "summed": len(self.server.summed_clients),
                "uplink_bytes": max(self.uplink.values(), default=0), "dropped": self.dropped,
                "skipped": self.skipped}


def round_spec(server_round: int, n_clients: int, layout: sums.SumLayout, weight_bits: int,
               threshold: int) -> protocol.RoundSpec:
    """The spec of a round of ``n_clients``: widths that hold the sums of any weights it may give
    (each at most ``2**weight_bits - 1``), ``threshold`` (0: the protocol's default)."""
    bound = n_clients * (2**weight_bits - 1)
    return protocol.new_round_spec(server_round, range(1, n_clients + 1), layout.lengths,
                                   sums.widths(layout, bound), threshold or None)


def stage_message(content: Mapping, config: ConfigRecord | None = None,
                  arrays: ArrayRecord | None = None) -> RecordDict:
    """A stage message's content: its protocol values, with the round's train config and model where sent."""
    records: dict = {SECAGG.record: ConfigRecord(dict(content))}
    if config is not None:
        records[RECORD.config] = config
    if arrays is not None:
        records[RECORD.arrays] = arrays
    return RecordDict(records)


def read_reply(msg: Message, with_metrics: bool = False) -> tuple[dict, dict]:
    """A stage reply's protocol values and (stage 1) its checked metrics; :class:`protocol.SecAggError`
    unless it holds exactly the records the stage asks for."""
    content = msg.content
    metrics = {RECORD.metrics} if with_metrics else set()
    if set(content.config_records) != {SECAGG.record} or content.array_records \
            or set(content.metric_records) != metrics:
        raise protocol.SecAggError(
            f"the reply must hold the ConfigRecord {SECAGG.record!r}" + (f" and the MetricRecord {RECORD.metrics!r}"
                                                                         if with_metrics else "")
            + f" alone; it holds {sorted(content.config_records)}, {sorted(content.array_records)} and "
              f"{sorted(content.metric_records)}")
    checked = robust.check_client_metrics(content.metric_records[RECORD.metrics])[0] if with_metrics else {}
    return dict(content.config_records[SECAGG.record]), checked


class SecureRounds:
    """The protocol's messages for :class:`server.strategy.PackedFedAvg`, one round at a time; with
    secure groups (``secure-group-size``) one protocol instance per group, their stages sent together."""

    def __init__(self, layout: sums.SumLayout, weight_bits: int, threshold: int,
                 weigh: Callable[[list[int]], list[int]],
                 refuse_voter: Callable[[int, int | None], str | None], group_size: int = 0,
                 seed: int = 0) -> None:
        self.layout = layout
        self.weight_bits = weight_bits
        self.threshold = threshold
        self.weigh = weigh
        """Reported num-examples -> capped weights (the strategy's caps)."""
        self.refuse_voter = refuse_voter
        """(node id, reported partition) -> why it may not vote, or None."""
        self.group_size = group_size
        self.seed = seed
        self.rounds: dict[int, list[SecureRoundState]] = {}

    def record(self, server_round: int, skipped: str | None = None) -> dict:
        """The round's entry for results.json: its groups' records, and their counts together."""
        states = self.rounds.get(server_round, [])
        if not states:
            return {"skipped": skipped, "groups": []}
        first = states[0]
        groups = [s.record() for s in states]
        return {**{k: first.record()[k] for k in ("threshold", "neighbours", "local_threshold", "bits")},
                "clients": sum(g["clients"] for g in groups), "summed": sum(g["summed"] for g in groups),
                "uplink_bytes": max(g["uplink_bytes"] for g in groups),
                "dropped": {stage: [d for s in states for d in s.dropped[stage]] for stage in STAGES},
                "skipped": skipped, "groups": groups}

    # ---------------------------------------------------------------- stages 1 and 2
    def open(self, grid: Grid, server_round: int, node_ids: list[int], config: ConfigRecord,
             timeout: float) -> list[SecureRoundState]:
        """Stages 1 and 2 for the sampled ``node_ids``; the groups still in the round.
        :class:`RoundSkipped` when no group has enough clients left.

        A group that some clients left in stage 1 (no reply, a refusal, not a voter) exchanges keys
        once more among those that answered, under a spec of its own: its neighbour graph and
        threshold are then drawn over clients that are there. Otherwise each absent client would
        thin its neighbours' neighbourhoods, and at a few percent absent (partitions too small to
        train, a common case with many small clients) a ring's dropouts cascade through the round."""
        self.rounds = {r: s for r, s in self.rounds.items() if r >= server_round - 1}
        states = []
        for members in sums.groups(len(node_ids), self.group_size, self.seed, server_round):
            state = self._new_state(server_round, [node_ids[i] for i in members])
            if state is None:
                raise RoundSkipped(f"{len(members)} clients sampled: secure aggregation needs at least 3")
            states.append(state)
        self.rounds[server_round] = states
        keys, reported = self._exchange_keys(grid, states, config, timeout)
        again = [g for g, st in enumerate(states) if 3 <= len(keys[g]) < len(st.nodes)]
        if again:
            for g in again:
                old = states[g]
                states[g] = self._new_state(server_round, [old.nodes[i] for i in sorted(keys[g])])
                states[g].dropped["keys"] = old.dropped["keys"]
                states[g].uplink = {i: old.uplink.get(old.index_of()[node], 0) for i, node in states[g].nodes.items()}
                log(INFO, "Round %d, secure aggregation: %d of a group's %d clients left at the key exchange; "
                    "the %d others exchange keys again among themselves.", server_round,
                    len(old.nodes) - len(keys[g]), len(old.nodes), len(keys[g]))
            again_keys, again_reported = self._exchange_keys(grid, [states[g] for g in again], config, timeout)
            for k, g in enumerate(again):
                keys[g] = again_keys[k]
                reported = {**{gi: n for gi, n in reported.items() if gi[0] != g},
                            **{(g, i): n for (kk, i), n in again_reported.items() if kk == k}}
        stage2 = {g: self._collect(st, "keys", lambda st=st, g=g: st.server.collect_keys(keys[g]))
                  for g, st in enumerate(states)}
        # the weights: capped and scaled over the whole round, as in a plaintext round
        order = [(g, i) for g in sorted(stage2) if stage2[g] is not None for i in sorted(stage2[g])]
        weights = sums.quantized_weights(self.weigh([reported[gi] for gi in order]), self.weight_bits)
        for (g, i), w in zip(order, weights):
            states[g].weights[i] = w
        live = [g for g in stage2 if stage2[g] is not None]
        replies = self._send(grid, SECAGG.shares_action, timeout, [
            (states[g], {i: stage_message({**values, "weight": states[g].weights[i]}) for i, values in stage2[g].items()})
            for g in live])
        for g, st in zip(live, [states[g] for g in live]):
            shares = {i: values for i, (values, _) in replies[live.index(g)].items()}
            st.stage3 = self._collect(st, "shares", lambda st=st, shares=shares: st.server.collect_shares(shares)) or {}
        self._require_a_group(server_round)
        return states

    def _new_state(self, server_round: int, nodes: list[int]) -> SecureRoundState | None:
        """A group's protocol instance over ``nodes``; None when they are too few for one."""
        try:
            spec = round_spec(server_round, len(nodes), self.layout, self.weight_bits, self.threshold)
        except protocol.SecAggError:
            return None
        return SecureRoundState(spec, protocol.ServerRound(spec), dict(enumerate(nodes, start=1)))

    def _exchange_keys(self, grid: Grid, states: list[SecureRoundState], config: ConfigRecord, timeout: float
                       ) -> tuple[dict[int, dict], dict[tuple[int, int], int]]:
        """Stage 1's messages and replies: per group (by position), index -> its public keys, and
        (group, index) -> its reported num-examples; a node that may not vote is set aside."""
        replies = self._send(grid, SECAGG.keys_action, timeout, [
            (st, {i: stage_message({**st.server.request_keys(), "index": i}, config) for i in st.nodes})
            for st in states], with_metrics=True)
        keys: dict[int, dict] = {}
        reported: dict[tuple[int, int], int] = {}
        for g, state in enumerate(states):
            keys[g] = {}
            for i, (values, metrics) in replies[g].items():
                refused = self.refuse_voter(state.nodes[i], metrics.get(METRIC.partition_id))
                if refused:
                    state.reasons[i] = f"not a voter: it {refused}"
                    continue
                keys[g][i], reported[g, i] = values, int(metrics[METRIC.num_examples])
                state.reported[i] = {"num_examples": reported[g, i], "partition_id": metrics.get(METRIC.partition_id)}
            for i in sorted(set(state.nodes) - set(keys[g])):  # why each absent one left, before a new exchange
                state.drop("keys", i, state.reasons.get(i, "no reply before the round's timeout (round-timeout-s)"))
        return keys, reported

    def train_messages(self, states: list[SecureRoundState], arrays: ArrayRecord, config: ConfigRecord
                       ) -> list[Message]:
        """Stage 3: the round's ``train`` messages, with each client's shares."""
        return [Message(content=stage_message(values, config, arrays), dst_node_id=state.nodes[i],
                        message_type="train") for state in states for i, values in sorted(state.stage3.items())]

    # ---------------------------------------------------------------- stages 3 and 4
    def close(self, grid: Grid, server_round: int, replies: Iterable[Message], timeout: float
              ) -> list[tuple[list[np.ndarray], int]]:
        """Each group's sums and total weight from the masked vectors (stage 3's replies) and
        stage 4, for the groups that recover them; :class:`RoundSkipped` when none does."""
        states = [s for s in self.rounds.get(server_round, []) if s.stage3 and s.skipped is None]
        if not states:
            raise RoundSkipped("its key exchange did not complete")
        by_group = self._route(states, replies)
        stage4 = []
        for state, got in zip(states, by_group):
            masked = {i: values for i, (values, _) in self._read(state, got, set(state.stage3)).items()}
            stage4.append(self._collect(state, "masked", lambda state=state, masked=masked:
                                        state.server.collect_masked(masked)))
        live = [(st, msgs) for st, msgs in zip(states, stage4) if msgs is not None]
        unmask = self._send(grid, SECAGG.unmask_action, timeout,
                            [(st, {i: stage_message(v) for i, v in msgs.items()}) for st, msgs in live])
        results = []
        for (state, _), got in zip(live, unmask):
            shares = {i: values for i, (values, _) in got.items()}
            total = self._collect(state, "unmask", lambda state=state, shares=shares: state.server.aggregate(shares))
            if total is None:
                continue
            weight = sum(state.weights[i] for i in state.server.summed_clients)
            try:
                sums.check_sums(total, weight, self.layout)
            except sums.SumError as exc:
                # A vector out of range (one client can send any bytes as its masked input) spoils
                # its group's sum, and only that: the group is left out.
                state.skipped = robust.printable(f"its sum is not one that honest clients give: {exc}")
                log(WARNING, "Round %d, secure aggregation: a group of %d clients leaves the round: %s",
                    server_round, len(state.nodes), state.skipped)
                continue
            results.append((total, weight))
            log(INFO, "Round %d, secure aggregation: the sum of %d clients (total weight %d) recovered.",
                server_round, len(state.server.summed_clients), weight)
        if not results:
            self._require_a_group(server_round)
        return results

    def _require_a_group(self, server_round: int) -> None:
        states = self.rounds.get(server_round, [])
        if all(s.skipped is not None for s in states):
            reasons = "; ".join(dict.fromkeys(s.skipped for s in states))
            raise RoundSkipped(reasons if len(states) == 1 else f"every secure group was skipped: {reasons}")

    # ---------------------------------------------------------------- messages
    def _send(self, grid: Grid, action: str, timeout: float,
              contents: list[tuple[SecureRoundState, Mapping[int, RecordDict]]], with_metrics: bool = False
              ) -> list[dict[int, tuple[dict, dict]]]:
        """One stage's messages to every group at once (``(group, index -> content)`` pairs); per
        group, its good replies."""
        states = [state for state, _ in contents]
        asked = [per_client for _, per_client in contents]
        messages = [Message(content=content, dst_node_id=state.nodes[i], message_type=SECAGG.message_type(action))
                    for state, per_client in zip(states, asked) for i, content in per_client.items()]
        replies = self._route(states, grid.send_and_receive(messages, timeout=timeout)) if messages else [
            [] for _ in states]
        return [self._read(state, got, set(per_client), with_metrics)
                for state, got, per_client in zip(states, replies, asked)]

    @staticmethod
    def _route(states: list[SecureRoundState], replies: Iterable[Message]) -> list[list[Message]]:
        """The replies of each group, by the node that sent them; a node of no group is logged."""
        group_of = {node: g for g, state in enumerate(states) for node in state.nodes.values()}
        routed: list[list[Message]] = [[] for _ in states]
        for msg in replies:
            g = group_of.get(msg.metadata.src_node_id)
            if g is None:
                log(WARNING, "Secure aggregation: a reply from node %d, which was not asked, is ignored.",
                    msg.metadata.src_node_id)
                continue
            routed[g].append(msg)
        return routed

    def _read(self, state: SecureRoundState, replies: Iterable[Message], asked: set[int],
              with_metrics: bool = False) -> dict[int, tuple[dict, dict]]:
        """Index -> (protocol values, checked metrics) of each good reply; why each other one is not
        used goes to ``state.reasons`` (the protocol then drops its client: no reply)."""
        index_of = state.index_of()
        state.reasons = {}
        good: dict[int, tuple[dict, dict]] = {}
        for msg in replies:
            i = index_of[msg.metadata.src_node_id]
            if i not in asked:
                log(WARNING, "Round %d, secure aggregation: a reply from node %d, which was not asked this stage, "
                    "is ignored.", state.spec.round_id, msg.metadata.src_node_id)
                continue
            if i in state.reasons:
                continue
            if msg.has_content():  # an error reply (a ClientApp that raised or refused) has none
                state.uplink[i] = state.uplink.get(i, 0) + record_nbytes(msg.content)
            if i in good:
                state.reasons[i] = "a second reply in the same stage"
                good.pop(i)
            elif msg.has_error():
                state.reasons[i] = f"error code {msg.error.code}: {robust.error_summary(msg.error.reason)}"
            else:
                try:
                    good[i] = read_reply(msg, with_metrics)
                except Exception as exc:  # noqa: BLE001 - one hostile reply leaves the round, never ends it
                    state.reasons[i] = f"malformed: {exc}"
        return good

    def _collect(self, state: SecureRoundState, stage: str, collect: Callable[[], object]):
        """The server's step of the protocol at ``stage`` for one group; each client it drops is
        logged (with the reason found before it, where there was one). A group that cannot go on
        is marked skipped, logged, and gives None: the other groups go on."""
        seen = len(state.server.dropped[stage])
        try:
            return collect()
        except protocol.RoundSkipped as exc:
            state.skipped = robust.printable(exc)
            log(WARNING, "Round %d, secure aggregation: a group of %d clients leaves the round: %s",
                state.spec.round_id, len(state.nodes), state.skipped)
            return None
        finally:
            already = {d["node_id"] for d in state.dropped[stage]}
            for i, reason in state.server.dropped[stage][seen:]:
                if state.nodes.get(i) in already:  # recorded with its reason when its reply was read
                    continue
                if i in state.reasons:
                    reason = state.reasons[i]
                elif reason.startswith("no reply"):
                    reason = "no reply before the round's timeout (round-timeout-s)"
                state.drop(stage, i, reason)
