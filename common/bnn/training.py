"""One supervised training loop for every model here (BNN, binary CNNs, float CNN).

Data live in memory as tensors; each epoch draws a fresh permutation from a seeded
generator, so runs are reproducible. After every optimizer step the latent weights
of binary layers are clipped to [-1, 1] (common/binarize.py).

The HyBNN BNN takes a few milliseconds a step, so the loop's own costs count: batches
are gathered with ``index_select`` (indexing with a tensor of indices, ``x[idx]``, was
several times slower on these 200-column rows); the input-dropout mask comes from 8
random bits per input (:func:`keep_mask`), an eighth of the random draws of one
``torch.rand`` float per input; the BNN's int8 codes are multiplied in integers
(``common.bnn.model.BinaryLinear``); Adam runs fused; the epoch's loss and accuracy are
summed as tensors and read once an epoch. benchmarks/bnn_recipe.py times the BNN
against bcnn-centered, side by side.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from common.binarize import clip_latent_weights_, latent_weights
from common.bnn.limits import DROPOUT_RESOLUTION, MAX_EPOCHS, MAX_LR, MIN_BATCH_SIZE, dropout_too_fine
from common.errors import HyBNNError
from common.federated.settings import setting

log = logging.getLogger(__name__)

SEED = setting("seed")
"""The one check of a seed, the settings schema's (``0 <= seed < 2**32``, common/bnn/limits.py)."""


def _show(value) -> str:
    return f"{value:.3g}" if isinstance(value, numbers.Real) and abs(value) >= 1e7 else repr(value)


def check_training_options(*, epochs, batch_size, lr, seed, final_lr_fraction=0.0,
                           weight_decay=0.0) -> None:
    """Refuse impossible optimisation settings with a :class:`HyBNNError` that says the limits.

    Shared by every training config (BNN, baselines, VAE), so the library refuses what the
    command line refuses.
    """
    def is_int(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if not is_int(epochs) or not 1 <= epochs <= MAX_EPOCHS:
        raise HyBNNError(
            f"epochs (--epochs) is {_show(epochs)}; it must be a whole number from 1 to {MAX_EPOCHS} "
            "(the BNN recipe takes 80, the VAE 20). Pass a smaller --epochs."
        )
    if not is_int(batch_size) or batch_size < MIN_BATCH_SIZE:
        raise HyBNNError(
            f"batch size (--batch-size) is {_show(batch_size)}; it must be a whole number of at least "
            f"{MIN_BATCH_SIZE}, because batch norm needs two samples per batch to train. "
            "Pass --batch-size 2 or more."
        )
    if not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and 0 < lr <= MAX_LR):
        raise HyBNNError(f"learning rate (--lr) is {_show(lr)}; it must be a positive number of at most "
                         f"{MAX_LR:g}.")
    if not isinstance(final_lr_fraction, numbers.Real) or not 0 <= final_lr_fraction <= 1:
        raise HyBNNError(f"final_lr_fraction is {_show(final_lr_fraction)}; it must be from 0 to 1.")
    if not isinstance(weight_decay, numbers.Real) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise HyBNNError(f"weight_decay is {_show(weight_decay)}; it must be a finite number >= 0.")
    if not is_int(seed):
        raise HyBNNError(f"seed (--seed) is {_show(seed)}; it must be {SEED.range_text()}.")
    SEED.check(seed, "Option --seed:")


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-2
    """Adam's initial learning rate; it decays to ``lr * final_lr_fraction`` (cosine)."""
    final_lr_fraction: float = 0.01
    weight_decay: float = 0.0
    seed: int = 0
    input_dropout: float = 0.0
    """During training, each input value of a batch is zeroed with this probability (no
    rescaling; in steps of 1/256, :func:`keep_mask`); evaluation sees every input. A
    regulariser for models on binary codes."""

    def __post_init__(self) -> None:
        check_training_options(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                               seed=self.seed, final_lr_fraction=self.final_lr_fraction,
                               weight_decay=self.weight_decay)
        p = self.input_dropout
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0 <= p < 1:
            raise HyBNNError(f"input_dropout is {_show(p)}; it must be a number from 0 up to "
                             "(not including) 1.")
        too_fine = dropout_too_fine(p)
        if too_fine:
            raise HyBNNError(f"input_dropout is {_show(p)}; {too_fine}.")

    def to_dict(self) -> dict:
        return asdict(self)



def keep_mask(shape: tuple[int, ...], drop_probability: float, generator: torch.Generator,
              dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """A mask of ``shape`` in ``dtype``: each entry is 0 (drop) with ``drop_probability``,
    rounded to a multiple of 1/:data:`DROPOUT_RESOLUTION`, else 1.

    ``torch.rand`` draws 32 random bits per float; here every 64-bit draw of
    ``generator`` gives eight random bytes, an eighth of the draws. The comparison
    writes straight into ``dtype`` (a bool mask converted afterwards costs more).
    """
    n = math.prod(shape)
    words = torch.empty(-(-n // 8), dtype=torch.int64).random_(-(2**63), None, generator=generator)
    lowest = -(DROPOUT_RESOLUTION // 2)  # the bytes, read as int8, are uniform over [-128, 127]
    threshold = lowest + min(round(drop_probability * DROPOUT_RESOLUTION), DROPOUT_RESOLUTION - 1)
    mask = torch.empty(shape, dtype=dtype)
    return torch.ge(words.view(torch.int8)[:n].view(shape), threshold, out=mask)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    """One ``{"epoch", "loss", "acc"}`` per epoch, measured on the training batches."""
    seconds: float = 0.0
    """Wall time of the loop."""
    cpu_seconds: float = 0.0
    """CPU time of this process during the loop, all its threads: on a shared machine
    it moves far less with the other jobs than the wall time does."""


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    desc: str = "train",
    progress: bool = True,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` on ``(x, y)`` with Adam and cross-entropy; return the per-epoch history.

    A batch size larger than the training set trains on the whole set as one batch per
    epoch (with a warning). ``extra_loss(logits, x_batch)`` is added to the cross-entropy
    (continual learning's distillation term). Fewer than two training examples is a :class:`HyBNNError`:
    batch norm cannot train on them.
    """
    if len(x) < MIN_BATCH_SIZE:
        raise HyBNNError(
            f"{desc}: {len(x)} training example(s); training needs at least {MIN_BATCH_SIZE} "
            "(batch norm needs two samples per batch). Use a task or partition with more data."
        )
    batch_size = config.batch_size
    if batch_size > len(x):
        log.warning("%s: batch size %d is larger than the %d training examples; each epoch "
                    "trains on all of them as one batch.", desc, batch_size, len(x))
        batch_size = len(x)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    parameters = list(model.parameters())
    # fused Adam: one kernel for all parameters instead of a dozen small ops per tensor
    fused = all(p.is_floating_point() and p.device.type == "cpu" for p in parameters)
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay,
                                 fused=fused or None)
    steps_per_epoch = max(1, -(-len(x) // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch, eta_min=config.lr * config.final_lr_fraction
    )
    latents = latent_weights(model)
    result = TrainResult()
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    bar = tqdm(range(config.epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    for epoch in bar:
        order = torch.randperm(len(x), generator=generator)
        total_loss = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        for begin in range(0, len(x), batch_size):
            idx = order[begin : begin + batch_size]
            if len(idx) < MIN_BATCH_SIZE:  # a last batch of one: batch norm needs two samples
                continue
            x_batch, y_batch = x.index_select(0, idx), y.index_select(0, idx)
            inputs = x_batch
            if config.input_dropout > 0:
                inputs = keep_mask(x_batch.shape, config.input_dropout, generator,
                                   dtype=x_batch.dtype).mul_(x_batch)
            logits = model(inputs)
            loss = F.cross_entropy(logits, y_batch)
            if extra_loss is not None:
                loss = loss + extra_loss(logits, x_batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            clip_latent_weights_(latents)
            with torch.no_grad():
                total_loss += loss.detach() * len(x_batch)
                correct += (logits.argmax(1) == y_batch).sum()
        stats = {"epoch": epoch + 1, "loss": total_loss.item() / len(x), "acc": correct.item() / len(x)}
        result.history.append(stats)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['acc']:.4f}")
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    model.eval()
    return result


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Class predictions of ``model`` in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8192) -> dict:
    """``{"acc", "loss"}`` of ``model`` in eval mode on ``(x, y)``."""
    model.eval()
    loss = 0.0
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])
        loss += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum").item()
        correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    n = max(1, len(x))
    return {"acc": correct / n, "loss": loss / n}
