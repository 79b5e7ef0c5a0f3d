"""The task-specific binary neural network (training form).

The paper's BNN: 200 input bits -> 128 binary units (batch norm, sign) -> 2 binary
outputs (batch norm); ten-class tasks get 512 hidden units (:data:`MULTICLASS_HIDDEN`).
Its input is already binary (the encoder's code as +-1), so it needs no input
binarization. Weights are binarized with :func:`common.binarize.sign_ste`;
the real-valued latent weights are what the optimizer updates, clipped to [-1, 1].

The deployment form (packed weights, integer thresholds) lives in ``common/edge/deploy.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from common.binarize import LatentClipMixin, sign, sign_ste, straight_through_mask
from common.bnn.product import uses_int8
from common.errors import HyBNNError
from common.resources import check_fits_in_memory


PAPER_HIDDEN: tuple[int, ...] = (128,)
"""The paper's hidden layer, for its two-class tasks."""
MULTICLASS_HIDDEN: tuple[int, ...] = (512,)
"""The hidden layer for tasks with more than two classes (``all10``). With binary
output weights every hidden unit votes +-1 for every class, and 128 votes shared by
ten classes hold ``all10`` to about 95%; 512 reach about 97% (docs/reproduce.md)."""


TRAINING_BYTES_PER_WEIGHT = 20
"""float32 latent weight, its binarized copy, its gradient and Adam's two moments."""


def default_hidden(num_classes: int) -> tuple[int, ...]:
    """The hidden widths a task with ``num_classes`` classes gets unless told otherwise."""
    return PAPER_HIDDEN if num_classes <= 2 else MULTICLASS_HIDDEN


@dataclass(frozen=True)
class BNNConfig:
    in_bits: int = 200
    hidden: tuple[int, ...] = (128,)
    num_classes: int = 2

    def __post_init__(self) -> None:
        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not whole(self.in_bits) or self.in_bits < 1:
            raise HyBNNError(f"A BNN needs at least one input bit, got in_bits={self.in_bits!r}.")
        if not whole(self.num_classes) or self.num_classes < 2:
            raise HyBNNError(f"A BNN needs at least two classes, got num_classes={self.num_classes!r}.")
        if not isinstance(self.hidden, tuple) or not all(whole(h) and h >= 1 for h in self.hidden):
            raise HyBNNError(
                f"The BNN's hidden widths must be positive whole numbers (--hidden 128 or 256,128), "
                f"got {self.hidden!r}."
            )

    def num_weights(self) -> int:
        """Latent weights plus batch-norm parameters and statistics (4 per unit)."""
        widths = (self.in_bits, *self.hidden, self.num_classes)
        return sum(a * b for a, b in zip(widths[:-1], widths[1:])) + 4 * sum(widths[1:])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_task(cls, in_bits: int, num_classes: int) -> "BNNConfig":
        """The default shape for a task: :func:`default_hidden` of its class count."""
        return cls(in_bits=in_bits, hidden=default_hidden(num_classes), num_classes=num_classes)

    @classmethod
    def from_dict(cls, d: dict) -> "BNNConfig":
        if not isinstance(d["hidden"], (list, tuple)):
            raise TypeError(f"hidden must be a list of widths, got {d['hidden']!r}")
        return cls(in_bits=int(d["in_bits"]), hidden=tuple(int(h) for h in d["hidden"]),
                   num_classes=int(d["num_classes"]))


def check_trainable(config: BNNConfig) -> None:
    """Refuse a BNN whose weights and training state would not fit in the memory available."""
    check_fits_in_memory(
        config.num_weights() * TRAINING_BYTES_PER_WEIGHT,
        f"A BNN of {config.in_bits} inputs, hidden widths {','.join(map(str, config.hidden))} and "
        f"{config.num_classes} outputs ({config.num_weights():,} parameters, with their gradients "
        "and optimizer state)",
        "Pass smaller --hidden widths (the paper's is 128; all10 uses 512).",
    )


class _IntegerBinaryLinear(torch.autograd.Function):
    """``x @ sign(weight).T`` for an int8 ``x``, multiplied in integers.

    The product of small integers and +-1 is an integer, so the int8 product
    (``torch._int_mm``, int32 sums) gives exactly what the float product gives. It is
    the faster one only where torch runs ``_int_mm`` on 8-bit dot-product instructions,
    so :mod:`common.bnn.product` measures which to use. The input gets no gradient (it
    is data); the weight's gradient is the float ``grad.T @ x`` times the
    straight-through mask, as :func:`sign_ste` gives it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        signs = sign(weight).to(torch.int8)
        return torch._int_mm(x, signs.t().contiguous()).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_weight = grad_output.t().mm(x.to(grad_output.dtype))
        return None, grad_weight.mul_(straight_through_mask(weight, grad_output.dtype))


class BinaryLinear(LatentClipMixin, nn.Linear):
    """A linear layer without bias whose weights are ``sign(latent weight)``.

    An int8 input (the encoder's codes, :func:`codes_to_inputs`) is multiplied in
    integers (:class:`_IntegerBinaryLinear`) where :mod:`common.bnn.product` measured
    that to be faster, else in float32; both are exact, so the result is the same. A
    float input takes the float product.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        nn.init.uniform_(self.weight, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.int8:
            if x.dim() == 2 and x.device.type == "cpu" and uses_int8():
                return _IntegerBinaryLinear.apply(x, self.weight)
            x = x.to(self.weight.dtype)
        return F.linear(x, sign_ste(self.weight))


class BNN(nn.Module):
    """``[BinaryLinear -> BatchNorm1d -> sign]`` per hidden layer, then ``BinaryLinear -> BatchNorm1d``.

    Input: ``(N, in_bits)`` of +-1. Output: ``(N, num_classes)`` logits.
    """

    def __init__(self, config: BNNConfig = BNNConfig()) -> None:
        super().__init__()
        check_trainable(config)
        self.config = config
        widths = (config.in_bits, *config.hidden)
        self.hidden = nn.ModuleList(BinaryLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.hidden_bn = nn.ModuleList(nn.BatchNorm1d(b) for b in config.hidden)
        self.out = BinaryLinear(widths[-1], config.num_classes)
        self.out_bn = nn.BatchNorm1d(config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear, bn in zip(self.hidden, self.hidden_bn):
            x = sign_ste(bn(linear(x)))
        return self.out_bn(self.out(x))

    def binary_layers(self) -> list[BinaryLinear]:
        """The binary layers, input to output."""
        return [*self.hidden, self.out]


def codes_to_inputs(packed_codes, in_bits: int = 200) -> torch.Tensor:
    """Packed codes ``uint8 (N, ceil(in_bits/8))`` -> int8 +-1 tensor ``(N, in_bits)``.

    int8, not float: a quarter of the memory, and the BNN's first layer multiplies
    int8 inputs in integers (:class:`BinaryLinear`)."""
    from common.packing import unpack_signs

    return torch.from_numpy(unpack_signs(packed_codes, in_bits, dtype="int8"))
