"""An unsupervised rotation of the latent logits before their sign, folded into the encoder.

The code is ``sign(logit)``: one bit of each of the 200 real-valued logits. A binary VAE
keeps many logits near 0, so their signs carry little of what the logits do. Iterative
quantization (ITQ, Gong & Lazebnik 2011) finds the orthogonal rotation ``R`` of the
centred, per-logit standardised logits ``V`` that minimises the quantization error
``||sign(V R) - V R||``: the bits follow the directions in which the training images'
logits spread, rather than the latent axes.

It needs no labels: it is fitted once, after pretraining, on the logits of the same
training images the VAE saw, and folded into the encoder's last (fully connected)
layer, so a rotated encoder is an ordinary encoder artifact: same architecture, same
200-bit code, same inference path.
"""

from __future__ import annotations

import torch

from common.errors import HyBNNError

ROTATIONS = ("none", "itq")
ITQ_ITERATIONS = 50


def itq_rotation(v: torch.Tensor, iterations: int = ITQ_ITERATIONS, seed: int = 0) -> torch.Tensor:
    """The orthogonal ``(k, k)`` rotation ``R`` that ITQ fits to the centred data ``v`` ``(N, k)``.

    Alternates ``B = sign(v R)`` and the orthogonal Procrustes solution ``R = U W^T`` of
    ``svd(v^T B) = U S W^T``; starts from a random rotation drawn with ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(v.shape[1], v.shape[1], generator=generator, dtype=v.dtype))
    for _ in range(iterations):
        projected = v @ rotation
        bits = torch.where(projected >= 0, 1.0, -1.0).to(v.dtype)
        u, _, wt = torch.linalg.svd(v.T @ bits)
        rotation = u @ wt
    return rotation


def fit_code_rotation(logits: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(matrix (k, k), mean (k,))`` such that the rotated logits are ``(logits - mean) @ matrix``.

    ``matrix`` = diag(1 / std) @ R: each logit is standardised over the training images
    (a logit that never varies is left unscaled), then rotated by ITQ. Fitted in float64.
    """
    if logits.ndim != 2 or len(logits) < 2:
        raise HyBNNError(f"A code rotation is fitted on (N >= 2, bits) logits; got shape {tuple(logits.shape)}.")
    x = logits.detach().double()
    mean = x.mean(0)
    std = x.std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    scale = torch.diag(1.0 / std)
    matrix = scale @ itq_rotation((x - mean) @ scale, seed=seed)
    return matrix, mean


@torch.no_grad()
def fold_code_rotation(fc: torch.nn.Linear, matrix: torch.Tensor, mean: torch.Tensor) -> None:
    """Make ``fc`` output ``(fc(x) - mean) @ matrix`` (in place): ``W' = M^T W``, ``b' = (b - mean) @ M``."""
    if fc.bias is None or matrix.shape != (fc.out_features, fc.out_features):
        raise HyBNNError(f"Cannot fold a {tuple(matrix.shape)} rotation into a {fc.out_features}-output layer.")
    weight = matrix.T @ fc.weight.double()
    bias = (fc.bias.double() - mean) @ matrix
    fc.weight.copy_(weight.to(fc.weight.dtype))
    fc.bias.copy_(bias.to(fc.bias.dtype))
