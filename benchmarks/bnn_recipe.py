"""HyBNN BNN recipes side by side with bcnn-centered: training time, test accuracy, cost ratio.

Usage::

    .venv/bin/python benchmarks/bnn_recipe.py --encoder artifacts/encoder-paper
        [--data-root data] [--tasks 0v1 2v3 4v5 6v7 8v9] [--recipes 2048:0.06:80 2048:0.06:60]
        [--seeds 0 1 2] [--bcnn-epochs 15] [--hidden 128] [--threads 1]

Each recipe ``BATCH:LR[:EPOCHS][:float]`` trains the task's BNN (``HYBNN_TRAIN_CONFIG`` with that
batch size, Adam learning rate and number of epochs; the recipe's epochs when left out)
once per seed. ``:float`` feeds the codes as float32, so the first layer takes the float
product instead of the integer one (``common.bnn.model.BinaryLinear``): the same results,
and the time the integer product saves. On each task, bcnn-centered (the binary CNN on ``sign(x - 0.5)`` images,
``common/experiments/baselines.py``) trains once, for ``--bcnn-epochs`` epochs, right
after the first seed's BNN runs and before the others, so that a slow spell on a shared machine hits
both alike. ``--bcnn-epochs 0`` leaves it out.

The table gives per task and recipe the BNN's median training time over the seeds,
wall and CPU (``TrainResult.cpu_seconds``: this process's CPU time), the mean test
accuracy and the lowest one, bcnn-centered's times and accuracy, and the ratios: the BNN's
median over bcnn-centered's time on the same task, the cost ratio of ``hybnn reproduce``'s
report (target: ``common.experiments.report.COST_TARGET``). The wall ratio is what the
report shows; on a machine shared with other jobs the wall times of one run swing by
half or more, and the CPU ratio is the steadier measure of the same cost. The last lines
give each recipe's pair-task mean accuracy, its worst ratios and whether every task meets
the target::

    recipe 2048:0.06:100 mean_acc=0.9970 worst_wall_ratio=0.095 worst_cpu_ratio=0.081 ...
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass, replace

import torch

from common.bnn.pipeline import HYBNN_TRAIN_CONFIG, train_hybnn
from common.data.tasks import PAIR_TASKS, get_task
from common.encoder.artifact import load_encoder_artifact
from common.experiments.baselines import train_baseline
from common.experiments.report import COST_TARGET
from common.resources import reuse_freed_memory


@dataclass(frozen=True)
class Recipe:
    batch_size: int
    lr: float
    epochs: int
    float_inputs: bool = False

    @property
    def name(self) -> str:
        return f"{self.batch_size}:{self.lr:g}:{self.epochs}" + (":float" if self.float_inputs else "")


def recipe(text: str) -> Recipe:
    try:
        parts = text.split(":")
        float_inputs = parts[-1] == "float"
        if float_inputs:
            parts = parts[:-1]
        if len(parts) not in (2, 3):
            raise ValueError
        epochs = int(parts[2]) if len(parts) == 3 else HYBNN_TRAIN_CONFIG.epochs
        return Recipe(int(parts[0]), float(parts[1]), epochs, float_inputs)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected BATCH:LR, BATCH:LR:EPOCHS or either with :float, such as 2048:0.06:80, "
            f"got {text!r}") from None


def main() -> None:
    default = Recipe(HYBNN_TRAIN_CONFIG.batch_size, HYBNN_TRAIN_CONFIG.lr, HYBNN_TRAIN_CONFIG.epochs)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", required=True, help="encoder artifact directory")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--tasks", nargs="+", default=list(PAIR_TASKS))
    parser.add_argument("--recipes", nargs="+", type=recipe, default=[default],
                        help=f"BATCH:LR[:EPOCHS][:float] (default: the recipe, {default.name}; "
                             ":float feeds float32 codes, the float product)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--bcnn-epochs", type=int, default=15,
                        help="bcnn-centered's epochs, as in the paper profile (0: leave it out)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden units (default: the task's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the hybnn command does
    artifact = load_encoder_artifact(args.encoder)
    hidden = (args.hidden,) if args.hidden else None
    print(f"load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}, "
          f"seeds {args.seeds}, bcnn-centered {args.bcnn_epochs} epochs")
    print(f"{'task':6} {'recipe':>22} {'wall s':>7} {'cpu s':>6} {'mean acc':>9} {'min acc':>8} "
          f"{'bcnn wall':>9} {'bcnn cpu':>8} {'bcnn acc':>8} {'ratio wall':>10} {'ratio cpu':>9}")
    accuracy: dict[Recipe, list[float]] = {r: [] for r in args.recipes}
    worst: dict[Recipe, list[float]] = {r: [0.0, 0.0] for r in args.recipes}  # wall, cpu
    for name in args.tasks:
        task = get_task(name)
        seconds: dict[Recipe, list[float]] = {r: [] for r in args.recipes}
        cpu_seconds: dict[Recipe, list[float]] = {r: [] for r in args.recipes}
        task_accuracy: dict[Recipe, list[float]] = {r: [] for r in args.recipes}
        bcnn = None
        for i, seed in enumerate(args.seeds):
            for r in args.recipes:
                config = replace(HYBNN_TRAIN_CONFIG, batch_size=r.batch_size, lr=r.lr,
                                 epochs=r.epochs, seed=seed)
                run = train_hybnn(artifact, task, args.data_root, config, hidden=hidden, progress=False,
                                  float_inputs=r.float_inputs)
                seconds[r].append(run.train.seconds)
                cpu_seconds[r].append(run.train.cpu_seconds)
                task_accuracy[r].append(run.test_acc)
            if i == 0 and args.bcnn_epochs > 0:
                bcnn = train_baseline("bcnn-centered", name, epochs=args.bcnn_epochs,
                                      data_root=args.data_root, seed=seed, progress=False)
        for r in args.recipes:
            median, cpu_median = statistics.median(seconds[r]), statistics.median(cpu_seconds[r])
            accuracy[r] += task_accuracy[r]
            row = (f"{name:6} {r.name:>22} {median:7.2f} {cpu_median:6.2f} "
                   f"{statistics.mean(task_accuracy[r]):9.4f} {min(task_accuracy[r]):8.4f}")
            if bcnn is not None:
                ratios = (median / bcnn["train_seconds"], cpu_median / bcnn["train_cpu_seconds"])
                worst[r] = [max(w, q) for w, q in zip(worst[r], ratios)]
                row += (f" {bcnn['train_seconds']:9.1f} {bcnn['train_cpu_seconds']:8.1f} "
                        f"{bcnn['test_acc']:8.4f} {ratios[0]:10.3f} {ratios[1]:9.3f}")
            print(row, flush=True)
    for r in args.recipes:
        line = f"recipe {r.name} mean_acc={statistics.mean(accuracy[r]):.4f}"
        if args.bcnn_epochs > 0:
            wall, cpu = worst[r]
            line += (f" worst_wall_ratio={wall:.3f} worst_cpu_ratio={cpu:.3f} target<={COST_TARGET:g}"
                     f" met_by_wall={'yes' if wall <= COST_TARGET else 'no'}"
                     f" met_by_cpu={'yes' if cpu <= COST_TARGET else 'no'}")
        print(line)


if __name__ == "__main__":
    main()
