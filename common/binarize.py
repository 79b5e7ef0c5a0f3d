"""The binarization convention, in one place.

* ``sign(0) = +1`` (Larq, Brevitas, FINN and BinaryNet agree; ``torch.sign(0) = 0``
  does not).
* Straight-through estimator: the gradient of ``sign`` is ``1{|x| <= 1}``.
* Latent real-valued weights are clipped to ``[-1, 1]`` after every optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn


def sign(x: torch.Tensor) -> torch.Tensor:
    """Forward: ``+1`` where ``x >= 0``, else ``-1``, in ``x``'s dtype. No gradient."""
    # The comparison writes 0/1 straight into x's dtype: converting a bool tensor with
    # .to() took five times as long on the CPU, and the BNN's training step signs
    # its hidden units twice (forward and the gradient mask below).
    out = torch.empty_like(x, requires_grad=False)
    torch.ge(x.detach(), 0, out=out)
    return out.mul_(2).sub_(1)


def straight_through_mask(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``1{|x| <= 1}`` in ``dtype``."""
    mask = torch.empty(x.shape, dtype=dtype, device=x.device)
    torch.le(x.abs(), 1, out=mask)
    return mask


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return straight_through_mask(x, grad_output.dtype).mul_(grad_output)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Forward: :func:`sign`. Backward: ``grad * 1{|x| <= 1}`` (straight-through)."""
    return _SignSTE.apply(x)


class LatentClipMixin:
    """Marks a module whose ``weight`` is a latent weight of a binary layer."""


def latent_weights(model: nn.Module) -> list[torch.Tensor]:
    """The latent weights of ``model``'s binary layers."""
    return [module.weight for module in model.modules() if isinstance(module, LatentClipMixin)]  # type: ignore[attr-defined]


def clip_latent_weights_(model: nn.Module | list[torch.Tensor]) -> None:
    """Clip every binary layer's latent weight to ``[-1, 1]``, in place.

    A training loop passes the list of :func:`latent_weights` once found, so that each
    step does not walk the module tree again."""
    weights = latent_weights(model) if isinstance(model, nn.Module) else model
    with torch.no_grad():
        for weight in weights:
            weight.clamp_(-1.0, 1.0)
