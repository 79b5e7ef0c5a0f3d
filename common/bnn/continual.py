"""Continual learning on the frozen encoder: tasks seen one after another.

The BNN meets the tasks in order, each for a fixed epoch budget, and never sees an
earlier task's data again except through what the method keeps. Two scenarios:

* **task-incremental** (the task is known at test time; each task is scored with its
  own outputs):

  - ``finetune``: one BNN with one output head, trained task after task (the paper's
    sequence; the lower bound);
  - ``shared-multihead``: one shared binary hidden layer, one binary output head per
    task; each task trains the shared layer and its own head;
  - ``frozen-heads``: one whole BNN per task on top of the frozen encoder (the encoder
    is the shared trunk); a task's BNN is frozen once trained, so nothing is forgotten,
    at the cost of one BNN's weights per task.

* **class-incremental** (one output per class of all tasks, the task unknown at test
  time):

  - ``finetune``: no replay (the lower bound);
  - ``joint``: all tasks at once, for the same epoch budget (the upper bound);
  - ``replay-reservoir`` / ``replay-balanced``: a buffer of packed codes (25 bytes for
    200 bits, plus one label byte) of earlier tasks, filled by reservoir sampling over
    the stream of training examples, or split evenly across the classes seen so far.
    While a task trains, the buffer is repeated so that every earlier class weighs
    as much as a class of the current task.

Metrics: ``acc_matrix[i][j]`` is the test accuracy on task ``j`` after training up to
task ``i`` (rows after each task; ``joint`` has a single row). From its last row:
``final_avg_acc`` (mean over tasks), ``forgetting`` (mean over the earlier tasks of the
best earlier accuracy minus the final one) and ``backward_transfer`` (mean of final minus
just-trained accuracy). Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from common.bnn.model import BNN, BNNConfig, BinaryLinear, check_trainable, codes_to_inputs, default_hidden
from common.errors import HyBNNError
from common.packing import pack_bits, packed_length
from common.data.tasks import Task
from common.bnn.limits import derived_seed
from common.bnn.training import MAX_EPOCHS, TrainConfig, check_training_options, fit, predict

log = logging.getLogger(__name__)

SCENARIOS = ("task", "class")
TASK_IL_METHODS = ("finetune", "shared-multihead", "frozen-heads")
REPLAY_STRATEGIES = ("reservoir", "balanced")
DEFAULT_REPLAY_CODES = (0, 500, 2000, 5000)
MAX_REPLAY_CODES = 10_000_000
"""A larger buffer than this is a typo (MNIST has 60,000 training codes)."""
LABEL_BYTES = 1
"""Each stored example keeps its label in one byte beside its packed code."""
SCHEMA = "hybnn-continual/1"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
HEATMAP_FILE = "acc_matrix.png"
REPLAY_PLOT_FILE = "final_acc_vs_replay_bytes.png"
OUTPUT_FILES = (RESULTS_FILE, REPORT_FILE, HEATMAP_FILE, REPLAY_PLOT_FILE)


@dataclass
class ContinualConfig:
    """One ``hybnn continual`` run."""

    tasks: tuple[str, ...] = ("0v1", "2v3", "4v5", "6v7", "8v9")
    scenarios: tuple[str, ...] = SCENARIOS
    replay_codes: tuple[int, ...] = DEFAULT_REPLAY_CODES
    replay_strategies: tuple[str, ...] = REPLAY_STRATEGIES
    task_methods: tuple[str, ...] = TASK_IL_METHODS
    epochs: int = 15
    """Epochs per task in the class scenario (``joint`` gets this many over all tasks' data)."""
    task_epochs: int = 100
    """Epochs per task in the task scenario (the BNN recipe's 100: common/bnn/pipeline.py)."""
    batch_size: int = 2048
    lr: float = 6e-2
    later_lr: float | None = None
    """Adam's learning rate for the tasks after the first (default: ``lr``); a smaller one flips
    fewer of the binary weights that earlier tasks set."""
    task_hidden: tuple[int, ...] | None = None
    """Hidden widths of the task-incremental BNNs (default: the paper's 128 for two classes)."""
    class_hidden: tuple[int, ...] | None = None
    """Hidden widths of the class-incremental BNN (default: 512 for more than two classes)."""
    distill: float = 1.0
    """Weight of the distillation term in the class scenario's replay runs: the model's outputs for
    the earlier classes are pulled towards those of the model as it was before the task (0: off)."""
    replay_flip: float = 0.05
    """Class scenario, replay runs: each replayed code has each bit flipped with this probability,
    afresh for every task, so that the repeated buffer is not learnt by heart (0: off)."""
    input_dropout: float = 0.2
    """Class scenario (every run, joint included): each input bit of a training batch is zeroed with
    this probability (:class:`common.bnn.training.TrainConfig`), so that neither the repeated buffer
    nor the new task's codes are learnt bit by bit (0: off). The task scenario keeps the paper's recipe."""
    seed: int = 0
    dataset: str = "mnist"

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        self.scenarios = tuple(self.scenarios)
        self.replay_codes = tuple(self.replay_codes)
        self.replay_strategies = tuple(self.replay_strategies)
        self.task_methods = tuple(self.task_methods)
        if not self.tasks:
            raise HyBNNError("The task list is empty; pass at least one task, for example "
                             "--tasks 0v1,2v3,4v5,6v7,8v9.")
        if not self.scenarios or any(s not in SCENARIOS for s in self.scenarios):
            raise HyBNNError(f"Unknown scenario in {list(self.scenarios)}; use task, class or both.")
        for n in self.replay_codes:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= MAX_REPLAY_CODES:
                raise HyBNNError(f"Replay buffer size {n!r} (--replay-codes) must be a whole number from 0 "
                                 f"to {MAX_REPLAY_CODES:,}; 0 means no replay (plain fine-tuning).")
        if len(set(self.replay_codes)) != len(self.replay_codes):
            raise HyBNNError(f"--replay-codes {list(self.replay_codes)} names a buffer size twice.")
        if not self.replay_strategies or any(s not in REPLAY_STRATEGIES for s in self.replay_strategies):
            raise HyBNNError(f"Unknown replay strategy in {list(self.replay_strategies)}; use "
                             f"{', '.join(REPLAY_STRATEGIES)}.")
        if not self.task_methods or any(m not in TASK_IL_METHODS for m in self.task_methods):
            raise HyBNNError(f"Unknown task-incremental method in {list(self.task_methods)}; use "
                             f"{', '.join(TASK_IL_METHODS)}.")
        check_training_options(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)
        check_training_options(epochs=self.task_epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)
        if isinstance(self.replay_flip, bool) or not isinstance(self.replay_flip, (int, float)) \
                or not 0 <= self.replay_flip <= 0.5:
            raise HyBNNError(f"The replay bit-flip probability (--replay-flip) is {self.replay_flip!r}; it "
                             "must be from 0 (off) to 0.5.")
        if isinstance(self.distill, bool) or not isinstance(self.distill, (int, float)) \
                or not 0 <= self.distill <= 1000:
            raise HyBNNError(f"The distillation weight (--distill) is {self.distill!r}; it must be a number "
                             "from 0 (off) to 1000.")
        if isinstance(self.input_dropout, bool) or not isinstance(self.input_dropout, (int, float)) \
                or not 0 <= self.input_dropout <= 0.9:
            raise HyBNNError(f"The input dropout (--input-dropout) is {self.input_dropout!r}; it must be from "
                             "0 (off) to 0.9.")
        if self.later_lr is not None:
            check_training_options(epochs=self.epochs, batch_size=self.batch_size, lr=self.later_lr,
                                   seed=self.seed)

    def train_config(self, step: int, scenario: str = "class") -> TrainConfig:
        """The recipe of the ``step``-th task (its own seed, so runs are reproducible)."""
        lr = self.lr if step == 0 or self.later_lr is None else self.later_lr
        if scenario == "task":
            return TrainConfig(epochs=self.task_epochs, batch_size=self.batch_size, lr=lr, seed=derived_seed(self.seed, step))
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=lr, seed=derived_seed(self.seed, step),
                           input_dropout=self.input_dropout)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# ------------------------------------------------------------------ tasks
def split_task_list(text: str) -> list[str]:
    """``"0v1,2v3"`` -> ``["0v1", "2v3"]``; with a ``;`` anywhere, ``;`` separates the tasks
    instead, so specs with commas (``0,2v1,3;4v5``) can be listed."""
    sep = ";" if ";" in text else ","
    return [part.strip() for part in text.split(sep)]


def resolve_tasks(specs: Sequence[str], dataset, scenarios: Sequence[str] = SCENARIOS) -> list[Task]:
    """The tasks named by ``specs`` over ``dataset``'s classes, checked for a continual run.

    Refused (:class:`HyBNNError`): an empty list or an empty entry, a task listed twice
    (the same classes in the same groups), a spec that names a class the data set does not
    have and, when the class scenario runs, two tasks that share a class (its one output
    per class would then mean two things).
    """
    from common.data.tasks import task_for_dataset

    specs = list(specs)
    if not specs:
        raise HyBNNError("The task list is empty; pass at least one task, for example "
                         "--tasks 0v1,2v3,4v5,6v7,8v9.")
    if any(not str(s).strip() for s in specs):
        raise HyBNNError(f"The task list {','.join(map(str, specs))!r} has an empty entry; separate the tasks "
                         "with commas (or with ; when a spec holds commas), for example 0v1,2v3.")
    tasks = [task_for_dataset(str(s), dataset) for s in specs]
    seen: dict[tuple, str] = {}
    for task in tasks:
        key = tuple(sorted(tuple(sorted(g)) for g in task.groups))
        if key in seen:
            raise HyBNNError(f"Task {task.name!r} repeats task {seen[key]!r}; each task may appear once in "
                             "the sequence.")
        seen[key] = task.name
    if "class" in scenarios:
        owner: dict[int, str] = {}
        for task in tasks:
            for c in task.digits:
                if c in owner:
                    raise HyBNNError(
                        f"Tasks {owner[c]!r} and {task.name!r} share class {task.class_names and c}; the "
                        "class-incremental scenario has one output per class, so its tasks must not "
                        "overlap. Pass disjoint tasks, or --scenario task.")
                owner[c] = task.name
    return tasks


@dataclass
class TaskData:
    """A task's packed codes and labels, train and test; labels are the task's own (0..k-1)."""

    task: Task
    train_codes: np.ndarray
    train_labels: np.ndarray
    test_codes: np.ndarray
    test_labels: np.ndarray


def task_data(codes: dict[str, tuple[np.ndarray, np.ndarray]], tasks: Sequence[Task]) -> list[TaskData]:
    """Split the data set's codes (``{"train": (codes, labels), "test": ...}``) into the tasks."""
    from common.data.tasks import select_task

    out = []
    for task in tasks:
        tr = select_task(*codes["train"], task, split="train")
        te = select_task(*codes["test"], task, split="test")
        if len(tr[1]) < 2 or len(te[1]) == 0:
            raise HyBNNError(f"Task {task.name!r} has {len(tr[1])} training and {len(te[1])} test examples in "
                             "this data set; a continual run needs at least two and one.")
        out.append(TaskData(task, tr[0], tr[1], te[0], te[1]))
    return out


# ------------------------------------------------------------------ models
class MultiHeadBNN(nn.Module):
    """Shared ``[BinaryLinear -> BatchNorm1d -> sign]`` hidden layers, then one
    ``BinaryLinear -> BatchNorm1d`` output head per task."""

    def __init__(self, in_bits: int, hidden: tuple[int, ...], head_sizes: Sequence[int]) -> None:
        super().__init__()
        check_trainable(BNNConfig(in_bits, hidden, max(head_sizes)))
        widths = (in_bits, *hidden)
        self.hidden = nn.ModuleList(BinaryLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.hidden_bn = nn.ModuleList(nn.BatchNorm1d(b) for b in hidden)
        self.heads = nn.ModuleList(BinaryLinear(widths[-1], k) for k in head_sizes)
        self.heads_bn = nn.ModuleList(nn.BatchNorm1d(k) for k in head_sizes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        from common.binarize import sign_ste

        for linear, bn in zip(self.hidden, self.hidden_bn):
            x = sign_ste(bn(linear(x)))
        return x

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads_bn[task](self.heads[task](self.features(x)))


class _TaskView(nn.Module):
    """One task's path through a :class:`MultiHeadBNN`: the shared layers and that task's head,
    so that the one training loop (:func:`common.bnn.training.fit`) trains only those."""

    def __init__(self, model: MultiHeadBNN, task: int) -> None:
        super().__init__()
        self.hidden, self.hidden_bn = model.hidden, model.hidden_bn
        self.head, self.head_bn = model.heads[task], model.heads_bn[task]
        self._model, self._task = [model], task  # a list: not registered twice as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model[0](x, self._task)


def _accuracy(model: nn.Module, x: torch.Tensor, y: np.ndarray) -> float:
    return float((predict(model, x).numpy() == y).mean()) if len(y) else float("nan")


# ------------------------------------------------------------------ metrics
def summarize(acc_matrix: list[list[float]]) -> dict:
    """Average accuracy after each task, and the final average, forgetting and backward transfer."""
    a = np.asarray(acc_matrix, dtype=float)
    rows, n = a.shape
    final = a[-1]
    out = {"final_avg_acc": float(final.mean())}
    if rows == n:
        out["avg_acc_after_each_task"] = [float(a[i, : i + 1].mean()) for i in range(n)]
        if n > 1:
            out["forgetting"] = float(np.mean([a[: n - 1, j].max() - final[j] for j in range(n - 1)]))
            out["backward_transfer"] = float(np.mean([final[j] - a[j, j] for j in range(n - 1)]))
        else:
            out["forgetting"] = out["backward_transfer"] = 0.0
    else:  # joint training: one row, nothing to forget
        out["avg_acc_after_each_task"] = [out["final_avg_acc"]]
        out["forgetting"] = out["backward_transfer"] = 0.0
    return out


def _run_record(scenario: str, method: str, acc_matrix: list[list[float]], seconds: float, *,
                replay_codes: int = 0, code_bytes: int = 25, model_weights: int = 0, **extra) -> dict:
    record = {
        "scenario": scenario,
        "method": method,
        "replay_codes": int(replay_codes),
        "replay_bytes": int(replay_codes) * (code_bytes + LABEL_BYTES),
        "acc_matrix": [[float(v) for v in row] for row in acc_matrix],
        **summarize(acc_matrix),
        "model_weights": int(model_weights),
        "seconds": float(seconds),
    }
    record.update(extra)
    return record


# ------------------------------------------------------------------ task-incremental
def run_task_incremental(data: list[TaskData], method: str, config: ContinualConfig, in_bits: int,
                         *, progress: bool = True) -> dict:
    """One task-incremental method over the task sequence; its run record (see the module docstring)."""
    start = time.perf_counter()
    sizes = [d.task.num_classes for d in data]
    hidden = config.task_hidden or default_hidden(max(sizes))
    tests = [(codes_to_inputs(d.test_codes, in_bits), d.test_labels) for d in data]
    models: list[nn.Module] = []
    shared: MultiHeadBNN | None = None
    single: BNN | None = None
    torch.manual_seed(config.seed)
    if method == "finetune":
        single = BNN(BNNConfig(in_bits, tuple(hidden), max(sizes)))
    elif method == "shared-multihead":
        shared = MultiHeadBNN(in_bits, tuple(hidden), sizes)
    rows = []
    for t, d in enumerate(data):
        x = codes_to_inputs(d.train_codes, in_bits)
        y = torch.from_numpy(d.train_labels)
        if method == "finetune":
            model: nn.Module = single
        elif method == "shared-multihead":
            model = _TaskView(shared, t)
        else:
            torch.manual_seed(derived_seed(config.seed, t))
            model = BNN(BNNConfig(in_bits, tuple(hidden), sizes[t]))
            models.append(model)
        fit(model, x, y, config.train_config(t, "task"), desc=f"task-IL {method} {d.task.name}", progress=progress)
        row = []
        for j, (xt, yt) in enumerate(tests):
            if method == "finetune":
                scored = single
            elif method == "shared-multihead":
                scored = _TaskView(shared, j)
            else:
                scored = models[j] if j < len(models) else None
            # an untrained task's own BNN does not exist yet: it scores as a guess of its largest class
            row.append(_accuracy(scored, xt, yt) if scored is not None
                       else float(np.bincount(yt).max() / len(yt)))
        rows.append(row)
    weights = {"finetune": lambda: BNNConfig(in_bits, tuple(hidden), max(sizes)).num_weights(),
               "shared-multihead": lambda: sum(p.numel() for p in shared.parameters()),
               "frozen-heads": lambda: sum(BNNConfig(in_bits, tuple(hidden), k).num_weights() for k in sizes)}
    return _run_record("task", method, rows, time.perf_counter() - start,
                       code_bytes=packed_length(in_bits), model_weights=weights[method](),
                       hidden=list(hidden))


# ------------------------------------------------------------------ class-incremental
class ReplayBuffer:
    """Packed codes and their (global) labels of earlier tasks, at most ``capacity`` of them.

    ``reservoir``: reservoir sampling over the stream of training examples in a random
    order, so every example seen so far is kept with the same probability.
    ``balanced``: after each task the buffer keeps ``capacity // classes seen`` random
    examples per class (the remainder going to the first classes).
    """

    def __init__(self, capacity: int, strategy: str, code_bytes: int, seed: int) -> None:
        if strategy not in REPLAY_STRATEGIES:
            raise HyBNNError(f"Unknown replay strategy {strategy!r}; use {', '.join(REPLAY_STRATEGIES)}.")
        self.capacity, self.strategy = int(capacity), strategy
        self.codes = np.zeros((0, code_bytes), dtype=np.uint8)
        self.labels = np.zeros(0, dtype=np.int64)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + len(self.labels) * LABEL_BYTES)

    def add_task(self, codes: np.ndarray, labels: np.ndarray) -> None:
        """Offer one task's training examples to the buffer (after that task has trained)."""
        if self.capacity == 0:
            return
        if self.strategy == "reservoir":
            self._reservoir(codes, labels)
        else:
            self._balanced(codes, labels)

    def _reservoir(self, codes: np.ndarray, labels: np.ndarray) -> None:
        order = self.rng.permutation(len(labels))
        keep_codes, keep_labels = list(self.codes), list(self.labels)
        for i in order:
            self.seen += 1
            if len(keep_labels) < self.capacity:
                keep_codes.append(codes[i])
                keep_labels.append(labels[i])
            else:
                slot = int(self.rng.integers(self.seen))
                if slot < self.capacity:
                    keep_codes[slot], keep_labels[slot] = codes[i], labels[i]
        self.codes = np.asarray(keep_codes, dtype=np.uint8).reshape(-1, self.codes.shape[1])
        self.labels = np.asarray(keep_labels, dtype=np.int64)

    def _balanced(self, codes: np.ndarray, labels: np.ndarray) -> None:
        all_codes = np.concatenate([self.codes, codes])
        all_labels = np.concatenate([self.labels, labels.astype(np.int64)])
        classes = np.unique(all_labels)
        base, extra = divmod(self.capacity, len(classes))
        keep = []
        for k, c in enumerate(classes):
            idx = np.flatnonzero(all_labels == c)
            quota = base + (1 if k < extra else 0)
            # earlier examples of a class are already a random sample of it: keep their first ones
            keep.append(idx[:quota] if c in self.labels else self.rng.permutation(idx)[:quota])
        keep_idx = np.concatenate(keep)
        self.codes, self.labels = all_codes[keep_idx], all_labels[keep_idx]
        self.seen += len(labels)

    def balanced_replay(self, current_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The buffer repeated so that each earlier class has about as many examples as a
        class of the current task has (never fewer than the buffer itself)."""
        if len(self) == 0:
            return self.codes, self.labels
        per_new_class = len(current_labels) / max(1, len(np.unique(current_labels)))
        counts = np.bincount(self.labels)
        idx = []
        for c in np.flatnonzero(counts):
            members = np.flatnonzero(self.labels == c)
            reps = max(1, int(round(per_new_class / len(members))))
            idx.append(np.tile(members, reps))
        idx = np.concatenate(idx)
        return self.codes[idx], self.labels[idx]


def _global_labels(data: list[TaskData]) -> list[int]:
    """The first output of each task in the class scenario (its groups take consecutive outputs)."""
    offsets, total = [], 0
    for d in data:
        offsets.append(total)
        total += d.task.num_classes
    return offsets


DISTILL_TEMPERATURE = 2.0


def _distillation(previous: nn.Module, old_outputs: int, weight: float):
    """``weight * T^2 * KL(previous || model)`` over the first ``old_outputs`` outputs at temperature T."""
    from torch.nn import functional as F

    previous.requires_grad_(False)
    t = DISTILL_TEMPERATURE

    def loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.softmax(previous(x)[:, :old_outputs] / t, dim=1)
        log_p = F.log_softmax(logits[:, :old_outputs] / t, dim=1)
        return weight * t * t * F.kl_div(log_p, target, reduction="batchmean")

    return loss


def run_class_incremental(data: list[TaskData], method: str, config: ContinualConfig, in_bits: int, *,
                          replay_codes: int = 0, strategy: str = "balanced", progress: bool = True) -> dict:
    """One class-incremental run: ``finetune`` (``replay_codes`` 0), ``joint``, or ``replay``
    with a buffer of ``replay_codes`` codes filled by ``strategy``; its run record."""
    start = time.perf_counter()
    offsets = _global_labels(data)
    num_classes = offsets[-1] + data[-1].task.num_classes
    hidden = tuple(config.class_hidden or default_hidden(num_classes))
    code_bytes = packed_length(in_bits)
    tests = [(codes_to_inputs(d.test_codes, in_bits), d.test_labels + off) for d, off in zip(data, offsets)]
    torch.manual_seed(config.seed)
    model = BNN(BNNConfig(in_bits, hidden, num_classes))
    rows: list[list[float]] = []

    def score() -> list[float]:
        return [_accuracy(model, xt, yt) for xt, yt in tests]

    def all_classes(row_of_tests: list[float]) -> float:
        n = [len(yt) for _, yt in tests]
        return float(np.dot(row_of_tests, n) / sum(n))

    if method == "joint":
        codes = np.concatenate([d.train_codes for d in data])
        labels = np.concatenate([d.train_labels + off for d, off in zip(data, offsets)])
        fit(model, codes_to_inputs(codes, in_bits), torch.from_numpy(labels), config.train_config(0),
            desc="class-IL joint", progress=progress)
        rows.append(score())
        name, kept = "joint", 0
    else:
        buffer = ReplayBuffer(replay_codes, strategy, code_bytes, config.seed)
        flip_rng = np.random.default_rng(derived_seed(config.seed, 7))
        for t, (d, off) in enumerate(zip(data, offsets)):
            labels = d.train_labels.astype(np.int64) + off
            old_codes, old_labels = buffer.balanced_replay(labels)
            if config.replay_flip > 0 and len(old_codes):
                flips = flip_rng.random((len(old_codes), in_bits)) < config.replay_flip
                old_codes = np.bitwise_xor(old_codes, pack_bits(flips))
            codes = np.concatenate([d.train_codes, old_codes])
            y = np.concatenate([labels, old_labels])
            extra = None
            if t > 0 and replay_codes > 0 and config.distill > 0:
                extra = _distillation(copy.deepcopy(model).eval(), off, config.distill)
            fit(model, codes_to_inputs(codes, in_bits), torch.from_numpy(y), config.train_config(t),
                desc=f"class-IL {method} {replay_codes} {d.task.name}", progress=progress, extra_loss=extra)
            rows.append(score())
            buffer.add_task(d.train_codes, labels)
        name = "finetune" if replay_codes == 0 else f"replay-{strategy}"
        kept = len(buffer)
        if kept < replay_codes:
            log.warning("The %s buffer holds %d codes, fewer than the %d asked for: the earlier tasks had "
                        "fewer training examples.", strategy, kept, replay_codes)
    record = _run_record("class", name, rows, time.perf_counter() - start, replay_codes=kept,
                         code_bytes=code_bytes, model_weights=model.config.num_weights(),
                         hidden=list(hidden), final_all_classes_acc=all_classes(rows[-1]))
    record["replay_codes_asked"] = int(replay_codes)
    return record


# ------------------------------------------------------------------ the whole run
def planned_runs(config: ContinualConfig) -> list[tuple[str, str, int, str]]:
    """``(scenario, method, replay_codes, strategy)`` of every run, in order."""
    runs = []
    if "task" in config.scenarios:
        runs += [("task", m, 0, "") for m in config.task_methods]
    if "class" in config.scenarios:
        runs.append(("class", "joint", 0, ""))
        if 0 in config.replay_codes:
            runs.append(("class", "finetune", 0, ""))
        for n in sorted(c for c in config.replay_codes if c > 0):
            runs += [("class", "replay", n, s) for s in config.replay_strategies]
    return runs


def check_planned_models(tasks: Sequence[Task], config: ContinualConfig, in_bits: int) -> None:
    """Refuse, before any codes are read or any run trained, a BNN of the plan that would not fit in
    memory (``--hidden``, ``--class-hidden``; :func:`common.bnn.model.check_trainable`): otherwise an
    impossible class-scenario width would fail only after the whole task scenario."""
    sizes = [t.num_classes for t in tasks]
    if "task" in config.scenarios:
        check_trainable(BNNConfig(in_bits, tuple(config.task_hidden or default_hidden(max(sizes))), max(sizes)))
    if "class" in config.scenarios:
        check_trainable(BNNConfig(in_bits, tuple(config.class_hidden or default_hidden(sum(sizes))), sum(sizes)))


def run_continual(artifact, data_root: Path | str, config: ContinualConfig, *, progress: bool = True,
                  log_line=print) -> dict:
    """Every planned run over the frozen encoder's codes; the results (``{"runs": [...], ...}``)."""
    from common.data.datasets import get_dataset
    from common.encoder.features import check_encoder_shape, load_codes

    dataset = get_dataset(config.dataset)
    check_encoder_shape(artifact, dataset)
    tasks = resolve_tasks(config.tasks, dataset, config.scenarios)
    in_bits = int(artifact.manifest["latent_bits"])
    check_planned_models(tasks, config, in_bits)
    codes = {split: load_codes(artifact, data_root, split, progress=progress, dataset=config.dataset)
             for split in ("train", "test")}
    data = task_data(codes, tasks)
    plan = planned_runs(config)
    start = time.perf_counter()
    runs = []
    bar = tqdm(plan, desc="continual", disable=not progress, unit="run")
    for scenario, method, n, strategy in bar:
        bar.set_postfix_str(f"{scenario} {method} {n or ''} {strategy}".strip())
        if scenario == "task":
            record = run_task_incremental(data, method, config, in_bits, progress=progress)
        else:
            record = run_class_incremental(data, method, config, in_bits, replay_codes=n,
                                           strategy=strategy or "balanced", progress=progress)
        runs.append(record)
        log_line(f"{scenario}-IL {record['method']:<17} buffer {record['replay_codes']:>5}: final average "
                 f"accuracy {100 * record['final_avg_acc']:.2f}%, forgetting "
                 f"{100 * record['forgetting']:.2f} points ({record['seconds']:.1f} s)")
    return {
        "schema": SCHEMA,
        "config": config.to_dict(),
        "tasks": [t.to_dict() for t in tasks],
        "encoder": {"sha256": artifact.sha256, "path": str(artifact.path),
                    "train_config": artifact.manifest.get("train_config", {})},
        "runs": runs,
        "total_seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------ outputs
def _pct(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def run_label(run: dict) -> str:
    extra = f" ({run['replay_codes']} codes)" if run["method"].startswith("replay") else ""
    return f"{run['scenario']}-IL {run['method']}{extra}"


def render_report(results: dict, command: str = "") -> str:
    tasks = [t["spec"] for t in results["tasks"]]
    lines = ["# Continual learning on the frozen encoder", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += [f"Encoder sha256 `{results['encoder']['sha256']}` ({results['encoder']['path']}); data set "
              f"`{results['config']['dataset']}`; tasks in order: {', '.join(tasks)}; "
              f"{results['config']['task_epochs']} epochs per task (task scenario), "
              f"{results['config']['epochs']} (class scenario); {results['total_seconds']:.0f} s in all.", "",
              "Accuracies in %; forgetting and backward transfer in points; replay bytes = codes x "
              f"(packed code + {LABEL_BYTES} label byte).", "",
              "| scenario | method | buffer codes | replay bytes | final avg acc | final all-class acc | "
              "forgetting | backward transfer | model weights | seconds |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(f"| {r['scenario']} | {r['method']} | {r['replay_codes']} | {r['replay_bytes']:,} | "
                     f"{_pct(r['final_avg_acc'])} | {_pct(r.get('final_all_classes_acc'))} | "
                     f"{_pct(r['forgetting'])} | {_pct(r['backward_transfer'])} | {r['model_weights']:,} | "
                     f"{r['seconds']:.1f} |")
    task_runs = [r for r in results["runs"] if r["scenario"] == "task"]
    if task_runs:
        best = max(task_runs, key=lambda r: (round(r["final_avg_acc"], 6), -r["forgetting"]))
        lines += ["", f"Task-incremental: `{best['method']}` measures best "
                      f"({_pct(best['final_avg_acc'])}% after the last task, forgetting "
                      f"{_pct(best['forgetting'])} points)."]
    lines += ["", "## Accuracy matrices", "",
              "Row i: after training up to task i; column j: tested on task j.", ""]
    for r in results["runs"]:
        lines += [f"### {run_label(r)}", "", "| trained up to | " + " | ".join(tasks) + " |",
                  "|---|" + "---:|" * len(tasks)]
        row_names = tasks if len(r["acc_matrix"]) == len(tasks) else ["all (joint)"]
        for name, row in zip(row_names, r["acc_matrix"]):
            lines.append(f"| {name} | " + " | ".join(_pct(v) for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(results: dict):
    plt = _pyplot()
    runs = results["runs"]
    tasks = [t["spec"] for t in results["tasks"]]
    cols = min(4, len(runs))
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, runs):
        m = np.asarray(r["acc_matrix"]) * 100
        ax.imshow(m, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_title(f"{run_label(r)}\nfinal {100 * r['final_avg_acc']:.1f}%", fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks, fontsize=7)
        ylabels = tasks if len(m) == len(tasks) else ["joint"]
        ax.set_yticks(range(len(m)), ylabels, fontsize=7)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] < 60 else "black")
    fig.supxlabel("tested on task", fontsize=9)
    fig.supylabel("trained up to task", fontsize=9)
    fig.tight_layout()
    return fig


def plot_replay(results: dict):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    class_runs = [r for r in results["runs"] if r["scenario"] == "class"]
    finetune = [r for r in class_runs if r["method"] == "finetune"]
    for strategy in REPLAY_STRATEGIES:
        pts = sorted(finetune + [r for r in class_runs if r["method"] == f"replay-{strategy}"],
                     key=lambda r: r["replay_bytes"])
        if len(pts) > len(finetune):
            ax.plot([max(r["replay_bytes"], 1) for r in pts],
                    [100 * r["final_all_classes_acc"] for r in pts], "o-", label=f"replay ({strategy})")
    if finetune and not any(r["method"].startswith("replay") for r in class_runs):
        ax.plot([1], [100 * finetune[0]["final_all_classes_acc"]], "o", label="fine-tuning, no replay")
    for r in class_runs:
        if r["method"] == "joint":
            ax.axhline(100 * r["final_all_classes_acc"], color="k", ls="--", label="joint training (upper bound)")
    for r in results["runs"]:
        if r["scenario"] == "task":
            ax.axhline(100 * r["final_avg_acc"], ls=":", lw=1, color="gray")
            ax.annotate(f"task-IL {r['method']}", (1, 100 * r["final_avg_acc"]), fontsize=6, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("replay memory (bytes; 0 drawn at 1)")
    ax.set_ylabel("final accuracy (%)")
    ax.set_title("Class-incremental: final accuracy on all classes against replay memory", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_outputs(results: dict, out_dir: Path | str, command: str = "") -> Path | None:
    """Write results.json, report.md and both PNGs into ``out_dir``; earlier files of those names are
    kept in ``out_dir/replaced-<time>/`` (returned; ``None`` when there were none)."""
    from common.fileio import atomic_write_bytes, make_dir, save_figure

    out_dir = make_dir(out_dir, "--out")
    plt = _pyplot()
    figures = [plot_heatmaps(results), plot_replay(results)]
    try:
        from common.fileio import keeping_earlier

        with keeping_earlier(out_dir, OUTPUT_FILES) as kept:
            atomic_write_bytes(out_dir / RESULTS_FILE, (json.dumps(results, indent=2) + "\n").encode())
            atomic_write_bytes(out_dir / REPORT_FILE, render_report(results, command).encode())
            save_figure(figures[0], out_dir / HEATMAP_FILE, dpi=110)
            save_figure(figures[1], out_dir / REPLAY_PLOT_FILE, dpi=110)
    finally:
        for fig in figures:
            plt.close(fig)
    return kept
