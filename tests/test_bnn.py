"""The BNN's shape, that it learns, and its save/load with integrity checks."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from common.bnn.model import BNN, BNNConfig, codes_to_inputs, default_hidden
from common.bnn.store import load_bnn, save_bnn
from common.errors import HyBNNError
from common.packing import pack_signs
from common.bnn.training import TrainConfig, evaluate, fit


def test_paper_shape_and_configurable_depth():
    model = BNN()
    assert [tuple(l.weight.shape) for l in model.binary_layers()] == [(128, 200), (2, 128)]
    assert model(torch.ones(4, 200)).shape == (4, 2)
    deep = BNN(BNNConfig(in_bits=200, hidden=(256, 64), num_classes=10))
    assert [tuple(l.weight.shape) for l in deep.binary_layers()] == [(256, 200), (64, 256), (10, 64)]
    assert deep(torch.ones(3, 200)).shape == (3, 10)


def test_task_default_shapes():
    """Pair tasks get the paper's 128 hidden units; ten classes get 512 (docs/reproduce.md)."""
    from common.data.tasks import TASKS, get_task

    shapes = {name: BNNConfig.for_task(200, get_task(name).num_classes) for name in TASKS}
    for name in ("0v1", "2v3", "4v5", "6v7", "8v9"):
        assert shapes[name] == BNNConfig(in_bits=200, hidden=(128,), num_classes=2)
    assert shapes["all10"] == BNNConfig(in_bits=200, hidden=(512,), num_classes=10)
    assert default_hidden(2) == (128,) and default_hidden(10) == (512,)


def test_hidden_activations_are_binary():
    model = BNN().eval()
    x = torch.from_numpy(np.random.default_rng(0).choice([-1.0, 1.0], (16, 200)).astype(np.float32))
    hidden = torch.sign(model.hidden_bn[0](model.hidden[0](x)))
    assert set(torch.unique(model.hidden[0](x) - model.hidden[0](x)).tolist()) == {0.0}
    # pre-activations of a binary layer on +-1 input are integers of n's parity
    pre = model.hidden[0](x)
    assert torch.equal(pre, pre.round()) and bool(((pre + 200) % 2 == 0).all())
    assert hidden.abs().max() <= 1


def synthetic_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label = whether bits 0..99 hold more +1s than bits 100..199.

    One binary unit with weights (+1 x 100, -1 x 100) solves it exactly, so a BNN can
    learn it; a constant or random model sits at chance.
    """
    rng = np.random.default_rng(seed)
    codes = rng.choice([-1.0, 1.0], size=(n, 200)).astype(np.float32)
    labels = (codes[:, :100].sum(1) > codes[:, 100:].sum(1)).astype(np.int64)
    return torch.from_numpy(codes), torch.from_numpy(labels)


def test_bnn_learns_a_synthetic_binary_task():
    x, y = synthetic_task(2000, seed=0)
    x_test, y_test = synthetic_task(1000, seed=1)
    model = BNN()
    before = evaluate(model, x_test, y_test)["acc"]
    result = fit(model, x, y, TrainConfig(epochs=10, seed=0), progress=False)
    after = evaluate(model, x_test, y_test)["acc"]
    assert len(result.history) == 10
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert after > 0.75 and after > before + 0.15  # chance is 0.5
    for layer in model.binary_layers():
        assert layer.weight.abs().max() <= 1.0


def test_packed_codes_become_plus_minus_one_inputs():
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(4, 200))
    inputs = codes_to_inputs(pack_signs(signs))
    assert inputs.dtype == torch.int8 and inputs.shape == (4, 200)
    np.testing.assert_array_equal(inputs.numpy(), signs)


@pytest.mark.parametrize("batch, in_bits", [(0, 200), (1, 13), (3, 200), (17, 9), (2048, 200)])
def test_int8_inputs_give_the_float_product_and_gradients(batch, in_bits):
    """The first layer multiplies int8 codes in integers: outputs and every gradient equal
    the float path's, for odd shapes, an empty batch and input dropout's zeros."""
    generator = torch.Generator().manual_seed(batch)
    x = (torch.randint(0, 2, (batch, in_bits), generator=generator) * 2 - 1)
    x *= torch.rand(batch, in_bits, generator=generator) > 0.2
    y = torch.randint(0, 3, (batch,), generator=generator)
    torch.manual_seed(0)
    integer = BNN(BNNConfig(in_bits=in_bits, hidden=(16,), num_classes=3))
    floating = copy.deepcopy(integer)
    integer.eval(), floating.eval()
    assert torch.equal(integer(x.to(torch.int8)), floating(x.float()))
    if batch >= 2:
        integer.train(), floating.train()
        F.cross_entropy(integer(x.to(torch.int8)), y).backward()
        F.cross_entropy(floating(x.float()), y).backward()
        for a, b in zip(integer.parameters(), floating.parameters()):
            assert torch.equal(a.grad, b.grad)


def test_save_load_round_trip(tmp_path):
    model = BNN(BNNConfig(hidden=(32,), num_classes=10))
    fit(model, *synthetic_task(200, 0), TrainConfig(epochs=1), progress=False)
    save_bnn(model, tmp_path / "m", meta={"task": "all10"})
    loaded, sidecar = load_bnn(tmp_path / "m")
    assert sidecar["meta"]["task"] == "all10" and loaded.config == model.config
    x = torch.ones(5, 200)
    assert torch.equal(loaded(x), model.eval()(x))


def test_corrupt_or_missing_model_is_refused(tmp_path):
    with pytest.raises(HyBNNError, match="is not a saved BNN"):
        load_bnn(tmp_path)
    save_bnn(BNN(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(HyBNNError, match="corrupt"):
        load_bnn(tmp_path)
    save_bnn(BNN(), tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["config"]["hidden"] = [64]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(HyBNNError, match="does not hold a BNN"):
        load_bnn(tmp_path)


def test_train_hybnn_takes_the_task_shape_unless_told(mnist_encoder):
    from dataclasses import replace

    from common.bnn.pipeline import HYBNN_TRAIN_CONFIG, train_hybnn
    from common.data.tasks import get_task

    artifact, data_root = mnist_encoder
    one_epoch = replace(HYBNN_TRAIN_CONFIG, epochs=1)
    all10 = train_hybnn(artifact, get_task("all10"), data_root, one_epoch, progress=False)
    assert all10.model.config == BNNConfig(in_bits=200, hidden=(512,), num_classes=10)
    narrow = train_hybnn(artifact, get_task("0v1"), data_root, one_epoch, hidden=(16,), progress=False)
    assert narrow.model.config == BNNConfig(in_bits=200, hidden=(16,), num_classes=2)
    assert 0.0 <= narrow.test_acc <= 1.0 and len(narrow.train.history) == 1
    # the seed fixes the initial weights as well as the batch order
    again = train_hybnn(artifact, get_task("0v1"), data_root, one_epoch, hidden=(16,), progress=False)
    assert torch.equal(again.model.hidden[0].weight, narrow.model.hidden[0].weight)
    other = train_hybnn(artifact, get_task("0v1"), data_root, replace(one_epoch, seed=1), hidden=(16,),
                        progress=False)
    assert not torch.equal(other.model.hidden[0].weight, narrow.model.hidden[0].weight)


def test_input_dropout_zeroes_training_inputs_only():
    seen: list[torch.Tensor] = []

    class Spy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(64, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                seen.append(x.detach().clone())
            return self.linear(x)

    x = torch.ones(512, 64)
    y = torch.randint(0, 2, (512,))
    model = Spy()
    fit(model, x, y, TrainConfig(epochs=2, batch_size=128, input_dropout=0.25), progress=False)
    zeroed = float(torch.cat(seen).eq(0).float().mean())
    assert 0.2 < zeroed < 0.3
    assert set(torch.cat(seen).unique().tolist()) == {0.0, 1.0}  # zeroed, never rescaled
    seen.clear()
    fit(Spy(), x, y, TrainConfig(epochs=1, batch_size=128), progress=False)
    assert torch.cat(seen).eq(1).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, float("nan"), True])
def test_input_dropout_outside_zero_to_one_is_refused(bad):
    with pytest.raises(HyBNNError, match="input_dropout"):
        TrainConfig(input_dropout=bad)


def test_hybnn_recipe_drops_input_bits_in_training_only():
    """The measured recipe (docs/datasets.md): 0.2 of the input bits zeroed per training batch."""
    from common.bnn.pipeline import HYBNN_TRAIN_CONFIG

    assert HYBNN_TRAIN_CONFIG.input_dropout == 0.2
