"""Secure aggregation on the Message API: the ClientApp's side of a secure round (docs/security.md).

The server's messages of a secure round (server/secure.py) reach a client as

1. ``train.secagg_keys``: the round's spec and the client's index in it. The client makes its
   keys and answers with the public ones and its ``num-examples`` and ``partition-id``;
2. ``train.secagg_shares``: its neighbours' public keys and its weight. It answers with its
   secrets' shares, each encrypted to one neighbour;
3. ``train`` with a ``secagg`` record: it trains as in any round and answers with its summable
   vector (:func:`common.federated.sums.client_vector`, the same numbers the server derives from
   a plaintext reply), masked, and nothing else: no metrics, no model;
4. ``train.secagg_unmask``: who sent a masked vector; it answers with the shares that remove
   the masks, and refuses a request that would reveal both secrets of one neighbour.

Each handler turns the message into :mod:`common.secagg.protocol`'s dicts and back. The
client's secrets between the stages live in its ``Context.state`` (ConfigRecord
``secagg-state``), for one round: stage 1 replaces them.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from common.federated import codec, sums
from common.federated.wire import METRIC, RECORD, SECAGG
from common.secagg import protocol

log = logging.getLogger("hybnn.client")


def stage_values(msg: Message) -> tuple[dict, protocol.RoundSpec]:
    """The protocol values of a stage message and the round's spec they carry;
    :class:`protocol.SecAggError` without them."""
    if SECAGG.record not in msg.content.config_records:
        raise protocol.SecAggError(f"the stage message lacks its {SECAGG.record!r} record")
    values = dict(msg.content.config_records[SECAGG.record])
    return values, protocol.spec_from_config(values)


def save_state(context: Context, state: dict) -> None:
    context.state[SECAGG.state] = ConfigRecord(state)


def load_state(context: Context) -> dict:
    """The client's secrets of its secure round; the protocol checks they are of the message's round."""
    if SECAGG.state not in context.state.config_records:
        raise protocol.SecAggError("a secure-aggregation stage arrived before this round's key exchange")
    return dict(context.state.config_records[SECAGG.state])


def keys_reply(msg: Message, context: Context, num_examples: int, partition_id: int) -> RecordDict:
    """Stage 1: new keys for the round; the public ones and the client's plaintext metadata."""
    values, spec = stage_values(msg)
    me = values.get("index")
    if not isinstance(me, int) or isinstance(me, bool):
        raise protocol.SecAggError(f"the key exchange gives no index of this client in the round ({me!r})")
    state, reply = protocol.client_keys(spec, me)
    save_state(context, state)
    metrics = {METRIC.num_examples: int(num_examples), METRIC.partition_id: int(partition_id),
               METRIC.codec_version: codec.CODEC_VERSION}
    return RecordDict({SECAGG.record: ConfigRecord(reply), RECORD.metrics: MetricRecord(metrics)})


def shares_reply(msg: Message, context: Context) -> RecordDict:
    """Stage 2: the shares of the client's secrets, encrypted to its neighbours; it keeps its weight."""
    values, spec = stage_values(msg)
    state = load_state(context)
    weight = values.get("weight")
    if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
        raise protocol.SecAggError(f"the stage gives no valid weight ({weight!r}); it must be a whole number >= 1")
    state, reply = protocol.client_shares(state, spec, state.get("me"), protocol.keys_from_message(values, spec))
    save_state(context, {**state, "weight": weight})
    return RecordDict({SECAGG.record: ConfigRecord(reply)})


def masked_reply(msg: Message, context: Context, payload: dict[str, np.ndarray], layout: codec.Layout,
                 bn_dtype: str, reference_bn: np.ndarray | None) -> RecordDict:
    """Stage 3: the client's update ``payload`` (what it would send in the clear) as its summable
    vector, masked. The vector is made from the decoded payload, as the server decodes a plaintext
    reply, so a secure and a plaintext round sum the same numbers."""
    values, spec = stage_values(msg)
    state = load_state(context)
    received = protocol.ciphertexts_from_message(values, spec)
    weights, bn = codec.decode(payload, layout, kind="signs", reference_bn=reference_bn)
    weight = state.pop("weight", None)
    if not isinstance(weight, int):
        raise protocol.SecAggError("this client holds no weight for the round (its stage 2 did not run)")
    vector = sums.client_vector(weights, bn, weight, sums.SumLayout(layout.n_binary, layout.shape, bn_dtype))
    state, reply = protocol.client_masked_input(state, spec, state.get("me"), vector, received)
    save_state(context, state)
    return RecordDict({SECAGG.record: ConfigRecord(reply)})


def unmask_reply(msg: Message, context: Context) -> RecordDict:
    """Stage 4: the shares that remove the masks of who sent a vector and of who did not."""
    values, spec = stage_values(msg)
    state = load_state(context)
    survivors, dropped = protocol.unmask_request_from_message(values, spec)
    state, reply = protocol.client_unmask(state, spec, state.get("me"), survivors, dropped)
    save_state(context, state)
    return RecordDict({SECAGG.record: ConfigRecord(reply)})
