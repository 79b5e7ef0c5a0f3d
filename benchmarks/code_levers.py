"""What each lever on the codes and the BNN gives in test accuracy, side by side, same seeds.

Usage::

    .venv/bin/python benchmarks/code_levers.py --encoder artifacts/encoder-paper
        [--data-root data] [--tasks 2v3 8v9] [--seeds 0 1 2]
        [--levers base wide wide-drop3 thermo aug posterior itq probe-codes probe-itq probe-logits]
        [--copies 4]

Every lever trains the task's BNN with the HyBNN recipe (``HYBNN_TRAIN_CONFIG``) and
changes one thing; the encoder stays the given frozen one and every test sample is
encoded as usual (the most likely code, plus the second bit for ``thermo``):

* ``base``: the recipe as it is (the task's default width).
* ``wide``: 512 hidden units.
* ``wide-drop3``: 512 hidden units and input-bit dropout 0.3.
* ``thermo``: 400 bits per sample: each latent's sign and whether its logit's magnitude
  reaches the median magnitude over the training set (two bits of each logit: a wider
  code from the same encoder).
* ``aug``: the training codes plus ``--copies`` codes of randomly shifted, rotated and
  scaled copies of each training image (``torchvision`` ``RandomAffine``: 10 degrees,
  10% shift, scale 0.9-1.1), trained for ``epochs / (copies + 1)`` epochs so the steps
  match.
* ``posterior``: the training codes plus ``--copies`` codes sampled from the encoder's
  Bernoulli posterior ``sigmoid(logit)``, same step count.
* ``itq``: the codes of the same encoder with the ITQ code rotation
  (:mod:`common.encoder.rotation`, ``hybnn pretrain --code-rotation itq``) fitted on the
  logits of all 60,000 training images, no labels: the sign of the rotated standardised
  logits instead of the logits' own sign. Still 200 bits.

Three diagnostics, not BNNs, show where the accuracy is lost: ``probe-codes``, a
full-precision MLP (512 ReLU units, batch norm, dropout 0.3, Adam 3e-3, 60 epochs) on the
same 200-bit codes, ``probe-itq``, the same MLP on the ``itq`` codes, and ``probe-logits``,
the same MLP on the encoder's real-valued logits (standardised), which the codes round
to one bit each.

Prints one line per task, lever and seed (test accuracy, errors, training seconds) and a
summary per task and lever: the mean accuracy over the seeds and its difference from
``base``.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import replace

import numpy as np
import torch

from common.bnn.model import BNN, BNNConfig
from common.bnn.pipeline import HYBNN_TRAIN_CONFIG
from common.bnn.training import TrainConfig, evaluate, fit
from common.data.mnist import load_mnist
from common.data.tasks import get_task, select_task
from common.encoder.artifact import load_encoder_artifact
from common.encoder.features import InferenceEncoder
from common.encoder.rotation import fit_code_rotation
from common.encoder.vae import images_to_tensor

LEVERS = ("base", "wide", "wide-drop3", "thermo", "aug", "posterior", "itq", "probe-codes", "probe-itq",
          "probe-logits")
PROBE_CONFIG = TrainConfig(epochs=60, batch_size=512, lr=3e-3, weight_decay=1e-4)
WIDE = 512


def encoder_logits(model: torch.nn.Module, images: np.ndarray, batch: int = 2048) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(images_to_tensor(images[i : i + batch])) for i in range(0, len(images), batch)])


def augmented(images: np.ndarray, seed: int) -> np.ndarray:
    import torchvision.transforms.v2 as T

    torch.manual_seed(seed)
    affine = T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    x = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    return torch.stack([affine(x[i]) for i in range(len(x))])[:, 0].numpy()


def probe(in_features: int, num_classes: int) -> torch.nn.Module:
    """A full-precision MLP of the BNN's shape: how much the inputs allow without binary weights."""
    return torch.nn.Sequential(torch.nn.Linear(in_features, WIDE), torch.nn.BatchNorm1d(WIDE), torch.nn.ReLU(),
                               torch.nn.Dropout(0.3), torch.nn.Linear(WIDE, num_classes))


def signs(logits: torch.Tensor) -> torch.Tensor:
    return torch.where(logits >= 0, 1.0, -1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", required=True, help="encoder artifact directory")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--tasks", nargs="+", default=["2v3", "8v9"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--levers", nargs="+", choices=LEVERS, default=list(LEVERS))
    parser.add_argument("--copies", type=int, default=4, help="extra codes per image for aug and posterior")
    args = parser.parse_args()

    torch.set_num_threads(1)
    artifact = load_encoder_artifact(args.encoder)
    model = InferenceEncoder(artifact.encoder.eval())
    bits = int(artifact.manifest["latent_bits"])
    train_images, train_labels = load_mnist(args.data_root, "train")
    test_images, test_labels = load_mnist(args.data_root, "test")
    print(f"load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}", flush=True)
    rotation = None
    if {"itq", "probe-itq"} & set(args.levers):
        rotation = fit_code_rotation(encoder_logits(model, train_images), seed=0)
    summary: list[str] = []
    for name in args.tasks:
        task = get_task(name)
        images, labels = select_task(train_images, train_labels, task)
        t_images, t_labels = select_task(test_images, test_labels, task)
        y, y_test = torch.from_numpy(labels), torch.from_numpy(t_labels)
        logits, t_logits = encoder_logits(model, images), encoder_logits(model, t_images)
        median = logits.abs().median()
        extra: dict[str, list[torch.Tensor]] = {}
        if "aug" in args.levers:
            extra["aug"] = [signs(encoder_logits(model, augmented(images, 1000 + k))) for k in range(args.copies)]
        if "posterior" in args.levers:
            g = torch.Generator().manual_seed(0)
            extra["posterior"] = [torch.bernoulli(torch.sigmoid(logits), generator=g) * 2 - 1
                                  for _ in range(args.copies)]
        accuracy: dict[str, list[float]] = {lever: [] for lever in args.levers}
        for seed in args.seeds:
            for lever in args.levers:
                config = replace(HYBNN_TRAIN_CONFIG, seed=seed)
                shape = BNNConfig.for_task(bits, task.num_classes)
                x, x_test = signs(logits), signs(t_logits)
                if lever in ("wide", "wide-drop3"):
                    shape = replace(shape, hidden=(WIDE,))
                if lever == "wide-drop3":
                    config = replace(config, input_dropout=0.3)
                if lever in ("itq", "probe-itq"):
                    matrix, mean = rotation
                    x = signs(((logits.double() - mean) @ matrix).float())
                    x_test = signs(((t_logits.double() - mean) @ matrix).float())
                if lever == "thermo":
                    x = torch.cat([x, signs(logits.abs() - median)], 1)
                    x_test = torch.cat([x_test, signs(t_logits.abs() - median)], 1)
                    shape = replace(shape, in_bits=2 * bits)
                if lever in extra:
                    x = torch.cat([x, *extra[lever]])
                    config = replace(config, epochs=max(1, config.epochs // (args.copies + 1)))
                if lever.startswith("probe"):
                    config = replace(PROBE_CONFIG, seed=seed)
                if lever == "probe-logits":
                    scale = logits.std()
                    x, x_test = logits / scale, t_logits / scale
                targets = y.repeat(len(x) // len(y))
                torch.manual_seed(seed)
                bnn = probe(x.shape[1], task.num_classes) if lever.startswith("probe") else BNN(shape)
                result = fit(bnn, x, targets, config, desc=f"{name} {lever}", progress=False)
                acc = evaluate(bnn, x_test, y_test)["acc"]
                accuracy[lever].append(acc)
                errors = round((1 - acc) * len(y_test))
                print(f"{name:6} {lever:11} seed {seed}: test acc {100 * acc:.2f}% "
                      f"({errors} errors of {len(y_test)}), {result.seconds:.1f} s", flush=True)
        base = statistics.mean(accuracy["base"]) if accuracy.get("base") else None
        for lever in args.levers:
            mean = statistics.mean(accuracy[lever])
            delta = f"{100 * (mean - base):+.2f} points vs base" if base is not None else ""
            summary.append(f"{name:6} {lever:11} mean {100 * mean:.2f}% over seeds {args.seeds} {delta}")
    print("\n".join(["", "summary:", *summary]))


if __name__ == "__main__":
    main()
