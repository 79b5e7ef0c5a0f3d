"""HyBNN BNN recipes side by side: training time and test accuracy per batch size and lr.

Usage::

    .venv/bin/python benchmarks/bnn_recipe.py --encoder artifacts/encoder-paper
        [--data-root data] [--tasks 0v1 2v3 4v5 6v7 8v9] [--recipes 1024:0.03 2048:0.06]
        [--repeats 3] [--epochs 100] [--hidden 128]

Each recipe ``BATCH:LR`` trains the task's BNN (``HYBNN_TRAIN_CONFIG`` with that batch
size and Adam learning rate). The runs alternate between recipes, so a slow spell on a
shared machine hits them alike; the table gives each recipe's median training time,
its test accuracy (of the last repeat; training is seeded) and its time as a
fraction of the first recipe's. The last lines give each other recipe's worst fraction
over the tasks.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import replace

import torch

from common.encoder.artifact import load_encoder_artifact
from common.bnn.pipeline import HYBNN_TRAIN_CONFIG, train_hybnn
from common.data.tasks import PAIR_TASKS, get_task


def recipe(text: str) -> tuple[int, float]:
    try:
        batch, lr = text.split(":")
        return int(batch), float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCH:LR such as 2048:0.06, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", required=True, help="encoder artifact directory")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--tasks", nargs="+", default=list(PAIR_TASKS))
    parser.add_argument("--recipes", nargs="+", type=recipe, default=[(1024, 0.03), (2048, 0.06)])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=HYBNN_TRAIN_CONFIG.epochs)
    parser.add_argument("--hidden", type=int, default=None, help="hidden units (default: the task's)")
    args = parser.parse_args()

    artifact = load_encoder_artifact(args.encoder)
    hidden = (args.hidden,) if args.hidden else None
    print(f"load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")
    print(f"{'task':6} {'batch:lr':>12} {'median s':>9} {'test acc':>9} {'time / first':>13}")
    worst: dict[tuple[int, float], float] = {r: 0.0 for r in args.recipes}
    for name in args.tasks:
        task = get_task(name)
        seconds: dict[tuple[int, float], list[float]] = {r: [] for r in args.recipes}
        accuracy: dict[tuple[int, float], float] = {}
        for _ in range(args.repeats):
            for batch, lr in args.recipes:
                config = replace(HYBNN_TRAIN_CONFIG, batch_size=batch, lr=lr, epochs=args.epochs)
                run = train_hybnn(artifact, task, args.data_root, config, hidden=hidden, progress=False)
                seconds[(batch, lr)].append(run.train.seconds)
                accuracy[(batch, lr)] = run.test_acc
        first = statistics.median(seconds[args.recipes[0]])
        for r in args.recipes:
            median = statistics.median(seconds[r])
            print(f"{name:6} {f'{r[0]}:{r[1]:g}':>12} {median:9.2f} {accuracy[r]:9.4f} {median / first:13.2f}")
            worst[r] = max(worst[r], median / first)
    for r in args.recipes[1:]:
        print(f"worst_time_fraction {r[0]}:{r[1]:g} / {args.recipes[0][0]}:{args.recipes[0][1]:g} = {worst[r]:.2f}")


if __name__ == "__main__":
    main()
