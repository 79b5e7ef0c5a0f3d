"""The training loop's mechanics: the dropout mask, clipping, reproducibility."""

from __future__ import annotations

import platform

import pytest
import torch

from common.binarize import clip_latent_weights_, latent_weights
from common.bnn.model import BNN, BNNConfig
from common.errors import HyBNNError
from common.resources import reuse_freed_memory
from common.bnn.training import DROPOUT_RESOLUTION, TrainConfig, fit, keep_mask


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.9])
def test_keep_mask_drops_at_the_asked_rate(p):
    mask = keep_mask((500, 400), p, torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (500, 400)
    assert abs(float((~mask).float().mean()) - p) < 0.005  # 200,000 draws: sd <= 0.0011


def test_keep_mask_in_a_float_dtype_is_the_same_mask_as_zeros_and_ones():
    as_bool = keep_mask((64, 200), 0.2, torch.Generator().manual_seed(5))
    as_float = keep_mask((64, 200), 0.2, torch.Generator().manual_seed(5), dtype=torch.float32)
    assert as_float.dtype == torch.float32 and torch.equal(as_float, as_bool.float())


def test_keep_mask_is_seeded_and_differs_between_draws():
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    first = keep_mask((64, 200), 0.2, a)
    assert torch.equal(first, keep_mask((64, 200), 0.2, b))
    assert not torch.equal(first, keep_mask((64, 200), 0.2, a))


def test_keep_mask_never_drops_everything_below_one():
    mask = keep_mask((1000, 100), 1 - 1e-9, torch.Generator().manual_seed(0))
    assert 0 < int(mask.sum()) < 1000  # rounded to 255/256: one in 256 kept
    assert DROPOUT_RESOLUTION == 2**8


def test_keep_mask_drops_at_the_rounded_rate():
    mask = keep_mask((1000, 200), 0.2, torch.Generator().manual_seed(0), dtype=torch.int8)
    assert mask.dtype == torch.int8
    assert abs(1 - float(mask.float().mean()) - 51 / 256) < 0.003  # 0.2 rounds to 51/256


def test_a_dropout_below_the_masks_step_is_refused():
    with pytest.raises(HyBNNError, match="drop nothing"):
        TrainConfig(input_dropout=0.001)
    assert TrainConfig(input_dropout=1 / 256).input_dropout == 1 / 256


def test_clip_takes_a_model_or_its_latent_weights():
    model = BNN(BNNConfig(in_bits=16, hidden=(8,)))
    weights = latent_weights(model)
    assert [w.shape for w in weights] == [(8, 16), (2, 8)]
    with torch.no_grad():
        for w in weights:
            w.mul_(5)
    clip_latent_weights_(weights)
    assert all(float(w.abs().max()) == 1.0 for w in weights)


def test_fit_is_reproducible_and_keeps_latent_weights_clipped():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (600, 32), generator=g).float() * 2 - 1
    y = (x[:, 0] > 0).long()
    config = TrainConfig(epochs=3, batch_size=128, lr=0.5, input_dropout=0.2, seed=7)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = BNN(BNNConfig(in_bits=32, hidden=(16,)))
        runs.append((fit(model, x, y, config, progress=False), model))
    (first, model_a), (second, model_b) = runs
    assert first.history == second.history
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert all(float(w.abs().max()) <= 1.0 for w in latent_weights(model_a))  # lr 0.5 pushes them past 1
    assert [h["epoch"] for h in first.history] == [1, 2, 3]
    assert all(0.0 <= h["acc"] <= 1.0 and h["loss"] > 0 for h in first.history)


def test_fit_reports_wall_and_cpu_time():
    x = torch.randint(0, 2, (256, 16)).float() * 2 - 1
    y = (x[:, 0] > 0).long()
    result = fit(BNN(BNNConfig(in_bits=16, hidden=(8,))), x, y, TrainConfig(epochs=2, batch_size=64),
                 progress=False)
    assert result.seconds > 0 and result.cpu_seconds > 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_and_results_do_not_change():
    """reuse_freed_memory applies on glibc, and a training run gives the same model after it."""
    def train() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = BNN(BNNConfig(in_bits=16, hidden=(8,)))
        x = torch.randint(0, 2, (64, 16), generator=torch.Generator().manual_seed(1)).to(torch.int8) * 2 - 1
        fit(model, x, (x[:, 0] > 0).long(), TrainConfig(epochs=3, batch_size=16), progress=False)
        return [p.detach().clone() for p in model.parameters()]

    before = train()
    assert reuse_freed_memory()
    assert all(torch.equal(a, b) for a, b in zip(before, train()))
