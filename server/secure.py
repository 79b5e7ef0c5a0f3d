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

A client's stage is addressed by its index in the round (1 .. N, the sampled nodes in order): a
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
    """The protocol's messages for :class:`server.strategy.PackedFedAvg`, one round at a time."""

    def __init__(self, layout: sums.SumLayout, weight_bits: int, threshold: int,
                 weigh: Callable[[list[int]], list[int]],
                 refuse_voter: Callable[[int, int | None], str | None]) -> None:
        self.layout = layout
        self.weight_bits = weight_bits
        self.threshold = threshold
        self.weigh = weigh
        """Reported num-examples -> capped weights (the strategy's caps)."""
        self.refuse_voter = refuse_voter
        """(node id, reported partition) -> why it may not vote, or None."""
        self.rounds: dict[int, SecureRoundState] = {}

    # ---------------------------------------------------------------- stages 1 and 2
    def open(self, grid: Grid, server_round: int, node_ids: list[int], config: ConfigRecord,
             timeout: float) -> SecureRoundState:
        """Stages 1 and 2 for the sampled ``node_ids``; :class:`RoundSkipped` when too few remain."""
        self.rounds = {r: s for r, s in self.rounds.items() if r >= server_round - 1}
        try:
            spec = round_spec(server_round, len(node_ids), self.layout, self.weight_bits, self.threshold)
        except protocol.SecAggError as exc:
            raise RoundSkipped(f"{len(node_ids)} clients sampled: {exc}") from exc
        state = SecureRoundState(spec, protocol.ServerRound(spec), dict(enumerate(node_ids, start=1)))
        self.rounds[server_round] = state
        request = state.server.request_keys()
        replies = self._send(grid, state, SECAGG.keys_action, timeout,
                             {i: stage_message({**request, "index": i}, config) for i in state.nodes},
                             with_metrics=True)
        keys, reported = {}, {}
        for i, (values, metrics) in replies.items():
            refused = self.refuse_voter(state.nodes[i], metrics.get(METRIC.partition_id))
            if refused:
                state.reasons[i] = f"not a voter: it {refused}"
                continue
            keys[i], reported[i] = values, int(metrics[METRIC.num_examples])
            state.reported[i] = {"num_examples": reported[i], "partition_id": metrics.get(METRIC.partition_id)}
        stage2 = self._collect(state, "keys", lambda: state.server.collect_keys(keys))
        order = sorted(stage2)
        weights = sums.quantized_weights(self.weigh([reported[i] for i in order]), self.weight_bits)
        state.weights = dict(zip(order, weights))
        replies = self._send(grid, state, SECAGG.shares_action, timeout,
                             {i: stage_message({**stage2[i], "weight": state.weights[i]}) for i in order})
        shares = {i: values for i, (values, _) in replies.items()}
        state.stage3 = self._collect(state, "shares", lambda: state.server.collect_shares(shares))
        return state

    def train_messages(self, state: SecureRoundState, arrays: ArrayRecord, config: ConfigRecord) -> list[Message]:
        """Stage 3: the round's ``train`` messages, with each client's shares."""
        return [Message(content=stage_message(values, config, arrays), dst_node_id=state.nodes[i],
                        message_type="train") for i, values in sorted(state.stage3.items())]

    # ---------------------------------------------------------------- stages 3 and 4
    def close(self, grid: Grid, server_round: int, replies: Iterable[Message], timeout: float
              ) -> tuple[list[np.ndarray], int]:
        """The round's sums and its total weight from the masked vectors (stage 3's replies) and
        stage 4; :class:`RoundSkipped` when they cannot be recovered."""
        state = self.rounds.get(server_round)
        if state is None or not state.stage3:
            raise RoundSkipped("its key exchange did not complete")
        masked = {i: values for i, (values, _) in self._read(state, replies, set(state.stage3)).items()}
        stage4 = self._collect(state, "masked", lambda: state.server.collect_masked(masked))
        unmask = self._send(grid, state, SECAGG.unmask_action, timeout,
                            {i: stage_message(values) for i, values in stage4.items()})
        shares = {i: values for i, (values, _) in unmask.items()}
        total = self._collect(state, "unmask", lambda: state.server.aggregate(shares))
        weight = sum(state.weights[i] for i in state.server.summed_clients)
        log(INFO, "Round %d, secure aggregation: the sum of %d clients (total weight %d) recovered.",
            server_round, len(state.server.summed_clients), weight)
        return total, weight

    # ---------------------------------------------------------------- messages
    def _send(self, grid: Grid, state: SecureRoundState, action: str, timeout: float,
              contents: Mapping[int, RecordDict], with_metrics: bool = False) -> dict[int, tuple[dict, dict]]:
        messages = [Message(content=content, dst_node_id=state.nodes[i], message_type=SECAGG.message_type(action))
                    for i, content in contents.items()]
        return self._read(state, grid.send_and_receive(messages, timeout=timeout), set(contents), with_metrics)

    def _read(self, state: SecureRoundState, replies: Iterable[Message], asked: set[int],
              with_metrics: bool = False) -> dict[int, tuple[dict, dict]]:
        """Index -> (protocol values, checked metrics) of each good reply; why each other one is not
        used goes to ``state.reasons`` (the protocol then drops its client: no reply)."""
        index_of = state.index_of()
        state.reasons = {}
        good: dict[int, tuple[dict, dict]] = {}
        for msg in replies:
            i = index_of.get(msg.metadata.src_node_id)
            if i is None or i not in asked:
                log(WARNING, "Round %d, secure aggregation: a reply from node %d, which was not asked, is ignored.",
                    state.spec.round_id, msg.metadata.src_node_id)
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
        """The server's step of the protocol at ``stage``; each client it drops is logged (with the
        reason found before it, where there was one), a skip raised as :class:`RoundSkipped`."""
        seen = len(state.server.dropped[stage])
        try:
            return collect()
        except protocol.RoundSkipped as exc:
            raise RoundSkipped(str(exc)) from exc
        finally:
            for i, reason in state.server.dropped[stage][seen:]:
                if i in state.reasons:
                    reason = state.reasons[i]
                elif reason.startswith("no reply"):
                    reason = "no reply before the round's timeout (round-timeout-s)"
                state.drop(stage, i, reason)
