"""Classification tasks: the paper's named tasks, and task specs the user writes.

Named tasks (MNIST digits, or the first ten classes of any data set): the five pairs
of consecutive classes ``0v1 2v3 4v5 6v7 8v9`` and ``all10``.

A task spec lists class groups; each group becomes one output class:

* ``3v8``: class 3 against class 8;
* ``0,2,4,6,8v1,3,5,7,9``: even against odd (each side of ``v`` is one output class);
* ``3,5,8``: a three-class task (each listed class is its own output class);
* class names where the data set has them: ``Shirt v T-shirt`` (case-insensitive; a
  name with a ``/`` also answers to each of its parts, so ``T-shirt`` is
  ``T-shirt/top``). When a name holds the letter v, write the groups apart with
  spaces around the ``v``.

An unknown class, a class in two groups, an empty group, or fewer than two groups is
a :class:`HyBNNError`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from common.errors import HyBNNError

DIGIT_NAMES = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class Task:
    """A task: its name (or spec) and, per output class, the data set's classes it takes."""

    name: str
    groups: tuple[tuple[int, ...], ...]
    class_names: tuple[str, ...] = ()
    """One name per output class (``"3"``, ``"Shirt"``, ``"0+2+4+6+8"``)."""

    @property
    def num_classes(self) -> int:
        return len(self.groups)

    @property
    def digits(self) -> tuple[int, ...]:
        """The data set's classes the task uses, in output-class order."""
        return tuple(c for g in self.groups for c in g)

    @property
    def slug(self) -> str:
        """The name made safe as a file or folder name."""
        return re.sub(r"[^A-Za-z0-9._,+-]+", "_", self.name).strip("_") or "task"

    def to_dict(self) -> dict:
        return {"spec": self.name, "groups": [list(g) for g in self.groups],
                "class_names": list(self.class_names)}


def _named(name: str, groups: tuple[tuple[int, ...], ...]) -> Task:
    return Task(name, groups, tuple("+".join(DIGIT_NAMES[c] for c in g) for g in groups))


TASKS: dict[str, Task] = {
    name: _named(name, tuple((d,) for d in digits))
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
MAX_SPLIT_POINTS = 12
"""More letters v than this in one spec are not tried as separators one by one."""


def _resolve_class(item: str, class_names: Sequence[str]) -> int | None:
    """The index of class ``item`` (an index or a name), or ``None``."""
    text = item.strip()
    if re.fullmatch(r"\d+", text):
        index = int(text)
        return index if index < len(class_names) else None
    low = text.lower()
    for i, name in enumerate(class_names):
        if name.lower() == low:
            return i
    for i, name in enumerate(class_names):
        if "/" in name and low in (part.strip().lower() for part in name.split("/")):
            return i
    return None


def _parse_groups(parts: list[str], class_names: Sequence[str], spec: str, what: str) -> tuple[tuple[int, ...], ...]:
    groups = []
    for part in parts:
        items = part.split(",")
        if not part.strip() or any(not i.strip() for i in items):
            raise HyBNNError(f"Task {spec!r} has an empty group or class; write groups such as "
                             f"3v8, 0,2,4v1,3,5 or 3,5,8.")
        group = []
        for item in items:
            index = _resolve_class(item, class_names)
            if index is None:
                raise HyBNNError(
                    f"Unknown task {spec!r}: it names the class {item.strip()!r}, which {what} does not "
                    f"have. Its classes are {', '.join(f'{i}={n}' for i, n in enumerate(class_names))}; "
                    f"name them by index or name.")
            group.append(index)
        groups.append(tuple(group))
    seen: dict[int, int] = {}
    for g, group in enumerate(groups):
        for c in group:
            if c in seen:
                raise HyBNNError(f"Task {spec!r} puts class {class_names[c]!r} in two groups (or twice in "
                                 f"one); each class may appear once.")
            seen[c] = g
    if len(groups) < 2:
        raise HyBNNError(f"Task {spec!r} has one class group; a task needs at least two "
                         f"(for example 3v8 or 3,5,8).")
    return tuple(groups)


def _parse_spec(spec: str, class_names: Sequence[str], what: str) -> tuple[tuple[int, ...], ...]:
    text = spec.strip()
    if " v " in text:
        return _parse_groups(text.split(" v "), class_names, spec, what)
    cuts = [i for i, ch in enumerate(text) if ch in "vV"]
    if not cuts:
        items = text.split(",")
        if len(items) == 1:
            raise HyBNNError(f"Task {spec!r} has one class; a task needs at least two groups "
                             f"(for example 3v8 or 3,5,8).")
        return _parse_groups(items, class_names, spec, what)
    # The letter v separates groups, but class names may hold it too ("Pullover"): try
    # each choice of separators and keep the ones under which every class resolves.
    if len(cuts) > MAX_SPLIT_POINTS:
        raise HyBNNError(f"Task {spec!r} has too many letters v to read; write the groups apart with "
                         f"spaces around the v (A v B).")
    found: list[tuple[tuple[int, ...], ...]] = []
    first_error: HyBNNError | None = None
    for n in range(len(cuts), -1, -1):
        for chosen in itertools.combinations(cuts, n):
            bounds = [-1, *chosen, len(text)]
            parts = [text[a + 1:b] for a, b in zip(bounds, bounds[1:])]
            if n == 0:
                parts = text.split(",")
            try:
                groups = _parse_groups(parts, class_names, spec, what)
            except HyBNNError as exc:
                first_error = first_error or exc
                continue
            if groups not in found:
                found.append(groups)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise HyBNNError(f"Task {spec!r} can be read in more than one way; write the groups apart with "
                         f"spaces around the v (A v B).")
    assert first_error is not None
    raise first_error


def get_task(name: str, class_names: Sequence[str] | None = None, dataset: str = "mnist") -> Task:
    """The task called or specified by ``name`` over ``class_names`` (default: the ten digits).

    ``dataset`` only names the data set in error messages.
    """
    names = tuple(class_names) if class_names is not None else DIGIT_NAMES
    what = f"data set {dataset!r}"
    text = str(name).strip()
    if not text:
        raise HyBNNError(f"Empty task. Valid tasks are: {', '.join(TASKS)}, or a spec such as 3v8.")
    if text in TASKS:
        task = TASKS[text]
        if max(task.digits) >= len(names):
            raise HyBNNError(f"Task {text!r} needs classes 0..{max(task.digits)}, but {what} has "
                             f"{len(names)} classes; write a spec of its classes instead (for example 0v1).")
        return Task(task.name, task.groups, tuple("+".join(names[c] for c in g) for g in task.groups))
    try:
        groups = _parse_spec(text, names, what)
    except HyBNNError as exc:
        raise HyBNNError(f"{exc} Named tasks are: {', '.join(TASKS)}.") from None
    return Task(text, groups, tuple("+".join(names[c] for c in g) for g in groups))


def task_for_dataset(name: str, dataset) -> Task:
    """:func:`get_task` over the classes of a resolved :class:`common.data.datasets.Dataset` or its name."""
    if isinstance(dataset, str):
        from common.data.datasets import get_dataset

        dataset = get_dataset(dataset)
    return get_task(name, dataset.class_names, dataset.name)


def select_task(
    images: np.ndarray, labels: np.ndarray, task: Task
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the samples of ``task``'s classes and relabel them by group, 0..num_classes-1.

    For a pair task ``a v b`` class ``a`` becomes 0 and ``b`` 1; every class of a group
    gets the group's index. Works for images and for packed codes alike (any array
    indexed by sample).
    """
    labels = np.asarray(labels)
    size = max(int(labels.max(initial=0)), max(task.digits)) + 1
    lookup = np.full(size, -1, dtype=np.int64)
    for index, group in enumerate(task.groups):
        lookup[list(group)] = index
    mask = lookup[labels] >= 0
    return images[mask], lookup[labels[mask]]
