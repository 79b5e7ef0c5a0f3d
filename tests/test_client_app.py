"""The ClientApp: encoder refusal, and a reply that holds only the packed BNN and metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode

from common.federated import codec
from common.bnn.model import BNN, BNNConfig
from common.federated.wire import METRIC, RECORD, TRAIN_CONFIG, payload_to_record, record_to_payload


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A valid (untrained) encoder artifact: the client only checks and loads it here."""
    from common.encoder.artifact import save_encoder_artifact
    from common.encoder.vae import BinaryVAE, VAEConfig

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("encoder")
    save_encoder_artifact(BinaryVAE(VAEConfig()), out, data_sha256="0" * 64, train_config={}, history=[])
    return out


def sha_of(path: Path) -> str:
    from common.encoder.artifact import load_encoder_artifact

    return load_encoder_artifact(path).sha256


def train_message(sha: str, bnn_bits: int = 200) -> Message:
    model = BNN(BNNConfig(in_bits=bnn_bits))
    key = TRAIN_CONFIG
    config = ConfigRecord({key.task: "4v5", key.local_epochs: 1, key.lr: 0.01, key.batch_size: 32,
                           key.encoder_sha256: sha, key.codec_version: codec.CODEC_VERSION, key.server_round: 1})
    content = RecordDict({RECORD.arrays: payload_to_record(codec.encode_model(model, bn_encoding="thresholds")), RECORD.config: config})
    return Message(content=content, dst_node_id=1, message_type="train")


def context(encoder: Path, tmp_path: Path) -> Context:
    return Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                   node_config={"partition-id": 0, "num-partitions": 3, "encoder-path": str(encoder),
                                "data-root": str(tmp_path / "data")})


def test_wrong_encoder_hash_is_refused_with_a_reason(encoder_dir, tmp_path):
    from client.client_app import handle_train

    reply = handle_train(train_message("f" * 64), context(encoder_dir, tmp_path))
    assert reply.has_error()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "sha256" in reply.error.reason and "f" * 64 in reply.error.reason


def test_missing_encoder_is_refused_with_a_reason(tmp_path):
    from client.client_app import handle_train

    reply = handle_train(train_message("a" * 64), context(tmp_path / "nowhere", tmp_path))
    assert reply.has_error()
    assert "No encoder at" in reply.error.reason and "encoder-path" in reply.error.reason


def test_reply_holds_only_the_packed_bnn_and_metrics(encoder_dir, tmp_path, monkeypatch):
    import client.client_app as client_app

    x = torch.where(torch.rand(120, 200) > 0.5, 1.0, -1.0)
    y = (x[:, 0] > 0).long()
    seen = {}

    def fake_data(artifact, settings, task_name):
        seen["settings"] = settings
        return x, y

    monkeypatch.setattr(client_app, "local_training_data", fake_data)
    reply = client_app.handle_train(train_message(sha_of(encoder_dir)), context(encoder_dir, tmp_path))
    assert not reply.has_error(), reply.error
    content = reply.content
    assert set(content.keys()) == {RECORD.arrays, RECORD.metrics}
    assert len(content.config_records) == 0
    payload = record_to_payload(content.array_records[RECORD.arrays])
    assert set(payload) == {"bnt"}  # signs and threshold batch norm, the default bn-encoding
    layout = codec.layout_for(BNNConfig())
    from common.federated import thresholds

    most = layout.n_bits_bytes + 1 + thresholds.update_budget(layout.shape) + layout.shape.output_bytes("float16")
    assert payload["bnt"].dtype == np.uint8 and payload["bnt"].shape[0] <= most
    sent = record_to_payload(train_message(sha_of(encoder_dir)).content.array_records[RECORD.arrays])
    codec.decode(payload, layout, reference_bn=codec.decode(sent, layout)[1])  # an update against what it got
    metrics = dict(content.metric_records[RECORD.metrics])
    assert set(metrics) == {METRIC.num_examples, METRIC.train_loss, METRIC.train_acc, METRIC.train_seconds,
                            METRIC.codec_version, METRIC.partition_id}
    assert metrics[METRIC.num_examples] == 120
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    # Settings came from the node config.
    assert seen["settings"].partition_id == 0 and seen["settings"].num_partitions == 3


def test_node_config_wins_over_run_config(encoder_dir, tmp_path):
    from client.client_app import ClientSettings

    ctx = Context(run_id=1, node_id=1, state=RecordDict(),
                  run_config={"encoder-path": "/run", "data-root": "/run-data", "partition": "dirichlet"},
                  node_config={"partition-id": 2, "num-partitions": 3, "encoder-path": "/node"})
    s = ClientSettings.from_context(ctx, defaults={"seed": 7, "data-root": "/default"})
    assert (str(s.encoder_path), str(s.data_root), s.partition, s.seed, s.partition_id) == (
        "/node", "/run-data", "dirichlet", 7, 2)


def test_old_codec_version_is_refused(encoder_dir, tmp_path):
    from client.client_app import handle_train

    msg = train_message(sha_of(encoder_dir))
    msg.content[RECORD.config][TRAIN_CONFIG.codec_version] = 0
    reply = handle_train(msg, context(encoder_dir, tmp_path))
    assert reply.has_error() and "codec version" in reply.error.reason


def test_a_client_refuses_a_global_model_in_another_bn_encoding_than_the_round_s():
    """The reply's thresholds are a change against the received ones: a server that sends
    one form and configures the other gets a clear refusal, not a reply it cannot check."""
    from client.client_app import LocalRound, train_local
    from common.errors import HyBNNError

    x = torch.where(torch.rand(16, 200) > 0.5, 1.0, -1.0)
    y = (x[:, 0] > 0).long()
    floats_downlink = codec.encode_model(BNN(BNNConfig(in_bits=200)), bn_encoding="floats")
    thresholds_round = LocalRound(task="4v5", local_epochs=1, lr=0.01, batch_size=8, bn_encoding="thresholds")
    with pytest.raises(HyBNNError, match="travels as floats, but the round's bn-encoding is thresholds"):
        train_local(floats_downlink, x, y, thresholds_round, num_classes=2, seed=0)
    floats_round = LocalRound(task="4v5", local_epochs=1, lr=0.01, batch_size=8, bn_encoding="floats")
    payload, metrics = train_local(floats_downlink, x, y, floats_round, num_classes=2, seed=0)
    assert metrics["num-examples"] == 16 and codec.bn_encoding_of(payload) == "floats"
