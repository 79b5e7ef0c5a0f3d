"""PackedFedAvg: Flower's FedAvg on packed BNN parameters, with every reply checked.

The stock ``FedAvg`` would multiply the packed uint8 bits by float weights, and it
raises an uncaught ``InconsistentMessageReplies`` when one reply is odd, which ends
the whole run. This strategy

* validates every reply on its own (error replies, record layout, ``num-examples``,
  codec version, payload size, NaN) and drops a bad one with a log line that says
  what happened and what to do, so the other clients' round goes on;
* unpacks each good reply's sign bits to +-1 and lets Flower's own FedAvg arithmetic
  (``aggregate_arrayrecords``) take the ``num-examples``-weighted mean, of the signs
  and of the batch-norm numbers alike;
* sends back the vote (1 bit per weight) or the quantized mean (``common.aggregation``);
* accepts an update as full sign bits or as the sign flips against the round's global
  model (``common.flipcodec``): it keeps the signs it sent each round as the reference,
  and a flip update taken against any other reference is refused like any malformed one;
* samples nodes with a deadline: it waits for ``min_available_nodes`` up to
  ``node_wait_s`` seconds, then goes on with whoever is connected, if at least
  ``min_train_nodes``. Flower's own sampling waits forever when a node is gone for good.
* measures the serialized bytes of every model that travels, per client and round.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords
from flwr.supercore import log
from common import aggregation, codec, flipcodec
from server.wire import payload_to_record, record_nbytes, record_to_payload

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES_KEY = "num-examples"
VERSION_KEY = "codec-version"
NOT_AVERAGED = (VERSION_KEY, "partition-id")


@dataclass
class CheckedReply:
    node_id: int
    weights: np.ndarray
    bn: np.ndarray
    num_examples: int
    metrics: MetricRecord
    uplink_bytes: int
    reply_bytes: int
    sign_bits: int = 0
    """Bits the binary weights took on the wire (flip header and body, or the packed signs)."""
    flips: int | None = None
    """Signs that differ from the round's reference (the global model sent), when known."""


def check_reply(msg: Message, layout: codec.Layout, reference: np.ndarray | None = None) -> CheckedReply:
    """Validate one training reply; :class:`codec.CodecError` says what is wrong.

    ``reference`` is the global model's weights sent this round: a flip update is decoded
    against it (and refused without one), and every update's flips are counted against it.
    """
    content = msg.content
    if set(content.array_records) != {ARRAYS_KEY} or set(content.metric_records) != {METRICS_KEY}:
        raise codec.CodecError(
            f"the reply must hold exactly the ArrayRecord {ARRAYS_KEY!r} and the MetricRecord "
            f"{METRICS_KEY!r}, it holds {sorted(content.array_records)} and {sorted(content.metric_records)}"
        )
    if len(content.config_records):
        raise codec.CodecError(f"the reply carries unexpected config records {sorted(content.config_records)}")
    metrics = content.metric_records[METRICS_KEY]
    codec.check_version(metrics.get(VERSION_KEY))
    n = metrics.get(NUM_EXAMPLES_KEY)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0 or n != int(n):
        raise codec.CodecError(f"'{NUM_EXAMPLES_KEY}' must be a positive whole number, got {n!r}")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise codec.CodecError(f"metric {key!r} is not a finite number: {value!r}")
    arrays = content.array_records[ARRAYS_KEY]
    payload = record_to_payload(arrays)
    sign_bits = 8 * layout.n_bits_bytes
    if flipcodec.is_flips(payload):
        if reference is None:
            raise codec.CodecError("a sign-flip update arrived, but the server holds no global model for this round")
        payload, info = flipcodec.to_signs_payload(payload, layout, reference)
        sign_bits = 8 * info["sign_bytes"]
    weights, bn = codec.decode(payload, layout, kind="signs")
    flips = None if reference is None else int(np.count_nonzero((weights >= 0) != (np.asarray(reference) >= 0)))
    return CheckedReply(
        node_id=msg.metadata.src_node_id,
        weights=weights,
        bn=bn,
        num_examples=int(n),
        metrics=metrics,
        uplink_bytes=record_nbytes(arrays),
        reply_bytes=record_nbytes(content),
        sign_bits=sign_bits,
        flips=flips,
    )


@dataclass
class RoundLog:
    """What happened in one round, for results.json."""

    round: int
    clients: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    downlink_bytes: int = 0
    sampled: int = 0


class PackedFedAvg(FedAvg):
    """FedAvg over the packed BNN of :mod:`common.codec`; see the module docstring."""

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
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=0,
            min_available_nodes=min_available_nodes,
            weighted_by_key=NUM_EXAMPLES_KEY,
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
        )
        self.layout = layout
        self.mode = aggregation.check_mode(mode)
        self.bn_dtype = bn_dtype
        self.node_wait_s = node_wait_s
        self.on_round = on_round
        self.lr_for_round = lr_for_round
        self.rounds: dict[int, RoundLog] = {}
        self.references: dict[int, np.ndarray] = {}
        """The global weights sent in each round still being aggregated: what flip updates refer to."""

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> PackedFedAvg: aggregation %s, codec v%d, %d binary weights, %d batch-norm numbers",
            self.mode, codec.CODEC_VERSION, self.layout.n_binary, self.layout.n_bn)

    # -------------------------------------------------------------- global model
    def encode_global(self, weights: np.ndarray, bn: np.ndarray) -> ArrayRecord:
        """The downlink record: the vote's bits, or the quantized mean (``self.mode``)."""
        if self.mode == "vote":
            payload = codec.encode_signs(aggregation.vote(weights), bn, self.bn_dtype)
        else:
            payload = codec.encode_latent(weights, bn, self.bn_dtype)
        return payload_to_record(payload)

    def set_reference(self, server_round: int, arrays: ArrayRecord) -> None:
        """Remember the global model sent in ``server_round``; earlier rounds are forgotten."""
        weights, _ = codec.decode(record_to_payload(arrays), self.layout)
        self.references = {server_round: weights}

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
        sample_size = max(int(len(nodes) * self.fraction_train), min(self.min_train_nodes, len(nodes)))
        node_ids = random.sample(nodes, sample_size)
        log(INFO, "configure_train: sampled %d nodes (out of %d)", len(node_ids), len(nodes))
        config[VERSION_KEY] = codec.CODEC_VERSION
        config["server-round"] = server_round
        if self.lr_for_round is not None:
            config["lr"] = float(self.lr_for_round(server_round))
        round_log = self.rounds.setdefault(server_round, RoundLog(server_round))
        round_log.downlink_bytes = record_nbytes(arrays)
        round_log.sampled = len(node_ids)
        self.set_reference(server_round, arrays)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    # -------------------------------------------------------------- aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_log = self.rounds.setdefault(server_round, RoundLog(server_round))
        good: list[CheckedReply] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                reason = f"error code {msg.error.code}: {msg.error.reason}"
                log(WARNING, "Round %d: node %d sent no model (%s). It is left out of this round; "
                    "the others go on. %s", server_round, node, reason, _error_hint(msg.error.code))
                round_log.dropped.append({"node_id": node, "reason": reason})
                continue
            try:
                good.append(check_reply(msg, self.layout, self.references.get(server_round)))
            except (codec.CodecError, ValueError, TypeError, KeyError) as exc:
                log(WARNING, "Round %d: the reply of node %d is malformed and left out of this round: %s. "
                    "Check that the client runs the same HyBNN release and task as the server.",
                    server_round, node, exc)
                round_log.dropped.append({"node_id": node, "reason": str(exc)})
        log(INFO, "aggregate_train: %d good replies, %d left out", len(good), len(round_log.dropped))
        for reply in good:
            n_binary = self.layout.n_binary
            entry = {"node_id": reply.node_id, "num_examples": reply.num_examples,
                     "uplink_bytes": reply.uplink_bytes, "reply_bytes": reply.reply_bytes,
                     "uplink_bits_per_binary_weight": 8 * reply.uplink_bytes / n_binary,
                     "sign_bits_per_binary_weight": reply.sign_bits / n_binary,
                     "sign_flips": reply.flips}
            entry.update({k.replace("-", "_"): v for k, v in reply.metrics.items()
                          if k not in (NUM_EXAMPLES_KEY, VERSION_KEY)})
            entry["downlink_bytes"] = round_log.downlink_bytes
            round_log.clients.append(entry)
        round_log.clients.sort(key=lambda c: (c.get("partition_id", 0), c["node_id"]))
        if not good:
            log(WARNING, "Round %d: no usable reply; the global model stays as it was.", server_round)
            if self.on_round:
                self.on_round(round_log)
            return None, None
        # Flower's FedAvg arithmetic on the unpacked +-1 weights and the batch-norm numbers.
        contents = [
            RecordDict({
                ARRAYS_KEY: ArrayRecord({"w": Array(r.weights), "bn": Array(r.bn)}),
                METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: r.num_examples}),
            })
            for r in good
        ]
        mean = aggregate_arrayrecords(contents, NUM_EXAMPLES_KEY)
        weights = np.clip(mean["w"].numpy(), -1.0, 1.0)
        bn = mean["bn"].numpy()
        metrics = aggregate_metricrecords([
            RecordDict({METRICS_KEY: MetricRecord({k: v for k, v in r.metrics.items() if k not in NOT_AVERAGED})})
            for r in good
        ], NUM_EXAMPLES_KEY)
        metrics["agreement"] = float(np.mean(np.abs(weights)))
        if self.on_round:
            self.on_round(round_log)
        return self.encode_global(weights, bn), metrics


def _error_hint(code: int) -> str:
    from flwr.common.constant import ErrorCode

    if code == ErrorCode.NODE_UNAVAILABLE:
        return "The SuperNode stopped answering; restart it to have it rejoin in a later round."
    if code in (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.CLIENT_APP_CRASHED):
        return "Read that SuperNode's log for the cause."
    if code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION:
        return "The SuperNode could not load the ClientApp; check its installation."
    return "The reason above says what to fix on that client."
