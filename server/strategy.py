"""PackedFedAvg: Flower's FedAvg on packed BNN parameters, with every reply checked.

The stock ``FedAvg`` would multiply the packed uint8 bits by float weights, and it
raises an uncaught ``InconsistentMessageReplies`` when one reply is odd, which ends
the whole run. This strategy

* validates every reply completely before it is used (error replies, a second reply
  from the same node, record layout, the metrics against :data:`common.federated.robust.CLIENT_METRICS`,
  codec version, payload size, batch-norm numbers finite, within the downlink's dtype
  and with positive variances) and drops a bad one with a log line that says what
  happened and what to do, so the other clients' round goes on; anything that still
  fails on one reply drops that reply, never the round;
* bounds every client's weight (:func:`common.federated.robust.capped_weights`: ``num-examples``
  at most ``max_weight_vs_median`` times the round's median, and ``max_num_examples``),
  logs each capped reply and records it in the round's log;
* unpacks each good reply's sign bits to +-1 and lets Flower's own FedAvg arithmetic
  (``aggregate_arrayrecords``) take the weighted mean of the signs; the batch-norm
  numbers are the clients' coordinate-wise median (``bn_aggregation="median"``) or the
  weighted mean (``"mean"``), or, as thresholds (``bn_encoding="thresholds"``), the median
  threshold and majority flip per unit (:func:`common.federated.thresholds.aggregate`);
* keeps what it measures (node id, bytes, flips, weight) apart from what a client
  reports (``reported``), so that a client's metrics cannot overwrite them;
* sends back the vote (1 bit per weight) or the quantized mean (``common.federated.aggregation``);
* counts one voter per partition (:class:`common.federated.voters.VoterRoll`): a reply for a
  partition outside the planned ``[0, num_partitions)``, for one another node holds (the first
  node seen for it in the run keeps it) or from a node that holds another partition is left
  out with a log line naming the node, the claimed partition and why;
* accepts an update as full sign bits or as the sign flips against the round's global
  model (``common.federated.flipcodec``): it keeps the signs it sent each round as the reference,
  and a flip update taken against any other reference is refused like any malformed one; with
  the flips uplink and ``flip_blocks`` > 1, an update that flips any weight outside the round's
  block (:func:`common.federated.flipcodec.flip_block`, the one the clients train) is refused too;
* samples nodes with a deadline: it waits for ``min_available_nodes`` up to
  ``node_wait_s`` seconds, then goes on with whoever is connected, if at least
  ``min_train_nodes``. Flower's own sampling waits forever when a node is gone for good.
  It trains ``clients_per_round`` of them each round (0: all), drawn from the nodes sorted by
  partition where the server knows it (the simulation), else by node id, by a generator seeded
  with ``(seed, round)`` (:func:`sample_nodes`), and records who
  was sampled, who replied and who was left out and why: a sampled node with no reply when
  the round's timeout passed is recorded as such and not waited for;
* measures the serialized bytes of every model that travels, per client and round.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log
from common.federated import aggregation, codec, flipcodec, robust, sums, thresholds
from common.federated.voters import VoterRoll
from common.federated.settings import default
from common.federated.wire import METRIC, RECORD, TRAIN_CONFIG, payload_to_record, record_nbytes, record_to_payload
from server.secure import RoundSkipped, SecureRounds


@dataclass
class CheckedReply:
    node_id: int
    weights: np.ndarray
    bn: np.ndarray
    num_examples: int
    metrics: dict[str, int | float]
    """The client's metrics that passed :func:`common.federated.robust.check_client_metrics`."""
    uplink_bytes: int
    reply_bytes: int
    sign_bits: int = 0
    """Bits the binary weights took on the wire (flip header and body, or the packed signs)."""
    bn_step: int | None = None
    """The step of a threshold update (1: exact), when the batch norm came as one."""
    flips: int | None = None
    """Signs that differ from the round's reference (the global model sent), when known."""
    ignored_metrics: list[str] = field(default_factory=list)
    """Metric keys the schema does not know: left out, logged."""


def check_reply(msg: Message, layout: codec.Layout, reference: np.ndarray | None = None,
                bn_dtype: str = "float16", reference_bn: np.ndarray | None = None,
                bn_encoding: str | None = None, block: tuple[int, int] | None = None) -> CheckedReply:
    """Validate one training reply completely; :class:`codec.CodecError` says what is wrong.

    ``reference`` is the global model's weights sent this round: a flip update is decoded
    against it (and refused without one), and every update's flips are counted against it.
    ``bn_dtype`` is the downlink's batch-norm dtype: every batch-norm number must fit it.
    ``reference_bn``: the global batch norm sent this round, which a threshold update is
    decoded against. ``bn_encoding``: the run's; a reply in the other one is refused.
    ``block``: the binary weights ``[start, stop)`` a client may flip this round (the flips
    uplink's block); an update whose signs differ from ``reference`` outside it is refused.
    """
    content = msg.content
    if set(content.array_records) != {RECORD.arrays} or set(content.metric_records) != {RECORD.metrics}:
        raise codec.CodecError(
            f"the reply must hold exactly the ArrayRecord {RECORD.arrays!r} and the MetricRecord "
            f"{RECORD.metrics!r}, it holds {sorted(content.array_records)} and {sorted(content.metric_records)}"
        )
    if len(content.config_records):
        raise codec.CodecError(f"the reply carries unexpected config records {sorted(content.config_records)}")
    raw_metrics = content.metric_records[RECORD.metrics]
    codec.check_version(raw_metrics.get(METRIC.codec_version))
    metrics, ignored = robust.check_client_metrics(raw_metrics)
    arrays = content.array_records[RECORD.arrays]
    payload = record_to_payload(arrays)
    sign_bits = 8 * layout.n_bits_bytes
    if flipcodec.is_flips(payload):
        if reference is None:
            raise codec.CodecError("a sign-flip update arrived, but the server holds no global model for this round")
        payload, info = flipcodec.to_signs_payload(payload, layout, reference)
        sign_bits = 8 * info["sign_bytes"]
    if bn_encoding is not None and codec.bn_encoding_of(payload) != bn_encoding:
        raise codec.CodecError(f"its batch norm travels as {codec.bn_encoding_of(payload)}, this run's bn-encoding "
                               f"is {bn_encoding}")
    weights, bn = codec.decode(payload, layout, kind="signs", reference_bn=reference_bn)
    robust.check_bn_range(bn, robust.running_var_mask(layout.bn_names, layout.bn_sizes), bn_dtype)
    flipped = None if reference is None else (weights >= 0) != (np.asarray(reference).reshape(-1) >= 0)
    flips = None if flipped is None else int(np.count_nonzero(flipped))
    if block is not None:
        if flipped is None:
            raise codec.CodecError("the round trains in flip blocks, but the server holds no global model for "
                                   "this round to check the flips against")
        start, stop = block
        outside = flips - int(np.count_nonzero(flipped[start:stop]))
        if outside:
            raise codec.CodecError(f"{outside} of its {flips} sign flips lie outside this round's flip block, "
                                   f"binary weights [{start}, {stop}) (flip-blocks); a client trains only the "
                                   "round's block")
    return CheckedReply(
        node_id=msg.metadata.src_node_id,
        weights=weights,
        bn=bn,
        num_examples=int(metrics[METRIC.num_examples]),
        metrics=metrics,
        uplink_bytes=record_nbytes(arrays),
        reply_bytes=record_nbytes(content),
        sign_bits=sign_bits,
        bn_step=codec.bn_update_step(payload, layout),
        flips=flips,
        ignored_metrics=ignored,
    )


@dataclass
class RoundLog:
    """What happened in one round, for results.json."""

    round: int
    clients: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    capped: list[dict] = field(default_factory=list)
    """Replies whose weight was capped: node id, reported num-examples, the weight used."""
    downlink_bytes: int = 0
    sampled: int = 0
    sampled_nodes: list[int] = field(default_factory=list)
    """The node ids sampled for this round, in the order sent."""
    sampled_partitions: list[int | None] = field(default_factory=list)
    """Each sampled node's partition id, where the server knows it (the simulation); else empty."""
    replied: list[int] = field(default_factory=list)
    """The sampled nodes whose reply (good or not) arrived before the round's timeout."""
    connected: int = 0
    """Nodes connected when the round was sampled."""
    secure: dict | None = None
    """A secure round's record (:meth:`server.secure.SecureRoundState.record`): counts, ids, bytes; no update."""


def sample_nodes(nodes: Iterable[int], k: int, seed: int, server_round: int,
                 partitions: Mapping[int, int] | None = None) -> list[int]:
    """``k`` distinct nodes of ``nodes`` (all when ``k`` is 0 or at least their number), drawn
    by a generator seeded with ``(seed, server_round)``: the same nodes, seed and round give the
    same sample, whatever order the nodes are listed in.

    ``partitions`` (node id -> partition id, where known) orders the nodes by partition before
    the draw, node ids without one after them: then the same partitions, seed and round give
    the same sampled partitions, whatever ids the nodes have."""
    ordered = sorted(set(nodes), key=_node_order(partitions))
    if k <= 0 or k >= len(ordered):
        return ordered
    return random.Random(f"hybnn-sample:{seed}:{server_round}").sample(ordered, k)


def _node_order(partitions: Mapping[int, int] | None) -> Callable[[int], tuple]:
    """Sort key of a node: its partition id (when known), then its node id."""
    known = partitions or {}
    return lambda node: (0, known[node], node) if node in known else (1, 0, node)


class PackedFedAvg(FedAvg):
    """FedAvg over the packed BNN of :mod:`common.federated.codec`; see the module docstring."""

    def __init__(
        self,
        layout: codec.Layout,
        mode: str = aggregation.DEFAULT_MODE,
        bn_dtype: str = "float16",
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        node_wait_s: float = 120.0,
        on_round: Callable[[RoundLog], None] | None = None,
        lr_for_round: Callable[[int], float] | None = None,
        lr_end_fraction: Callable[[int], float] | None = None,
        max_weight_vs_median: float = robust.DEFAULT_MAX_WEIGHT_VS_MEDIAN,
        max_num_examples: int = 0,
        bn_aggregation: str = robust.DEFAULT_BN_AGGREGATION,
        clients_per_round: int = 0,
        seed: int = 0,
        bn_encoding: str = default("bn-encoding"),
        node_partitions: Callable[[Grid], Mapping[int, int]] | None = None,
        uplink_codec: str = default("uplink-codec"),
        flip_blocks: int = default("flip-blocks"),
        flip_block_rounds: int = default("flip-block-rounds"),
        num_partitions: int = 0,
        secure_aggregation: str = default("secure-aggregation"),
        secure_threshold: int = default("secure-threshold"),
        sum_weight_bits: int = default("sum-weight-bits"),
        secure_group_size: int = default("secure-group-size"),
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=0,
            min_available_nodes=min_available_nodes,
            weighted_by_key=METRIC.num_examples,
            arrayrecord_key=RECORD.arrays,
            configrecord_key=RECORD.config,
        )
        self.layout = layout
        self.mode = aggregation.check_mode(mode)
        self.bn_dtype = bn_dtype
        self.bn_encoding = codec.check_bn_encoding(bn_encoding)
        self.node_wait_s = node_wait_s
        self.on_round = on_round
        self.lr_for_round = lr_for_round
        self.lr_end_fraction = lr_end_fraction
        robust.check_weight_bounds(max_weight_vs_median, max_num_examples, bn_aggregation)
        self.max_weight_vs_median = max_weight_vs_median
        self.max_num_examples = max_num_examples
        self.bn_aggregation = bn_aggregation
        if clients_per_round < 0:
            raise ValueError(f"clients_per_round must be at least 0, got {clients_per_round}")
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.node_partitions = node_partitions
        """Where the server can tell which partition each node holds (the simulation): node id -> partition id."""
        if uplink_codec not in flipcodec.UPLINK_CODECS:
            raise ValueError(f"uplink_codec must be one of {flipcodec.UPLINK_CODECS}, got {uplink_codec!r}")
        self.uplink_codec = uplink_codec
        if uplink_codec == "flips":
            flipcodec.flip_block(2, flip_blocks, layout.n_binary, flip_block_rounds)  # refuses bad values now
        self.flip_blocks = flip_blocks
        self.flip_block_rounds = flip_block_rounds
        self.partitions: dict[int, int] = {}
        self.voters = VoterRoll(num_partitions)
        """One partition, one voter (:mod:`common.federated.voters`): who holds which partition in this run."""
        self.rounds: dict[int, RoundLog] = {}
        self.references: dict[int, np.ndarray] = {}
        """The global weights sent in each round still being aggregated: what flip updates refer to."""
        self.bn_references: dict[int, np.ndarray] = {}
        """The global batch norm sent in that round: what threshold updates refer to."""
        if secure_aggregation not in ("off", "on", "clear"):
            raise ValueError(f"secure_aggregation must be off, on or clear, got {secure_aggregation!r}")
        self.secure_aggregation = secure_aggregation
        self.sum_layout = sums.SumLayout(layout.n_binary, layout.shape, bn_dtype)
        self.sum_weight_bits = sum_weight_bits
        self.secure_group_size = secure_group_size
        self.secure = (SecureRounds(self.sum_layout, sum_weight_bits, secure_threshold, self._capped,
                                    self._voter_refusal, secure_group_size, seed)
                       if secure_aggregation == "on" else None)
        """The protocol's messages of a secure round (server/secure.py), with secure-aggregation on."""
        self.timeout = 3600.0
        self._grid: Grid | None = None

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              **kwargs):
        self.timeout = timeout  # every stage of a secure round waits as long as the round's training
        return super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout,
                             **kwargs)

    def _capped(self, num_examples: list[int]) -> list[int]:
        return robust.capped_weights(num_examples, self.max_weight_vs_median, self.max_num_examples)

    def _voter_refusal(self, node: int, partition: int | None) -> str | None:
        return self.voters.refusal(node, partition, self.partitions)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> PackedFedAvg: aggregation %s, codec v%d, %d binary weights, %d batch-norm numbers as %s",
            self.mode, codec.CODEC_VERSION, self.layout.n_binary, self.layout.n_bn, self.bn_encoding)
        log(INFO, "\t└──> weight cap %s x median num-examples%s, batch norm by %s",
            self.max_weight_vs_median or "no",
            f" and {self.max_num_examples}" if self.max_num_examples else "", self.bn_aggregation)

    # -------------------------------------------------------------- global model
    def encode_global(self, weights: np.ndarray, bn: np.ndarray) -> ArrayRecord:
        """The downlink record: the vote's bits, or the quantized mean (``self.mode``)."""
        if self.mode == "vote":
            payload = codec.encode_signs(aggregation.vote(weights), bn, self.bn_dtype, self.bn_encoding,
                                         layout=self.layout)
        else:
            payload = codec.encode_latent(weights, bn, self.bn_dtype, self.bn_encoding, layout=self.layout)
        return payload_to_record(payload)

    def set_reference(self, server_round: int, arrays: ArrayRecord) -> None:
        """Remember the global model sent in ``server_round``; earlier rounds are forgotten."""
        weights, bn = codec.decode(record_to_payload(arrays), self.layout)
        self.references = {server_round: weights}
        self.bn_references = {server_round: bn}

    def flip_block(self, server_round: int) -> tuple[int, int] | None:
        """The binary weights ``[start, stop)`` the clients may flip in ``server_round``, the block
        they train (:func:`common.federated.flipcodec.flip_block`); None: every weight."""
        if self.uplink_codec != "flips":
            return None  # the clients train every weight (client/client_app.py, train_local)
        start, stop = flipcodec.flip_block(server_round, self.flip_blocks, self.layout.n_binary,
                                           self.flip_block_rounds)
        return None if stop - start == self.layout.n_binary else (start, stop)

    # -------------------------------------------------------------- sampling
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes: all ``min_available_nodes`` if they come within ``node_wait_s``,
        else whoever is there once at least ``min_train_nodes`` are."""
        start = time.monotonic()
        last_log = 0.0
        while True:
            nodes = sorted(grid.get_node_ids())
            waited = time.monotonic() - start
            if len(nodes) >= self.min_available_nodes:
                return nodes
            if waited >= self.node_wait_s and len(nodes) >= max(1, self.min_train_nodes):
                log(WARNING, "Only %d of %d nodes connected after %.0f s; going on with them. "
                    "Start the missing SuperNodes, or lower min-available-nodes in the run config.",
                    len(nodes), self.min_available_nodes, waited)
                return nodes
            if waited - last_log >= 10.0 or last_log == 0.0:
                log(INFO, "Waiting for nodes: %d connected, %d wanted (going on with >= %d after %.0f s).",
                    len(nodes), self.min_available_nodes, max(1, self.min_train_nodes), self.node_wait_s)
                last_log = max(waited, 1e-9)
            time.sleep(1.0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self._wait_for_nodes(grid)
        if self.node_partitions is not None:
            self.partitions = dict(self.node_partitions(grid))
        node_ids = sample_nodes(nodes, self.clients_per_round, self.seed, server_round, self.partitions)
        if 0 < len(nodes) < self.clients_per_round:
            log(WARNING, "Round %d: only %d nodes connected, fewer than clients-per-round %d; training all of them.",
                server_round, len(nodes), self.clients_per_round)
        log(INFO, "configure_train: sampled %d nodes (out of %d)", len(node_ids), len(nodes))
        config[TRAIN_CONFIG.codec_version] = codec.CODEC_VERSION
        config[TRAIN_CONFIG.server_round] = server_round
        if self.lr_for_round is not None:
            config[TRAIN_CONFIG.lr] = float(self.lr_for_round(server_round))
        if self.lr_end_fraction is not None:
            config[TRAIN_CONFIG.final_lr_fraction] = float(self.lr_end_fraction(server_round))
        round_log = self.rounds.setdefault(server_round, RoundLog(server_round))
        round_log.downlink_bytes = record_nbytes(arrays)
        round_log.sampled = len(node_ids)
        round_log.sampled_nodes = list(node_ids)
        round_log.sampled_partitions = [self.partitions.get(n) for n in node_ids] if self.partitions else []
        round_log.connected = len(nodes)
        self.set_reference(server_round, arrays)
        if self.secure is not None:
            self._grid = grid
            try:
                states = self.secure.open(grid, server_round, node_ids, config, self.timeout)
            except RoundSkipped as exc:
                self._skip(round_log, exc)
                return []
            round_log.secure = self.secure.record(server_round)
            return self.secure.train_messages(states, arrays, config)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def _skip(self, round_log: RoundLog, exc: Exception) -> None:
        """A secure round that ends without a sum: logged, recorded; the run goes on."""
        reason = robust.printable(exc)
        round_log.secure = self.secure.record(round_log.round, skipped=reason)
        log(WARNING, "Round %d is skipped: %s. The global model stays as it was; the run goes on.",
            round_log.round, reason)

    # -------------------------------------------------------------- aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_log = self.rounds.setdefault(server_round, RoundLog(server_round))
        if self.secure is not None:
            return self._aggregate_secure(server_round, replies, round_log)

        def drop(node: int, reason: str, hint: str) -> None:
            reason = robust.printable(reason)  # may hold the client's own words: no terminal escapes, bounded
            log(WARNING, "Round %d: the reply of node %d is left out of this round: %s. %s",
                server_round, node, reason, hint)
            round_log.dropped.append({"node_id": node, "reason": reason})

        good: list[CheckedReply] = []
        seen: set[int] = set()
        block = self.flip_block(server_round)
        sampled = set(round_log.sampled_nodes)
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in seen and node in sampled:
                round_log.replied.append(node)
            if node in seen:
                drop(node, "a second reply from this node in the same round", "Only its first reply counts.")
                continue
            seen.add(node)
            if msg.has_error():
                drop(node, f"error code {msg.error.code}: {robust.error_summary(msg.error.reason)}",
                     "The others go on. " + _error_hint(msg.error.code))
                continue
            try:
                reply = check_reply(msg, self.layout, self.references.get(server_round), self.bn_dtype,
                                    self.bn_references.get(server_round), self.bn_encoding, block)
            except Exception as exc:  # noqa: BLE001 - one hostile reply must never end the round
                drop(node, f"malformed: {exc}",
                     "Check that the client runs the same HyBNN release and task as the server.")
                continue
            known = self.partitions.get(node)
            if known is not None and reply.metrics.get(METRIC.partition_id, known) != known:
                log(WARNING, "Round %d: node %d reports partition %s, the server counted it as partition %d; "
                    "the sample is still uniform, but another run with this seed may draw other partitions.",
                    server_round, node, reply.metrics.get(METRIC.partition_id), known)
            refused = self.voters.refusal(node, reply.metrics.get(METRIC.partition_id), self.partitions)
            if refused:
                drop(node, f"not a voter: it {refused}",
                     "Give each SuperNode its own partition-id below min-available-nodes in its node config, "
                     "and set min-available-nodes to the federation's size.")
                continue
            if reply.ignored_metrics:
                log(INFO, "Round %d: node %d reported metrics the server does not know, ignored: %s",
                    server_round, node, robust.printable(", ".join(reply.ignored_metrics)))
            good.append(reply)
        for node in sorted(sampled - seen):
            drop(node, "no reply before the round's timeout (round-timeout-s)",
                 "The round went on without it; a late reply is discarded.")
        weights = robust.capped_weights([r.num_examples for r in good], self.max_weight_vs_median,
                                        self.max_num_examples)
        for reply, weight in zip(good, weights):
            if weight < reply.num_examples:
                log(WARNING, "Round %d: node %d claims %d examples; its weight is capped at %d "
                    "(max-weight-vs-median %s, max-num-examples %s).", server_round, reply.node_id,
                    reply.num_examples, weight, self.max_weight_vs_median, self.max_num_examples or "none")
                round_log.capped.append({"node_id": reply.node_id, "reported_num_examples": reply.num_examples,
                                         "weight": weight})
            round_log.clients.append(self._client_entry(reply, weight, round_log.downlink_bytes))
        log(INFO, "aggregate_train: %d good replies, %d left out, %d capped",
            len(good), len(round_log.dropped), len(round_log.capped))
        round_log.clients.sort(key=lambda c: (c["reported"].get("partition_id", 0), c["node_id"]))
        if not good:
            log(WARNING, "Round %d: no usable reply; the global model stays as it was.", server_round)
            if self.on_round:
                self.on_round(round_log)
            return None, None
        # One order whatever order the replies arrived in: the same sums, to the last bit, in a rerun.
        node_order = _node_order(self.partitions)
        order = sorted(range(len(good)), key=lambda i: node_order(good[i].node_id))
        good, weights = [good[i] for i in order], [weights[i] for i in order]
        try:
            arrays, metrics = self._aggregate(good, weights, server_round)
        except Exception as exc:  # noqa: BLE001 - checked replies should not fail; if they do, keep the model
            log(ERROR, "Round %d: aggregating %d checked replies failed (%s: %s); the global model stays as "
                "it was.", server_round, len(good), type(exc).__name__, robust.printable(exc))
            round_log.dropped.extend({"node_id": r.node_id, "reason": robust.printable(f"aggregation failed: {exc}")}
                                     for r in good)
            round_log.clients.clear()
            arrays, metrics = None, None
        if self.on_round:
            self.on_round(round_log)
        return arrays, metrics

    def _aggregate_secure(self, server_round: int, replies: Iterable[Message], round_log: RoundLog
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A secure round's end: the masked vectors (stage 3), stage 4, the global model from the
        sums (of each secure group, then across them: :func:`common.federated.sums.group_model`)."""
        replies = list(replies)
        round_log.replied = [m.metadata.src_node_id for m in replies]
        states = self.secure.rounds.get(server_round, [])
        arrays = metrics = None
        skipped = (round_log.secure or {}).get("skipped")
        if states and skipped is None:
            try:
                results = self.secure.close(self._grid, server_round, replies, self.timeout)
                mean, bn = sums.group_model([t for t, _ in results], [w for _, w in results], self.sum_layout)
                arrays = self.encode_global(mean, bn)
                metrics = MetricRecord({"agreement": float(np.mean(np.abs(mean)))})
            except (RoundSkipped, sums.SumError) as exc:
                skipped = robust.printable(exc)
                log(WARNING, "Round %d is skipped: %s. The global model stays as it was; the run goes on.",
                    server_round, skipped)
        if states:
            round_log.secure = self.secure.record(server_round, skipped)
            round_log.dropped = [{**d, "stage": stage} for state in states
                                 for stage, ds in state.dropped.items() for d in ds]
            if arrays is not None:
                round_log.clients = [self._secure_entry(state, i, round_log.downlink_bytes) for state in states
                                     if state.skipped is None for i in sorted(state.server.summed_clients)]
        if self.on_round:
            self.on_round(round_log)
        return arrays, metrics

    def _secure_entry(self, state, index: int, downlink_bytes: int) -> dict:
        """A summed client's line in the round's log: what the server saw of it, which is no update."""
        uplink = state.uplink.get(index, 0)
        return {"node_id": state.nodes[index], "weight": state.weights[index], "capped": None,
                "uplink_bytes": uplink, "reply_bytes": uplink,
                "uplink_bits_per_binary_weight": 8 * uplink / self.layout.n_binary,
                "sign_bits_per_binary_weight": float(state.spec.widths[0]), "sign_flips": None, "bn_step": None,
                "downlink_bytes": downlink_bytes, "reported": state.reported.get(index, {})}

    def _client_entry(self, reply: CheckedReply, weight: int, downlink_bytes: int) -> dict:
        """One client's line in the round's log: the server's measurements, and what it reported apart."""
        n_binary = self.layout.n_binary
        return {
            "node_id": reply.node_id,
            "weight": weight,
            "capped": weight < reply.num_examples,
            "uplink_bytes": reply.uplink_bytes,
            "reply_bytes": reply.reply_bytes,
            "uplink_bits_per_binary_weight": 8 * reply.uplink_bytes / n_binary,
            "sign_bits_per_binary_weight": reply.sign_bits / n_binary,
            "sign_flips": reply.flips,
            "bn_step": reply.bn_step,
            "downlink_bytes": downlink_bytes,
            "reported": {k.replace("-", "_"): v for k, v in reply.metrics.items() if k != METRIC.codec_version},
        }

    def _aggregate(self, good: list[CheckedReply], weights: list[int], server_round: int = 0
                   ) -> tuple[ArrayRecord, MetricRecord]:
        """The global record and the round's metrics from checked replies and their capped weights."""
        # Flower's FedAvg arithmetic on the unpacked +-1 weights.
        contents = [
            RecordDict({RECORD.arrays: ArrayRecord({"w": Array(r.weights)}),
                        RECORD.metrics: MetricRecord({METRIC.num_examples: w})})
            for r, w in zip(good, weights)
        ]
        mean = np.clip(aggregate_arrayrecords(contents, METRIC.num_examples)["w"].numpy(), -1.0, 1.0)
        if self.secure_aggregation == "clear":  # what a secure round computes, on the plaintext updates
            mean, bn = self._clear_sums(good, weights, server_round)
        elif self.bn_encoding == "thresholds":
            bn = thresholds.aggregate([r.bn for r in good], weights, self.layout.shape, self.bn_aggregation)
        else:
            bn = robust.aggregate_bn([r.bn for r in good], weights, self.bn_aggregation)
        metrics = MetricRecord(robust.averaged_metrics([r.metrics for r in good], weights))
        metrics["agreement"] = float(np.mean(np.abs(mean)))
        return self.encode_global(mean, bn), metrics


    def _clear_sums(self, good: list[CheckedReply], weights: list[int], server_round: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Secure aggregation's model from plaintext replies: the same weights, secure groups and sums
        (the groups drawn over the round's sampled nodes, as a secure round draws them)."""
        scaled = dict(zip((r.node_id for r in good), sums.quantized_weights(weights, self.sum_weight_bits)))
        by_node = {r.node_id: r for r in good}
        round_log = self.rounds.get(server_round)
        sampled = round_log.sampled_nodes if round_log and round_log.sampled_nodes else sorted(by_node)
        group_sums, group_weights = [], []
        for members in sums.groups(len(sampled), self.secure_group_size, self.seed, server_round):
            nodes = [sampled[i] for i in members if sampled[i] in by_node]
            if not nodes:
                continue
            total_weight = sum(scaled[n] for n in nodes)
            vectors = [sums.client_vector(by_node[n].weights, by_node[n].bn, scaled[n], self.sum_layout) for n in nodes]
            group_sums.append(sums.plain_sum(vectors, sums.widths(self.sum_layout, total_weight)))
            group_weights.append(total_weight)
        return sums.group_model(group_sums, group_weights, self.sum_layout)


def _error_hint(code: int) -> str:
    from flwr.common.constant import ErrorCode

    if code == ErrorCode.NODE_UNAVAILABLE:
        return "The SuperNode stopped answering; restart it to have it rejoin in a later round."
    if code in (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.CLIENT_APP_CRASHED):
        return "Read that SuperNode's log for the cause."
    if code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION:
        return "The SuperNode could not load the ClientApp; check its installation."
    return "The reason above says what to fix on that client."
