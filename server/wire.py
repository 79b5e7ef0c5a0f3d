"""Between codec payloads (numpy) and Flower records, and what the records weigh.

Shared by the ServerApp and the ClientApp: the only place that turns a
``dict[str, np.ndarray]`` of :mod:`common.codec` into an ``ArrayRecord`` and back.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from common.codec import CodecError


def record_nbytes(record: ArrayRecord | MetricRecord | ConfigRecord | RecordDict) -> int:
    """Bytes of ``record`` as Flower serializes it for transport.

    Flower 1.42 sends a record as a tree of deflated objects (the record, one object
    per ``Array``, one per data chunk of at most 5 MB); this is the sum of their
    lengths, each unique object counted once, as each is pushed once.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def payload_to_record(payload: dict[str, np.ndarray]) -> ArrayRecord:
    """One ``Array`` per payload key (numpy serialization, dtype kept)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in payload.items()})


def record_to_payload(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The numpy arrays of ``record``; :class:`CodecError` if one does not decode."""
    payload = {}
    for key, array in record.items():
        try:
            payload[key] = array.numpy()
        except (TypeError, ValueError, OSError, EOFError) as exc:
            raise CodecError(f"array {key!r} is not a numpy array ({exc})") from exc
    return payload
