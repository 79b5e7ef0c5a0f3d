"""The classification tasks: five pairs of consecutive digits, as in the paper, and all ten."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import HyBNNError


@dataclass(frozen=True)
class Task:
    name: str
    digits: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.digits)


TASKS: dict[str, Task] = {
    name: Task(name, digits)
    for name, digits in {
        "0v1": (0, 1),
        "2v3": (2, 3),
        "4v5": (4, 5),
        "6v7": (6, 7),
        "8v9": (8, 9),
        "all10": tuple(range(10)),
    }.items()
}
PAIR_TASKS: tuple[str, ...] = ("0v1", "2v3", "4v5", "6v7", "8v9")


def get_task(name: str) -> Task:
    """The task called ``name``, or a :class:`HyBNNError` that lists the valid names."""
    try:
        return TASKS[name]
    except KeyError:
        raise HyBNNError(
            f"Unknown task {name!r}. Valid tasks are: {', '.join(TASKS)}."
        ) from None


def select_task(
    images: np.ndarray, labels: np.ndarray, task: Task
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the samples of ``task``'s digits and relabel them 0..num_classes-1.

    For a pair task ``a v b`` digit ``a`` becomes class 0 and ``b`` class 1.
    Works for images and for packed codes alike (any array indexed by sample).
    """
    mask = np.isin(labels, task.digits)
    lookup = np.full(10, -1, dtype=np.int64)
    lookup[list(task.digits)] = np.arange(task.num_classes)
    return images[mask], lookup[labels[mask]]
