"""The FedHyBNN ClientApp: frozen encoder, local packed features, local BNN training.

Each round a client

1. checks the codec version and the encoder sha256 the server names in the train
   config, and loads its own copy of the frozen encoder (from ``encoder-path``). A
   missing encoder, or one whose hash differs, is refused with an error reply that
   says why; the server logs it and goes on with the other clients;
2. extracts its features once (packed 200-bit codes, cached on disk under the
   encoder's hash) and keeps its partition of the task's training samples, chosen
   with flwr-datasets partitioners from ``partition-id`` / ``num-partitions``;
3. trains the BNN for ``local-epochs`` from the received global model (with the flip uplink, from
   round 2 on, only the round's block of its binary weights: ``flip-blocks``, ``flip-block-rounds``;
   and it puts back the flips that ended less than ``flip-margin`` past zero);
4. replies with the packed BNN (signs + batch norm, :mod:`common.federated.codec`), or, when the
   train config says ``uplink-codec = "flips"``, only the signs that changed against the
   global model it received (:mod:`common.federated.flipcodec`), and a few metrics. Nothing else
   leaves the client: no images, codes, labels or indices. With ``bn-encoding = "thresholds"``
   (:mod:`common.federated.thresholds`) it first makes the received thresholds trainable on its
   data, and before replying sets its running statistics to those of its data, whose
   thresholds it sends as a change against the received ones.

Settings (declared in :mod:`common.federated.settings`) come from the node config first, then the
run config, then defaults: ``encoder-path``, ``data-root``, ``dataset``, ``partition-id``,
``num-partitions``; the partition scheme (``partition``, ``dirichlet-alpha``, ``seed``)
comes from the run config (an experiment setting), unless the node config sets it. The
per-round settings (task, learning rate, codecs, ...) come in each round's train config.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from common.bnn.product import product_choice
from common.federated import aggregation, codec, flipcodec, thresholds
from common.bnn.limits import derived_seed
from common.bnn.model import BNN, BNNConfig, codes_to_inputs
from common.errors import HyBNNError
from common.federated.settings import parse_settings, per_round_settings, read_by, settings_dataclass
from common.data.tasks import select_task, task_for_dataset
from common.bnn.training import TrainConfig, fit
from common.federated.wire import METRIC, RECORD, SECAGG, TRAIN_CONFIG, payload_to_record, record_to_payload
from client import secure

log = logging.getLogger("hybnn.client")

app = ClientApp()


class _ClientSettingsMethods:
    """Where this client's encoder and data live, and which share of the data is its own: one
    field per setting the client reads (common/federated/settings.py); field ``x_y`` is key ``x-y``."""

    @classmethod
    def from_context(cls, context: Context, defaults: dict | None = None) -> "ClientSettings":
        """Node config first, then run config, then ``defaults`` (the simulation's settings)."""
        entries = read_by("client")
        node = dict(context.node_config)
        run = {**(defaults or {}), **dict(context.run_config)}
        try:
            values = parse_settings(run, entries, "Run config", unknown="ignore", paths=Path)
            values.update(parse_settings(node, entries, "Node config", unknown="log", log=_warn_once, paths=Path))
        except HyBNNError as exc:
            raise HyBNNError(f"The client's settings are invalid: {exc} {NODE_CONFIG_HINT}") from exc
        return cls(**values)


ClientSettings = settings_dataclass("ClientSettings", read_by("client"), _ClientSettingsMethods, paths=Path)

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A SuperNode reads its node config every round; say what is wrong with it once."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


NODE_CONFIG_HINT = (
    'Start the SuperNode with --node-config "partition-id=I num-partitions=N '
    'encoder-path=\'/path/to/encoder\' data-root=\'/path/to/data\'".'
)

# Per-process caches: a SuperNode runs many rounds, and a simulation's worker process serves many
# clients; the encoder, the task's codes and the split into partitions do not change, so each is
# read or computed once per process and shared read-only by every client the process serves.
_ENCODERS: dict[tuple[str, str], object] = {}
_TASK_DATA: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_PARTITIONS: dict[tuple, list[np.ndarray]] = {}


def load_client_encoder(path: Path, expected_sha256: str):
    """The frozen encoder at ``path``, refused unless its sha256 is ``expected_sha256``."""
    from common.encoder.artifact import load_encoder_artifact

    if not expected_sha256:
        raise HyBNNError("The server named no encoder sha256 in its train config; the run config "
                         "must set encoder-sha256 (or the server must load an encoder).")
    key = (str(Path(path).resolve()), expected_sha256.lower())
    if key not in _ENCODERS:
        if not Path(path).exists():
            raise HyBNNError(
                f"No encoder at {path}. Copy the frozen encoder artifact (sha256 {expected_sha256}) "
                f"there, or point encoder-path in the node config at it. {NODE_CONFIG_HINT}"
            )
        _ENCODERS[key] = load_encoder_artifact(path, expected_sha256=expected_sha256)
    return _ENCODERS[key]


def local_training_data(artifact, settings: ClientSettings, task_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's share of the task's training samples, as (+-1 inputs, labels)."""
    from common.encoder.features import load_codes
    from common.data.partition import all_partitions

    if not 0 <= settings.partition_id < settings.num_partitions:
        raise HyBNNError(
            f"partition-id {settings.partition_id} is outside 0..{settings.num_partitions - 1}; give each "
            f"client a distinct partition-id below num-partitions={settings.num_partitions}. {NODE_CONFIG_HINT}")
    data_key = (artifact.sha256, str(settings.data_root), settings.dataset, task_name)
    if data_key not in _TASK_DATA:
        task = task_for_dataset(task_name, settings.dataset)
        codes, labels = load_codes(artifact, settings.data_root, "train", progress=False, dataset=settings.dataset)
        # a node's own data may lack a class of the task; the federation still trains on the others'
        codes, labels = select_task(codes, labels, task, require_every_class=False)
        _TASK_DATA[data_key] = (codes_to_inputs(codes, int(artifact.config.latent_bits)), torch.from_numpy(labels))
    x, y = _TASK_DATA[data_key]
    split_key = (*data_key, settings.num_partitions, settings.partition, settings.dirichlet_alpha, settings.seed)
    if split_key not in _PARTITIONS:
        _PARTITIONS[split_key] = all_partitions(y.numpy(), settings.num_partitions, settings.partition,
                                                settings.dirichlet_alpha, settings.seed)
    idx = torch.from_numpy(_PARTITIONS[split_key][settings.partition_id])
    if len(idx) < 2:
        raise HyBNNError(
            f"its partition holds {len(idx)} training example(s) of task {task_name} ({settings.partition} split "
            f"into {settings.num_partitions}); batch norm needs at least 2. Use fewer clients or a larger "
            "dirichlet-alpha")
    return x[idx], y[idx]


FAILURE_MODES = ("error", "hang")
"""How an injected failure shows (``client-failure-mode``): an error reply, or no reply in time."""
HANG_TIMEOUT_FACTOR = 1.5
"""A hanging client stays silent this many times the round's timeout, then answers too late to be read."""


def preload(context: Context, run_config: dict) -> None:
    """Read what every round needs into this process's caches: the encoder, the task's codes and the
    split into partitions (the simulation does this before round 1, so that round 1's timeout does not
    count it). A problem is left for the round to report, to the server, as an error reply."""
    try:
        settings = ClientSettings.from_context(context, run_config)
        artifact = load_client_encoder(settings.encoder_path, str(run_config.get(TRAIN_CONFIG.encoder_sha256, "")))
        local_training_data(artifact, settings, str(run_config.get(TRAIN_CONFIG.task, "")))
    except HyBNNError as exc:
        log.info("Nothing preloaded for node %s (its rounds will report it): %s", context.node_id, exc)


def injected_failure(rate: float, seed: int, server_round: int, partition_id: int) -> bool:
    """Whether this client fails this round on purpose (``client-failure-rate``, a testing aid):
    a draw seeded with (seed, round, partition), so a rerun fails the same clients."""
    if rate <= 0:
        return False
    return random.Random(f"hybnn-failure:{seed}:{server_round}:{partition_id}").random() < rate


class _LocalRoundMethods:
    """The train config of one round, as the server sent it: the per-round settings
    (common/federated/settings.py), the round's number and the learning rate's decay within it."""

    REQUIRED = (TRAIN_CONFIG.task, TRAIN_CONFIG.local_epochs, TRAIN_CONFIG.lr, TRAIN_CONFIG.batch_size,
                TRAIN_CONFIG.encoder_sha256)
    """Sent by every release; a round without one of them cannot be trained as the server meant."""

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "LocalRound":
        key = TRAIN_CONFIG
        codec.check_version(config.get(key.codec_version))
        try:
            missing = [name for name in cls.REQUIRED if name not in config]
            if missing:
                raise HyBNNError(f"it lacks {', '.join(missing)}")
            values = parse_settings({k: v for k, v in config.items() if k in PER_ROUND_KEYS},
                                    per_round_settings(), "train config")
            values.setdefault("input_dropout", 0.0)  # a server that predates it meant none, not the default
            return cls(**values, server_round=int(config.get(key.server_round, 0)),
                       final_lr_fraction=float(config.get(key.final_lr_fraction, 1.0)))
        except (HyBNNError, TypeError, ValueError) as exc:
            raise HyBNNError(f"The server's train config is incomplete or invalid ({exc}); "
                             "run the same HyBNN release on the server and the clients.") from exc


PER_ROUND_KEYS = frozenset(s.key for s in per_round_settings())
LocalRound = settings_dataclass("LocalRound", per_round_settings(), _LocalRoundMethods, extra=[
    ("server_round", int, field(default=0)),
    ("final_lr_fraction", float, field(default=1.0)),
    # Cosine decay of the learning rate within the round; the server decays ``lr`` across rounds.
])


def train_local(
    global_payload: dict[str, np.ndarray],
    x: torch.Tensor,
    y: torch.Tensor,
    round_config: LocalRound,
    num_classes: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, float | int]]:
    """Start from the global model, train locally, return ``(packed BNN, metrics)``."""
    config = BNNConfig.for_task(x.shape[1], num_classes)
    layout = codec.layout_for(config)
    kind = codec.validate(global_payload, layout)
    weights, bn = codec.decode(global_payload, layout, kind)
    model = BNN(config)
    codec.load_into_model(model, layout, aggregation.client_start_latent(
        weights, kind, round_config.vote_latent_scale, round_config.mean_latent_scale), bn)
    threshold_bn = round_config.bn_encoding == "thresholds"
    if codec.bn_encoding_of(global_payload) != round_config.bn_encoding:
        # The reply's thresholds are a change against the received ones: both must be one form.
        raise HyBNNError(f"the global model's batch norm travels as {codec.bn_encoding_of(global_payload)}, "
                         f"but the round's bn-encoding is {round_config.bn_encoding}; the server is misconfigured")
    if threshold_bn:
        thresholds.calibrate(model, x)  # received thresholds -> a trainable batch norm firing at them
    # A partition smaller than a batch trains as one batch (many small clients: no warning per client).
    train_config = TrainConfig(epochs=round_config.local_epochs, lr=round_config.lr,
                               batch_size=max(2, min(round_config.batch_size, len(y))), seed=seed,
                               final_lr_fraction=round_config.final_lr_fraction,
                               input_dropout=round_config.input_dropout)
    # With the flip uplink, train, and so flip, only this round's block of the binary weights.
    trained = (flipcodec.training_only_block(model, round_config.server_round, round_config.flip_blocks,
                                                 round_config.flip_block_rounds)
               if round_config.uplink_codec == "flips" else contextlib.nullcontext())
    undo_weak_flips = (round_config.uplink_codec == "flips" and round_config.flip_margin > 0
                       and round_config.server_round >= 2)
    start_latent = codec.binary_latents(model) if undo_weak_flips else None
    with trained:
        result = fit(model, x, y, train_config, progress=False)
    if undo_weak_flips:
        flipcodec.undo_weak_flips(model, weights, start_latent, round_config.flip_margin)
    last = result.history[-1] if result.history else {"loss": float("nan"), "acc": float("nan")}
    metrics = {
        METRIC.num_examples: int(len(y)),
        METRIC.train_loss: float(last["loss"]),
        METRIC.train_acc: float(last["acc"]),
        METRIC.train_seconds: float(result.seconds),
        METRIC.codec_version: codec.CODEC_VERSION,
    }
    if threshold_bn:
        thresholds.recalibrate(model, x)  # the thresholds sent: this client's data, not its last batches
    encoding = dict(bn_dtype=round_config.bn_dtype, bn_encoding=round_config.bn_encoding,
                    reference_bn=bn if threshold_bn else None)
    if round_config.uplink_codec == "flips":
        # The reference is the sign of what was received; the server holds the same record.
        return flipcodec.encode_model_flips(model, weights, **encoding), metrics
    return codec.encode_model(model, **encoding), metrics


def round_settings(msg: Message, context: Context, defaults: dict | None, who: list[str]
                   ) -> tuple[ClientSettings, LocalRound]:
    """The client's settings and the round's train config; ``who[0]`` becomes the client's name
    for log lines. :class:`HyBNNError` says what is missing or wrong."""
    settings = ClientSettings.from_context(context, defaults)
    who[0] = f"client partition {settings.partition_id}/{settings.num_partitions}"
    if RECORD.config not in msg.content.config_records:
        raise HyBNNError(f"the message lacks its {RECORD.config!r} record; run the same HyBNN release on the "
                         "server and the clients")
    return settings, LocalRound.from_config(msg.content.config_records[RECORD.config])


def round_data(settings: ClientSettings, round_config: LocalRound) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's training data for the round's task, from the encoder the server names."""
    artifact = load_client_encoder(settings.encoder_path, round_config.encoder_sha256)
    return local_training_data(artifact, settings, round_config.task)


def fail_if_injected(settings: ClientSettings, round_config: LocalRound, who: str) -> None:
    """Fail this round on purpose where ``client-failure-rate`` draws it (a testing aid)."""
    if not injected_failure(round_config.client_failure_rate, settings.seed, round_config.server_round,
                            settings.partition_id):
        return
    reason = f"injected failure (client-failure-rate {round_config.client_failure_rate:g}, a testing aid)"
    if round_config.client_failure_mode == "hang":
        silence = HANG_TIMEOUT_FACTOR * round_config.round_timeout_s
        log.warning("%s round %d: %s: silent for %g s, past the round's timeout", who,
                    round_config.server_round, reason, silence)
        time.sleep(silence)
        reason += f", silent for {silence:g} s"
    raise HyBNNError(reason)


def refusal(msg: Message, who: str, exc: Exception) -> Message:
    """The error reply of a client that cannot take part, with the reason it logs."""
    reason = f"{who} refused the round: {exc}"
    log.error(reason)
    return Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def handle_train(msg: Message, context: Context, defaults: dict | None = None, threads: int = 1) -> Message:
    """The train handler without Flower's decorator, so tests and the simulation can call it.

    ``defaults`` stands in for run-config keys the context lacks (``run_simulation``
    gives the ClientApp an empty run config); ``threads``: torch threads for the training.
    A message with a ``secagg`` record is a secure round's (client/secure.py): the reply is the
    masked vector alone.
    """
    who = [f"client node {context.node_id}"]
    try:
        settings, round_config = round_settings(msg, context, defaults, who)
        if RECORD.arrays not in msg.content.array_records:
            raise HyBNNError(f"the train message lacks its {RECORD.arrays!r} record; run the same HyBNN release "
                             "on the server and the clients")
        fail_if_injected(settings, round_config, who[0])
        x, y = round_data(settings, round_config)
        torch.set_num_threads(threads)
        global_payload = record_to_payload(msg.content.array_records[RECORD.arrays])
        num_classes = task_for_dataset(round_config.task, settings.dataset).num_classes
        payload, metrics = train_local(
            global_payload, x, y, round_config, num_classes,
            seed=derived_seed(settings.seed * 100_003, round_config.server_round * 101 + settings.partition_id),
        )
        if SECAGG.record in msg.content.config_records:
            layout = codec.layout_for(BNNConfig.for_task(x.shape[1], num_classes))
            reference_bn = (codec.decode(global_payload, layout)[1] if round_config.bn_encoding == "thresholds"
                            else None)
            content = secure.masked_reply(msg, context, payload, layout, round_config.bn_dtype, reference_bn)
            log.info("%s round %d: %d examples, loss %.4f, acc %.4f; masked vector sent; %s", who[0],
                     round_config.server_round, metrics[METRIC.num_examples], metrics[METRIC.train_loss],
                     metrics[METRIC.train_acc], product_choice().describe())
            return Message(content=content, reply_to=msg)
    except HyBNNError as exc:
        return refusal(msg, who[0], exc)
    metrics[METRIC.partition_id] = settings.partition_id
    log.info("%s round %d: %d examples, loss %.4f, acc %.4f; %s", who[0], round_config.server_round,
             metrics[METRIC.num_examples], metrics[METRIC.train_loss], metrics[METRIC.train_acc],
             product_choice().describe())
    content = RecordDict({RECORD.arrays: payload_to_record(payload), RECORD.metrics: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def handle_secagg_keys(msg: Message, context: Context, defaults: dict | None = None) -> Message:
    """Stage 1 of a secure round (client/secure.py): keys, and the client's num-examples."""
    who = [f"client node {context.node_id}"]
    try:
        settings, round_config = round_settings(msg, context, defaults, who)
        _, y = round_data(settings, round_config)
        return Message(content=secure.keys_reply(msg, context, len(y), settings.partition_id), reply_to=msg)
    except HyBNNError as exc:
        return refusal(msg, who[0], exc)


def handle_secagg_stage(msg: Message, context: Context) -> Message:
    """Stage 2 or 4 of a secure round (client/secure.py), by the message's type."""
    reply = {SECAGG.message_type(SECAGG.shares_action): secure.shares_reply,
             SECAGG.message_type(SECAGG.unmask_action): secure.unmask_reply}.get(msg.metadata.message_type)
    try:
        if reply is None:
            raise HyBNNError(f"message type {msg.metadata.message_type!r} is no secure-aggregation stage")
        return Message(content=reply(msg, context), reply_to=msg)
    except HyBNNError as exc:
        return refusal(msg, f"client node {context.node_id}", exc)


def register(client_app: ClientApp, train_handler, keys_handler) -> None:
    """``client_app``'s handlers: ``train`` and the secure-aggregation stages."""
    client_app.train()(train_handler)
    client_app.train(SECAGG.keys_action)(keys_handler)
    client_app.train(SECAGG.shares_action)(handle_secagg_stage)
    client_app.train(SECAGG.unmask_action)(handle_secagg_stage)


register(app, lambda msg, context: handle_train(msg, context),
         lambda msg, context: handle_secagg_keys(msg, context))
