"""The Flower messages of FedHyBNN: record and key names, and numpy payloads as records.

Shared by the ServerApp and the ClientApp; the only module of :mod:`common` that imports
``flwr``. A train message holds the ArrayRecord ``RECORD.arrays`` (the global model) and
the ConfigRecord ``RECORD.config`` (keys :data:`TRAIN_CONFIG`); a reply holds
``RECORD.arrays`` (the client's update) and the MetricRecord ``RECORD.metrics`` (keys
:data:`METRIC`). Each name is written here once; the server, the client, the checks of
:mod:`common.federated.robust` and the tests use these constants.

It is also the only place that turns a ``dict[str, np.ndarray]`` of :mod:`common.federated.codec`
into an ``ArrayRecord`` and back, and that measures what a record weighs. A 1-D ``uint8`` or
``int8`` array (the packed BNN) travels as its raw bytes, ``stype`` :data:`RAW_STYPE`, with
``dtype`` and ``shape`` in the ``Array``'s own fields: numpy's serialization would add a
128-byte header, 4% of the packed uplink. Other arrays travel as Flower's ``numpy.ndarray``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from common.federated.codec import CodecError, is_raw

RAW_STYPE = "raw"
"""``Array.stype`` of an array sent as its raw bytes (1-D, ``uint8`` or ``int8``)."""


@dataclass(frozen=True)
class RecordKeys:
    """The names of the records in a train message and in its reply."""

    arrays: str = "arrays"
    """ArrayRecord: the global model (message) or the client's update (reply)."""
    config: str = "config"
    """ConfigRecord of the train message, keys :class:`TrainConfigKeys`."""
    metrics: str = "metrics"
    """MetricRecord of the reply, keys :class:`MetricKeys`."""


@dataclass(frozen=True)
class TrainConfigKeys:
    """The keys of the train config the server sends with the global model each round."""

    task: str = "task"
    server_round: str = "server-round"
    local_epochs: str = "local-epochs"
    lr: str = "lr"
    batch_size: str = "batch-size"
    final_lr_fraction: str = "final-lr-fraction"
    encoder_sha256: str = "encoder-sha256"
    bn_dtype: str = "bn-dtype"
    uplink_codec: str = "uplink-codec"
    vote_latent_scale: str = "vote-latent-scale"
    codec_version: str = "codec-version"


@dataclass(frozen=True)
class MetricKeys:
    """The keys of the metrics a client replies with (checked by :data:`common.federated.robust.CLIENT_METRICS`)."""

    num_examples: str = "num-examples"
    codec_version: str = "codec-version"
    partition_id: str = "partition-id"
    train_loss: str = "train-loss"
    train_acc: str = "train-acc"
    train_seconds: str = "train-seconds"


@dataclass(frozen=True)
class SecAggNames:
    """Secure aggregation's messages (docs/security.md): a round's ``train`` message is preceded by
    two stages and followed by one, each a message type of its own, ``train.<action>``. Every
    stage message and reply carries its protocol values in the ConfigRecord :attr:`record`."""

    keys_action: str = "secagg_keys"
    """Stage 1: the round's spec; the reply advertises the client's public keys and its num-examples."""
    shares_action: str = "secagg_shares"
    """Stage 2: the neighbours' public keys and the client's weight; the reply: its encrypted shares."""
    unmask_action: str = "secagg_unmask"
    """Stage 4: who sent a masked input and who did not; the reply: the shares that remove the masks."""
    record: str = "secagg"
    """The ConfigRecord of every stage message and reply, and of the ``train`` message and its
    reply in a secure round (stage 3: the shares addressed to the client; its masked input)."""
    state: str = "secagg-state"
    """The client's ConfigRecord in its ``Context.state``: its secrets between the stages of a round."""

    def message_type(self, action: str) -> str:
        return f"train.{action}"


RECORD = RecordKeys()
TRAIN_CONFIG = TrainConfigKeys()
METRIC = MetricKeys()
SECAGG = SecAggNames()


def record_nbytes(record: ArrayRecord | MetricRecord | ConfigRecord | RecordDict) -> int:
    """Bytes of ``record`` as Flower serializes it for transport.

    Flower 1.42 sends a record as a tree of deflated objects (the record, one object
    per ``Array``, one per data chunk of at most 5 MB); this is the sum of their
    lengths, each unique object counted once, as each is pushed once.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def payload_to_record(payload: dict[str, np.ndarray]) -> ArrayRecord:
    """One ``Array`` per payload key, dtype kept: raw bytes for 1-D ``uint8`` / ``int8``, else numpy's form."""
    return ArrayRecord({key: _array(np.ascontiguousarray(value)) for key, value in payload.items()})


def _array(value: np.ndarray) -> Array:
    if is_raw(value):
        return Array(dtype=value.dtype.name, shape=(int(value.shape[0]),), stype=RAW_STYPE, data=value.tobytes())
    return Array(value)


def record_to_payload(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The numpy arrays of ``record``; :class:`CodecError` if one does not decode."""
    payload = {}
    for key, array in record.items():
        if array.stype == RAW_STYPE:
            payload[key] = _raw(key, array)
            continue
        try:
            payload[key] = array.numpy()
        except (TypeError, ValueError, OSError, EOFError) as exc:
            raise CodecError(f"array {key!r} is not a numpy array ({exc})") from exc
    return payload


def _raw(key: str, array: Array) -> np.ndarray:
    """A raw ``Array`` as numpy, refused unless its dtype is uint8 or int8 and its shape its length."""
    if array.dtype not in ("uint8", "int8") or not isinstance(array.data, bytes):
        raise CodecError(f"raw array {key!r} has dtype {array.dtype!r}; only uint8 and int8 travel raw")
    if tuple(array.shape) != (len(array.data),):
        raise CodecError(f"raw array {key!r} claims shape {tuple(array.shape)} but holds {len(array.data)} bytes")
    return np.frombuffer(array.data, dtype=array.dtype).copy()
