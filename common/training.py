"""One supervised training loop for every model here (BNN, binary CNNs, float CNN).

Data live in memory as tensors; each epoch draws a fresh permutation from a seeded
generator, so runs are reproducible. After every optimizer step the latent weights
of binary layers are clipped to [-1, 1] (common/binarize.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from common.binarize import clip_latent_weights_


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-2
    """Adam's initial learning rate; it decays to ``lr * final_lr_fraction`` (cosine)."""
    final_lr_fraction: float = 0.01
    weight_decay: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    """One ``{"epoch", "loss", "acc"}`` per epoch, measured on the training batches."""
    seconds: float = 0.0


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on ``(x, y)`` with Adam and cross-entropy; return the per-epoch history."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, -(-len(x) // config.batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch, eta_min=config.lr * config.final_lr_fraction
    )
    result = TrainResult()
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(config.epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    for epoch in bar:
        order = torch.randperm(len(x), generator=generator)
        total_loss = 0.0
        correct = 0
        for begin in range(0, len(x), config.batch_size):
            idx = order[begin : begin + config.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            clip_latent_weights_(model)
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        stats = {"epoch": epoch + 1, "loss": total_loss / len(x), "acc": correct / len(x)}
        result.history.append(stats)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['acc']:.4f}")
    result.seconds = time.perf_counter() - start
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
