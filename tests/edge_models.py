"""Small BNNs for the deployment tests: trained briefly, then given hard batch norms.

Random codes put every popcount near ``n / 2``, where no threshold sits; the probe
codes built here reach every popcount ``0..n`` of first-layer units, so thresholds at
the extremes are exercised too.
"""

from __future__ import annotations

import numpy as np
import torch

from common.bnn.model import BNN, BNNConfig, codes_to_inputs
from common.packing import packed_length, unpack_bits
from common.bnn.training import TrainConfig, fit, predict


def random_codes(rng: np.random.Generator, n: int, in_bits: int) -> np.ndarray:
    codes = rng.integers(0, 256, (n, packed_length(in_bits)), dtype=np.uint8)
    if in_bits % 8:
        codes[:, -1] &= np.uint8((0xFF << (8 - in_bits % 8)) & 0xFF)
    return codes


def trained_bnn(config: BNNConfig, seed: int = 0, samples: int = 1024) -> BNN:
    """A BNN after one real epoch on a learnable synthetic rule (running stats are real)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, samples, config.in_bits)
    x = codes_to_inputs(codes, config.in_bits)
    w = torch.from_numpy(rng.standard_normal((config.in_bits, config.num_classes)).astype(np.float32))
    y = (x.float() @ w).argmax(1)
    model = BNN(config)
    torch.manual_seed(seed)
    fit(model, x, y, TrainConfig(epochs=1, batch_size=128, seed=seed), progress=False)
    return model


def harden(model: BNN, seed: int = 0) -> BNN:
    """Give the batch norms negative, zero and tiny scales and shifted statistics.

    Hidden batch norms get random statistics around the pre-activation range; the output
    batch norm is re-centred on the hardened network's real output statistics (with
    random signed scales), so that predictions still spread over several classes.
    """
    g = torch.Generator().manual_seed(seed)
    widths = (model.config.in_bits, *model.config.hidden)
    with torch.no_grad():
        for bn, n in zip(model.hidden_bn, widths):
            c = bn.num_features
            spread = n**0.5
            bn.weight.copy_(torch.randn(c, generator=g) * 2)
            bn.bias.copy_(torch.randn(c, generator=g))
            bn.running_mean.copy_(torch.randn(c, generator=g) * spread)
            bn.running_var.copy_(torch.rand(c, generator=g) * spread**2 + 1e-3)
            if c >= 4:
                bn.weight[0] = 0.0  # constant unit: sign(beta)
                bn.weight[1] = -abs(float(bn.weight[1])) - 0.5  # flipped comparison
                bn.weight[2] = 1e-30  # so small that the output is constant in float32
                bn.bias[2] = -1e-3
        x = codes_to_inputs(random_codes(np.random.default_rng(seed), 2048, model.config.in_bits), model.config.in_bits)
        model.eval()
        for linear, bn in zip(model.hidden, model.hidden_bn):
            x = torch.where(bn(linear(x)) >= 0, 1.0, -1.0)
        pre = model.out(x)
        out = model.out_bn
        c = out.num_features
        out.running_mean.copy_(pre.mean(0))
        out.running_var.copy_(pre.var(0) + 1e-3)
        out.weight.copy_((torch.rand(c, generator=g) + 0.5) * torch.where(torch.rand(c, generator=g) < 0.3, -1.0, 1.0))
        out.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model


def probe_codes(model: BNN, rng: np.random.Generator, per_unit: int = 4) -> np.ndarray:
    """Codes whose agreement with first-layer unit ``j`` is every value ``0..n``."""
    n = model.config.in_bits
    first = model.binary_layers()[0]
    rows = (first.weight.detach().numpy() >= 0)  # weight bits
    codes = []
    for j in range(rows.shape[0]):
        for _ in range(per_unit):
            for k in range(0, n + 1, max(1, n // 25)):
                bits = rows[j].copy()
                flip = rng.choice(n, size=k, replace=False)
                bits[flip] = ~bits[flip]
                codes.append(bits)
    return np.packbits(np.array(codes), axis=1, bitorder="big")


def torch_predictions(model: BNN, codes: np.ndarray) -> np.ndarray:
    return predict(model, codes_to_inputs(codes, model.config.in_bits)).numpy()


def codes_to_bits(codes: np.ndarray, in_bits: int) -> np.ndarray:
    return unpack_bits(codes, in_bits)
