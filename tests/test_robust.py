"""common.federated.robust without Flower: weight caps, the client metric schema, batch-norm aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from common.federated import robust
from common.errors import HyBNNError
from common.federated.wire import METRIC


def test_weight_cap_uses_the_lower_median():
    assert robust.weight_cap([100, 100, 100, 100, 10**18]) == 125
    assert robust.weight_cap([100, 10**18]) == 125  # two clients: the smaller claim sets the cap
    assert robust.weight_cap([100, 200, 300], max_weight_vs_median=0) is None
    assert robust.weight_cap([100, 200, 300], max_weight_vs_median=0, max_num_examples=150) == 150
    assert robust.weight_cap([100, 200, 300], max_weight_vs_median=2.0, max_num_examples=1000) == 400
    assert robust.capped_weights([100, 130, 10**18, 90]) == [100, 125, 125, 90]


def test_a_minority_stays_below_half_of_the_weight():
    weights = robust.capped_weights([2000, 2000, 2000, 10**18, 10**18])
    assert sum(weights[3:]) / sum(weights) == pytest.approx(2.5 / 5.5)


def test_metric_schema():
    checked, unknown = robust.check_client_metrics(
        {METRIC.num_examples: 10, METRIC.codec_version: 1, METRIC.train_acc: 1, "node-id": 3, "uplink-bytes": 1.0})
    assert checked == {METRIC.num_examples: 10, METRIC.codec_version: 1, METRIC.train_acc: 1.0}
    assert isinstance(checked[METRIC.train_acc], float)
    assert unknown == ["node-id", "uplink-bytes"]
    for bad in ({METRIC.train_acc: 1.5}, {METRIC.train_loss: [0.1]}, {METRIC.num_examples: 10.0},
                {METRIC.num_examples: 0}, {METRIC.train_loss: float("nan")}, {METRIC.train_seconds: -1.0}):
        with pytest.raises(robust.ReplyError):
            robust.check_client_metrics({METRIC.num_examples: 10, METRIC.codec_version: 1, **bad})
    with pytest.raises(robust.ReplyError, match="lacks"):
        robust.check_client_metrics({METRIC.num_examples: 10})


def test_averaged_metrics_weigh_only_the_clients_that_report():
    metrics = [{METRIC.train_acc: 1.0, METRIC.train_loss: 0.5}, {METRIC.train_acc: 0.0}]
    assert robust.averaged_metrics(metrics, [3, 1]) == {METRIC.train_acc: 0.75, METRIC.train_loss: 0.5}


def test_bn_aggregation():
    bns = [np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([1e4, -1e4])]
    np.testing.assert_allclose(robust.aggregate_bn(bns, [1, 1, 1], "median"), [3.0, 2.0])
    np.testing.assert_allclose(robust.aggregate_bn(bns, [1, 1, 2], "mean"), [(4 + 2e4) / 4, (6 - 2e4) / 4])


def test_bn_range():
    var = np.array([False, True])
    robust.check_bn_range(np.array([-65504.0, 1e-3]), var, "float16")
    with pytest.raises(robust.ReplyError, match="float16"):
        robust.check_bn_range(np.array([70000.0, 1.0]), var, "float16")
    robust.check_bn_range(np.array([70000.0, 1.0]), var, "float32")
    with pytest.raises(robust.ReplyError, match="variance"):
        robust.check_bn_range(np.array([1.0, 0.0]), var, "float32")


def test_settings_are_checked():
    from server.server_app import ServerSettings

    for bad in ({"max-weight-vs-median": 0.5}, {"max-num-examples": -1}, {"bn-aggregation": "trimmed"}):
        with pytest.raises(HyBNNError):
            ServerSettings.from_run_config(bad)
    settings = ServerSettings.from_run_config({"max-weight-vs-median": 0, "max-num-examples": 5000})
    assert (settings.max_weight_vs_median, settings.max_num_examples, settings.bn_aggregation) == (0, 5000, "median")
