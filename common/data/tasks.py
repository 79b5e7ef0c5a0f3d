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

How a class is named (one rule, docs/datasets.md "Tasks"):

* ``#N`` is the class at index ``N`` (0-based, the order ``hybnn data`` prints);
* a token that is a class's name means that class;
* a whole number that is no class's name means the class at that index, except where
  the classes are numbered (every name a whole number, as MNIST's ``0``..``9`` or
  folders ``1``..``10``): there a number is a name, compared as a number (``1`` is
  folder ``01``), never an index;
* a whole number that is the name of one class and the index of another is refused
  as ambiguous; the message says to write ``#N``.

An unknown class, a class in two groups, an empty group, fewer than two groups, or a
class of the task without a sample in a split (:func:`select_task`) is a :class:`HyBNNError`.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from dataclasses import dataclass, field
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
    dataset_classes: tuple[str, ...] = field(default=(), compare=False, repr=False)
    """The data set's class names, index by index: what an error about one class names."""

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


WHOLE_NUMBER = re.compile(r"[0-9]+")
"""ASCII digits only: ``int()`` also takes other scripts' digits, which a class name may hold."""
INDEX_TOKEN = re.compile(r"#([0-9]+)")


def name_key(text: str) -> str:
    """How names compare: Unicode NFC (a name typed and the same name on disk agree),
    without surrounding spaces, case-folded."""
    return unicodedata.normalize("NFC", text).strip().casefold()


def numbered(class_names: Sequence[str]) -> bool:
    """Whether every class name is a whole number (MNIST's digits, folders ``1``..``10``)."""
    return all(WHOLE_NUMBER.fullmatch(n.strip()) for n in class_names)


def _listing(class_names: Sequence[str]) -> str:
    return ", ".join(f"{i}={n}" for i, n in enumerate(class_names))


def _resolve_class(item: str, class_names: Sequence[str], spec: str) -> int | None:
    """The index of class ``item`` under the rule of the module docstring, or ``None``.

    A token that could mean two classes is a :class:`HyBNNError`."""
    text = item.strip()
    m = INDEX_TOKEN.fullmatch(text)
    if m:
        index = int(m.group(1))
        return index if index < len(class_names) else None
    is_number = WHOLE_NUMBER.fullmatch(text) is not None
    if is_number and numbered(class_names):
        hits = [i for i, n in enumerate(class_names) if int(n.strip()) == int(text)]
        if len(hits) > 1:
            raise HyBNNError(
                f"Task {spec!r} names class {text!r}, and {len(hits)} classes have that number "
                f"({', '.join(repr(class_names[i]) for i in hits)}); write one as #N, its index "
                f"(classes: {_listing(class_names)}).")
        return hits[0] if hits else None
    key = name_key(text)
    hits = [i for i, n in enumerate(class_names) if name_key(n) == key]
    if not hits:
        hits = [i for i, n in enumerate(class_names)
                if "/" in n and key in (name_key(part) for part in n.split("/"))]
    if len(hits) > 1:
        raise HyBNNError(
            f"Task {spec!r} names class {text!r}, which is part of the names "
            f"{', '.join(repr(class_names[i]) for i in hits)}; write the whole name, or #N for the "
            f"class at index N (classes: {_listing(class_names)}).")
    by_name = hits[0] if hits else None
    by_index = int(text) if is_number and int(text) < len(class_names) else None
    if by_name is not None and by_index is not None and by_name != by_index:
        raise HyBNNError(
            f"Task {spec!r} is ambiguous: {text!r} is the name of class #{by_name} and the index of "
            f"class #{by_index} ({class_names[by_index]!r}). Write #{by_name} or #{by_index} (#N is "
            f"always the class at index N; quote it in a shell) (classes: {_listing(class_names)}).")
    return by_name if by_name is not None else by_index


def _parse_groups(parts: list[str], class_names: Sequence[str], spec: str, what: str) -> tuple[tuple[int, ...], ...]:
    groups = []
    for part in parts:
        items = part.split(",")
        if not part.strip() or any(not i.strip() for i in items):
            raise HyBNNError(f"Task {spec!r} has an empty group or class; write groups such as "
                             f"3v8, 0,2,4v1,3,5 or 3,5,8.")
        group = []
        for item in items:
            index = _resolve_class(item, class_names, spec)
            if index is None:
                raise HyBNNError(
                    f"Unknown task {spec!r}: it names the class {item.strip()!r}, which {what} does not "
                    f"have. Its classes are {_listing(class_names)}; name them by name, by index or "
                    f"as #index.")
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
                # an ambiguous class says more than a reading that split a name in two
                if first_error is None or ("ambiguous" in str(exc) and "ambiguous" not in str(first_error)):
                    first_error = exc
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
        if text == "all10":  # the first ten classes, by index, whatever their names
            return Task(task.name, task.groups, tuple("+".join(names[c] for c in g) for g in task.groups),
                        names)
        # A named pair is a spec like any other: on folders 1..10, 2v3 is folders 2 and 3.
    try:
        groups = _parse_spec(text, names, what)
    except HyBNNError as exc:
        raise HyBNNError(f"{exc} Named tasks are: {', '.join(TASKS)}.") from None
    return Task(text, groups, tuple("+".join(names[c] for c in g) for g in groups), names)


def task_for_dataset(name: str, dataset) -> Task:
    """:func:`get_task` over the classes of a resolved :class:`common.data.datasets.Dataset` or its name."""
    if isinstance(dataset, str):
        from common.data.datasets import get_dataset

        dataset = get_dataset(dataset)
    return get_task(name, dataset.class_names, dataset.name)


SPLIT_WORDS = {"train": "training", "test": "test"}


def select_task(
    images: np.ndarray, labels: np.ndarray, task: Task, *, split: str | None = None, dataset: str = "",
    require_every_class: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the samples of ``task``'s classes and relabel them by group, 0..num_classes-1.

    For a pair task ``a v b`` class ``a`` becomes 0 and ``b`` 1; every class of a group
    gets the group's index. Works for images and for packed codes alike (any array
    indexed by sample). A class of the task without a sample here is a
    :class:`HyBNNError` naming the class and ``split`` (a model would train, or be
    tested, on what is not there); ``require_every_class=False`` allows it, for one
    client's share of a federation. Labels outside the task's classes are dropped,
    whatever their value (no table is sized by a label).
    """
    labels = np.asarray(labels)
    size = max(task.digits) + 1
    lookup = np.full(size, -1, dtype=np.int64)
    for index, group in enumerate(task.groups):
        lookup[list(group)] = index
    mapped = np.full(labels.shape, -1, dtype=np.int64)
    inside = (labels >= 0) & (labels < size)
    mapped[inside] = lookup[labels[inside].astype(np.int64)]
    mask = mapped >= 0
    if require_every_class:
        check_task_samples(labels[mask], task, split, dataset)
    return images[mask], mapped[mask]


def check_task_samples(labels: np.ndarray, task: Task, split: str | None = None, dataset: str = "") -> None:
    """Refuse ``task`` when one of its classes has no sample among ``labels`` (of ``split``)."""
    labels = np.asarray(labels)
    size = max(task.digits) + 1
    inside = labels[(labels >= 0) & (labels < size)].astype(np.int64)
    counts = np.bincount(inside, minlength=size)
    missing = [c for c in task.digits if counts[c] == 0]
    if not missing:
        return
    names = task.dataset_classes
    listed = ", ".join(f"{names[c]!r} (index {c})" if c < len(names) else f"index {c}" for c in missing)
    word = SPLIT_WORDS.get(split or "", "")
    where = f" in data set {dataset!r}" if dataset else ""
    raise HyBNNError(
        f"Task {task.name!r} has no {word + ' ' if word else ''}sample of class {listed}{where}: a model "
        f"would {'be tested' if split == 'test' else 'train'} on a class that is not there and still report "
        f"an accuracy. Add {word + ' ' if word else ''}images of that class, or write a task of classes "
        f"that have samples in both splits.")
