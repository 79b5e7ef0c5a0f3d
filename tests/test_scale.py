"""Many clients: sampling K of the connected nodes each round, injected failures, small and empty
partitions, refused options, and a Ray simulation of 50 clients with 10 per round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from common.bnn.model import BNN, BNNConfig
from common.federated import codec
from common.federated.wire import RECORD, TRAIN_CONFIG, payload_to_record
from server.strategy import PackedFedAvg, sample_nodes
from tests.conftest import fixed_encoder

REPO = Path(__file__).resolve().parents[1]
HYBNN = str(Path(sys.executable).parent / "hybnn")
LAYOUT = codec.layout_for(BNNConfig(in_bits=8, hidden=(2,), num_classes=2))


# ------------------------------------------------------------------ sampling
def test_sampling_draws_k_distinct_connected_nodes_reproducibly():
    nodes = list(range(10_000, 11_000))
    first = sample_nodes(nodes, 100, seed=3, server_round=1)
    assert len(first) == len(set(first)) == 100 and set(first) <= set(nodes)
    assert sample_nodes(reversed(nodes), 100, seed=3, server_round=1) == first  # order of listing is irrelevant
    assert sample_nodes(nodes, 100, seed=3, server_round=2) != first             # a new draw each round
    assert sample_nodes(nodes, 100, seed=4, server_round=1) != first
    assert sample_nodes(nodes, 0, seed=3, server_round=1) == nodes               # 0: every node
    assert sample_nodes(nodes[:5], 100, seed=3, server_round=1) == nodes[:5]     # fewer than K: all


def test_sampling_by_partition_draws_the_same_partitions_whatever_the_node_ids():
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(2):  # two runs of a simulation: other random node ids, the same partitions
        ids = [int(i) for i in rng.choice(2**62, size=1000, replace=False)]
        partitions = {node: p for p, node in enumerate(ids)}
        sampled = sample_nodes(ids, 100, seed=3, server_round=4, partitions=partitions)
        samples.append([partitions[n] for n in sampled])
        by_id = sample_nodes(ids, 100, seed=3, server_round=4)
        assert [partitions[n] for n in by_id] != samples[-1]  # by node id, the partitions drawn differ
    assert samples[0] == samples[1] and len(set(samples[0])) == 100
    # Nodes whose partition is unknown come after the known ones, ordered by node id.
    assert sample_nodes([5, 9, 7], 0, 0, 1, partitions={9: 0}) == [9, 5, 7]


def test_the_simulation_s_node_partition_map_is_flower_s():
    """Flower's own node registration (the simulation's), read back through its in-memory Grid."""
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    from simulation.federate import simulated_node_partitions

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = _register_nodes(300, factory)  # node id -> partition-id, as the simulation's clients get it
    assert simulated_node_partitions(InMemoryGrid(factory)) == mapping
    assert sorted(mapping.values()) == list(range(300)) and list(mapping) != sorted(mapping)
    assert simulated_node_partitions(ConnectedNodes([1, 2])) == {}  # a deployment's Grid: unknown


class ConnectedNodes:
    """What PackedFedAvg.configure_train asks of Flower's Grid: the connected node ids."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


@pytest.mark.usefixtures("flower_task_identity")
def test_the_round_log_records_sampled_replied_and_dropped():
    strategy = PackedFedAvg(LAYOUT, bn_encoding="floats", clients_per_round=3, seed=7, min_available_nodes=1)
    model = BNN(LAYOUT.config)
    arrays = payload_to_record(codec.encode_model(model))
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({}), ConnectedNodes(range(1, 21))))
    sent = [m.metadata.dst_node_id for m in messages]
    assert len(sent) == len(set(sent)) == 3 and sent == sample_nodes(range(1, 21), 3, 7, 1)

    good, failed, silent = sent
    payload = codec.encode_signs(np.ones(LAYOUT.n_binary, np.float32), np.ones(LAYOUT.n_bn, np.float32))
    from flwr.app import MetricRecord

    from common.federated.wire import METRIC

    def reply_from(node, **kw):
        ins = Message(content=RecordDict(), dst_node_id=node, message_type="train")
        return Message(reply_to=ins, **kw)

    replies = [
        reply_from(good, content=RecordDict({RECORD.arrays: payload_to_record(payload), RECORD.metrics: MetricRecord(
            {METRIC.num_examples: 5, METRIC.codec_version: codec.CODEC_VERSION, METRIC.partition_id: 0})})),
        reply_from(failed, error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="injected failure")),
    ]
    global_arrays, _ = strategy.aggregate_train(1, replies)
    assert global_arrays is not None
    log = strategy.rounds[1]
    assert log.sampled_nodes == sent and log.connected == 20
    assert sorted(log.replied) == sorted([good, failed])
    assert [c["node_id"] for c in log.clients] == [good]
    reasons = {d["node_id"]: d["reason"] for d in log.dropped}
    assert set(reasons) == {failed, silent}
    assert "injected failure" in reasons[failed] and "no reply" in reasons[silent]


@pytest.mark.usefixtures("flower_task_identity")
def test_the_round_log_records_the_sampled_partitions_and_aggregates_in_partition_order():
    nodes = [901, 17, 444, 3, 250]
    partitions = {901: 0, 17: 1, 444: 2, 3: 3, 250: 4}
    strategy = PackedFedAvg(LAYOUT, bn_encoding="floats", clients_per_round=3, seed=2, node_partitions=lambda grid: partitions)
    arrays = payload_to_record(codec.encode_model(BNN(LAYOUT.config)))
    sent = [m.metadata.dst_node_id for m in strategy.configure_train(1, arrays, ConfigRecord({}),
                                                                     ConnectedNodes(nodes))]
    log = strategy.rounds[1]
    assert log.sampled_partitions == [partitions[n] for n in sent]
    assert sent == sample_nodes(nodes, 3, 2, 1, partitions)
    plain = PackedFedAvg(LAYOUT, bn_encoding="floats", clients_per_round=3, seed=2)
    list(plain.configure_train(1, arrays, ConfigRecord({}), ConnectedNodes(nodes)))
    assert plain.rounds[1].sampled_partitions == []


# ------------------------------------------------------------------ injected failures
def test_injected_failures_are_seeded_per_round_and_partition():
    from client.client_app import injected_failure

    draws = [injected_failure(0.5, 0, 1, p) for p in range(2000)]
    assert 900 < sum(draws) < 1100
    assert draws == [injected_failure(0.5, 0, 1, p) for p in range(2000)]
    assert draws != [injected_failure(0.5, 0, 2, p) for p in range(2000)]
    assert not any(injected_failure(0.0, 0, 1, p) for p in range(2000))


# ------------------------------------------------------------------ small and empty partitions
def test_many_dirichlet_partitions_cover_the_data_once_some_small_or_empty():
    from common.data.partition import all_partitions, partition_indices

    labels = np.r_[np.zeros(5842, np.int64), np.ones(5421, np.int64)]  # the sizes of task 4v5
    parts = all_partitions(labels, 1000, "dirichlet", 0.3, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert len(parts) == 1000 and sizes.sum() == len(labels)
    assert len(np.unique(np.concatenate(parts))) == len(labels)  # disjoint, complete
    assert (sizes == 0).any() and (sizes < 64).mean() > 0.5    # the cases the clients must handle
    np.testing.assert_array_equal(partition_indices(labels, 17, 1000, "dirichlet", 0.3, 0), parts[17])


def _train_message(sha: str, failure_rate: float = 0.0, **extra) -> Message:
    model = BNN(BNNConfig(in_bits=200))
    key = TRAIN_CONFIG
    config = ConfigRecord({key.task: "4v5", key.local_epochs: 1, key.lr: 0.01, key.batch_size: 64,
                           key.encoder_sha256: sha, key.codec_version: codec.CODEC_VERSION, key.server_round: 1,
                           "client-failure-rate": failure_rate, **extra})
    content = RecordDict({RECORD.arrays: payload_to_record(codec.encode_model(model, bn_encoding="thresholds")), RECORD.config: config})
    return Message(content=content, dst_node_id=1, message_type="train")


@pytest.mark.usefixtures("flower_task_identity")
def test_clients_with_empty_or_smaller_than_a_batch_partitions(tmp_path, mnist_root):
    from client.client_app import handle_train
    from common.data.partition import all_partitions
    from common.data.tasks import select_task, task_for_dataset
    from common.encoder.artifact import load_encoder_artifact
    from common.encoder.features import load_codes

    artifact = load_encoder_artifact(fixed_encoder(tmp_path / "enc"))
    _, labels = select_task(*load_codes(artifact, mnist_root, "train", progress=False), task_for_dataset("4v5", "mnist"))
    sizes = [len(p) for p in all_partitions(labels, 1000, "dirichlet", 0.3, seed=0)]
    empty, small = sizes.index(0), next(i for i, n in enumerate(sizes) if 2 <= n < 64)
    run_config = {"partition": "dirichlet", "dirichlet-alpha": 0.3, "seed": 0}

    def train(partition_id: int, failure_rate: float = 0.0) -> Message:
        context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
                          node_config={"partition-id": partition_id, "num-partitions": 1000,
                                       "encoder-path": str(artifact.path), "data-root": str(mnist_root)})
        return handle_train(_train_message(artifact.sha256, failure_rate), context)

    refused = train(empty)
    assert refused.has_error() and "0 training example(s)" in refused.error.reason
    reply = train(small)
    assert not reply.has_error()
    assert reply.content.metric_records[RECORD.metrics]["num-examples"] == sizes[small]
    # Failure injection draws per (seed, round, partition): find one that fails at 0.5.
    from client.client_app import injected_failure

    failing = next(p for p in range(1000) if injected_failure(0.5, 0, 1, p) and sizes[p] >= 2)
    failed = train(failing, 0.5)
    assert failed.has_error() and "injected failure" in failed.error.reason


@pytest.mark.usefixtures("flower_task_identity")
def test_a_hanging_client_stays_silent_past_the_round_s_timeout(tmp_path):
    """The failure is drawn before the client reads its encoder or data: none is needed here."""
    import time

    from client.client_app import HANG_TIMEOUT_FACTOR, handle_train, injected_failure

    failing = next(p for p in range(100) if injected_failure(0.5, 0, 1, p))
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": failing, "num-partitions": 100,
                                   "encoder-path": str(tmp_path / "none"), "data-root": str(tmp_path)})
    message = _train_message("ab" * 32, 0.5, **{"client-failure-mode": "hang", "round-timeout-s": 0.4})
    started = time.monotonic()
    reply = handle_train(message, context)
    silent = time.monotonic() - started
    assert silent >= HANG_TIMEOUT_FACTOR * 0.4 and reply.has_error()
    assert "injected failure" in reply.error.reason and "silent for 0.6 s" in reply.error.reason
    started = time.monotonic()
    reply = handle_train(_train_message("ab" * 32, 0.5, **{"round-timeout-s": 0.4}), context)  # error mode
    assert time.monotonic() - started < 0.4 and "injected failure" in reply.error.reason


# ------------------------------------------------------------------ refused before anything starts
@pytest.mark.parametrize("options, words", [
    (["--clients", "10", "--clients-per-round", "11"], "more than the 10 clients"),
    (["--clients-per-round", "-1"], "clients-per-round"),
    (["--client-failure-rate", "1"], "below 1"),
    (["--client-failure-rate", "-0.1"], "client-failure-rate"),
    (["--clients", "20000"], "more than one machine"),
    (["--client-failure-mode", "crash"], "invalid choice"),
    (["--mean-latent-scale", "0"], "--mean-latent-scale: expected a positive"),
    (["--mean-latent-scale", "1.5"], "mean-latent-scale=1.5 is above 1"),
    (["--max-weight-vs-median", "0.5"], "max-weight-vs-median=0.5; use 0 (no cap) or a multiple >= 1"),
])
def test_bad_scale_options_exit_2_before_anything_starts(tmp_path, options, words):
    out = tmp_path / "run"
    proc = subprocess.run([HYBNN, "federate", *options, "--encoder", str(tmp_path / "none"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "hybnn federate: error:" in proc.stderr and words in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_threads_below_one_is_refused(tmp_path):
    proc = subprocess.run([HYBNN, "train", "--task", "4v5", "--threads", "0"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "--threads" in proc.stderr


# ------------------------------------------------------------------ a real simulation with sampling
@pytest.mark.slow
def test_fifty_clients_ten_per_round_with_failures_on_ray(tmp_path, mnist_root):
    encoder = fixed_encoder(tmp_path / "encoder")
    out = tmp_path / "run"
    cmd = [HYBNN, "federate", "--task", "4v5", "--clients", "50", "--clients-per-round", "10", "--rounds", "2",
           "--local-epochs", "1", "--centralized-epochs", "1", "--partition", "dirichlet", "--alpha", "0.3",
           "--client-failure-rate", "0.5", "--encoder", str(encoder), "--data-root", str(mnist_root),
           "--out", str(out), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "finished" and len(results["rounds"]) == 2
    samples = []
    injected = 0
    for r in results["rounds"]:
        assert len(r["sampled"]) == len(set(r["sampled"])) == 10
        assert sorted(r["replied"]) == sorted(r["sampled"])  # every sampled client answered in time
        counted = {c["node_id"] for c in r["clients"]}
        dropped = {d["node_id"] for d in r["dropped"]}
        assert counted | dropped == set(r["sampled"]) and not counted & dropped
        injected += sum("injected failure" in d["reason"] for d in r["dropped"])
        samples.append(set(r["sampled"]))
        # The simulation's node -> partition map, checked against what each client reports.
        partition_of = dict(zip(r["sampled"], r["sampled_partitions"]))
        assert all(partition_of[c["node_id"]] == c["reported"]["partition_id"] for c in r["clients"])
        assert r["sampled_partitions"] == sample_nodes(range(50), 10, 0, r["round"])  # the seed's partitions
    assert samples[0] != samples[1]        # a new sample each round
    assert injected >= 1                   # at p=0.5, 20 draws: all succeeding has odds 1e-6
    server = json.loads((out / "server.json").read_text())
    assert server["run_config"]["clients_per_round"] == 10


@pytest.mark.slow
def test_a_hanging_client_is_left_out_when_the_round_times_out_on_ray(tmp_path, mnist_root):
    """client-failure-mode hang through the real simulation: the round ends at its timeout without the
    silent client, which is recorded as dropped for want of a reply, and the run goes on to its end."""
    from client.client_app import HANG_TIMEOUT_FACTOR, injected_failure

    clients, per_round, rate, timeout = 4, 3, 0.3, 6.0

    def failing(seed: int, server_round: int) -> list[int]:
        return [p for p in sample_nodes(range(clients), per_round, seed, server_round)
                if injected_failure(rate, seed, server_round, p)]

    seed = next(s for s in range(1000) if not failing(s, 1) and len(failing(s, 2)) == 1)
    encoder = fixed_encoder(tmp_path / "encoder")
    out = tmp_path / "run"
    cmd = [HYBNN, "federate", "--task", "4v5", "--clients", str(clients), "--clients-per-round", str(per_round),
           "--rounds", "2", "--local-epochs", "1", "--centralized-epochs", "1", "--seed", str(seed),
           "--client-failure-rate", str(rate), "--client-failure-mode", "hang", "--round-timeout-s", str(timeout),
           "--encoder", str(encoder), "--data-root", str(mnist_root), "--out", str(out), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "finished" and [r["round"] for r in results["rounds"]] == [1, 2]
    first, second = results["rounds"]
    assert first["dropped"] == [] and len(first["clients"]) == per_round  # no failure drawn in round 1
    for r in results["rounds"]:  # the seed's partitions, whatever node ids Flower drew
        assert r["sampled_partitions"] == sample_nodes(range(clients), per_round, seed, r["round"])
    silent_node = second["sampled"][second["sampled_partitions"].index(failing(seed, 2)[0])]
    assert silent_node not in second["replied"]
    assert second["dropped"] == [{"node_id": silent_node,
                                  "reason": "no reply before the round's timeout (round-timeout-s)"}]
    assert sorted(c["reported"]["partition_id"] for c in second["clients"]) == sorted(
        set(second["sampled_partitions"]) - set(failing(seed, 2)))
    # Round 2 waited for its timeout, not for the silent client (silent 1.5 x as long).
    took = second["seconds"] - first["seconds"]
    assert timeout <= took < HANG_TIMEOUT_FACTOR * timeout, took


def test_a_simulation_that_would_not_fit_in_memory_is_refused(monkeypatch):
    import common.resources
    from common.errors import HyBNNError
    from simulation.federate import FederateConfig, check_config, check_simulation_memory

    config = FederateConfig(clients=1000, clients_per_round=100)
    check_config(config)
    monkeypatch.setattr(common.resources, "available_memory_bytes", lambda: 512 * 1024 * 1024)
    with pytest.raises(HyBNNError, match="1000 clients.*only 512.0 MiB"):
        check_simulation_memory(config)
