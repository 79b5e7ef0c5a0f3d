"""The outputs of ``hybnn reproduce --profile transfer``: results.json, report.md, heatmaps.

The transfer experiment asks what the frozen encoder costs on data it was not trained
on. results.json (``SCHEMA``) is the record; the report and the plots are rendered from
it, so they can be redrawn from an old record with :func:`write_outputs`::

    {
      "schema": "hybnn-transfer/1",
      "profile": "transfer",
      "profile_config": {...},                      # common.experiments.profiles.TransferProfile
      "encoders": {
        "mnist": {"datasets": ["mnist"], "sha256": ..., "path": ..., "reused": bool,
                  "seconds": ..., "epochs": ..., "train_images": ..., ...},
        "fashion-mnist": {...}, "mnist+fashion-mnist": {...}
      },
      "results": {
        ENCODER: {DATASET: {TASK: {
            "hybnn":         {"test_acc", "train_seconds", "epochs", "history", ...},
            "fp-cnn":        {"test_acc", "train_seconds", ...},   # trained once per
            "bcnn-centered": {"test_acc", "train_seconds", ...}    # (DATASET, TASK)
        }}}
      },
      "stages": {"encoders": s, "features": s, "hybnn": s, "baselines": s, "report": s},
      "machine": {"cpus", "torch_threads", "torch_version", "load_start", "load_end"},
      "total_seconds": ...
    }

The baselines do not use the encoder: each (data set, task) is trained once and the
same entry stands beside every encoder. Accuracies are fractions in [0, 1] on the
task's test images of DATASET. Plots use matplotlib's Agg backend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from common.errors import HyBNNError
from common.fileio import atomic_write_bytes, make_dir, save_figure

SCHEMA = "hybnn-transfer/1"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
HEATMAP_PLOT = "transfer_heatmap.png"
TASK_HEATMAP_PLOT = "transfer_tasks.png"
BASELINE_MODELS: tuple[str, ...] = ("fp-cnn", "bcnn-centered")
MODELS: tuple[str, ...] = ("hybnn", *BASELINE_MODELS)
PAIR_TASKS: tuple[str, ...] = ("0v1", "2v3", "4v5", "6v7", "8v9")
MODEL_LABELS = {
    "hybnn": "HyBNN",
    "fp-cnn": "fp-cnn (full-precision CNN)",
    "bcnn-centered": "bcnn-centered (binary CNN)",
}


# ------------------------------------------------------------------ schema
def new_results(profile: dict) -> dict:
    """An empty transfer record for ``profile`` (a TransferProfile dict)."""
    return {
        "schema": SCHEMA,
        "profile": profile["name"],
        "profile_config": dict(profile),
        "encoders": {},
        "results": {},
        "stages": {},
        "total_seconds": None,
    }


def _is_acc(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and 0.0 <= value <= 1.0


def validate_results(results: dict) -> None:
    """Raise :class:`HyBNNError` unless ``results`` has the shape of a transfer results.json."""
    def bad(why: str) -> HyBNNError:
        return HyBNNError(f"This results record is not a {SCHEMA} record: {why}. "
                          "Run `hybnn reproduce --profile transfer` again to write a fresh one.")

    if not isinstance(results, dict) or results.get("schema") != SCHEMA:
        raise bad("its schema field is missing or different")
    encoders, table = results.get("encoders"), results.get("results")
    if not isinstance(encoders, dict) or not isinstance(table, dict):
        raise bad("'encoders' and 'results' must be objects")
    for name, info in encoders.items():
        if not isinstance(info, dict) or not isinstance(info.get("datasets"), list) \
                or not isinstance(info.get("sha256"), str):
            raise bad(f"encoder {name!r} lacks its 'datasets' list or 'sha256'")
    for name, per_dataset in table.items():
        if name not in encoders:
            raise bad(f"results name encoder {name!r}, which 'encoders' does not describe")
        if not isinstance(per_dataset, dict):
            raise bad(f"results of encoder {name!r} must be an object")
        for dataset, per_task in per_dataset.items():
            if not isinstance(per_task, dict):
                raise bad(f"results of {name!r} on {dataset!r} must be an object")
            for task, models in per_task.items():
                if not isinstance(models, dict):
                    raise bad(f"results of {name!r} on {dataset!r} {task!r} must be an object")
                for model, entry in models.items():
                    if not isinstance(entry, dict) or not _is_acc(entry.get("test_acc")):
                        raise bad(f"{name!r} / {dataset!r} / {task!r} / {model!r} has no test_acc in [0, 1]")


def read_results(path: Path | str) -> dict:
    """Read and check a transfer results.json."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise HyBNNError(f"Cannot read {path} as JSON ({exc}).") from exc
    validate_results(results)
    return results


# ------------------------------------------------------------------ numbers
def _models(results: dict, encoder: str, dataset: str, model: str) -> dict[str, float]:
    """``{task: test_acc}`` of ``model`` under ``encoder`` on ``dataset``'s tasks."""
    per_task = results["results"].get(encoder, {}).get(dataset, {})
    return {task: entry[model]["test_acc"] for task, entry in per_task.items() if model in entry}


def summarize(results: dict, encoder: str, dataset: str, model: str = "hybnn") -> dict:
    """Pair mean, worst pair (and which) and all10 of ``model`` under ``encoder`` on ``dataset``.

    A value is ``None`` where the run did not include the tasks it needs.
    """
    accs = _models(results, encoder, dataset, model)
    pairs = {t: a for t, a in accs.items() if t in PAIR_TASKS}
    worst = min(pairs, key=pairs.get) if pairs else None
    return {
        "pair_mean": sum(pairs.values()) / len(pairs) if pairs else None,
        "worst_pair": pairs[worst] if worst else None,
        "worst_pair_task": worst,
        "all10": accs.get("all10"),
    }


def _datasets(results: dict) -> list[str]:
    seen: dict[str, None] = {}
    for per_dataset in results["results"].values():
        for dataset in per_dataset:
            seen.setdefault(dataset, None)
    return list(seen)


def _tasks(results: dict, dataset: str) -> list[str]:
    seen: dict[str, None] = {}
    for per_dataset in results["results"].values():
        for task in per_dataset.get(dataset, {}):
            seen.setdefault(task, None)
    return list(seen)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 100 * (a - b)


def transfer_costs(results: dict) -> list[dict]:
    """Per task data set D: HyBNN under the encoder trained on D alone (in-domain), under
    each encoder trained on other data only (cross-domain) and under each encoder whose
    data include D and more (union), with the differences to in-domain in points."""
    encoders = results["encoders"]
    out = []
    for dataset in _datasets(results):
        in_domain = [n for n, e in encoders.items() if e["datasets"] == [dataset] and n in results["results"]]
        if not in_domain:
            continue
        base = summarize(results, in_domain[0], dataset)
        others = []
        for name, info in encoders.items():
            if name == in_domain[0] or name not in results["results"]:
                continue
            kind = "union" if dataset in info["datasets"] else "cross-domain"
            s = summarize(results, name, dataset)
            others.append({"encoder": name, "kind": kind, **s,
                           "pair_mean_points": _diff(s["pair_mean"], base["pair_mean"]),
                           "worst_pair_points": _diff(s["worst_pair"], base["worst_pair"]),
                           "all10_points": _diff(s["all10"], base["all10"])})
        out.append({"dataset": dataset, "in_domain": in_domain[0], **base, "others": others})
    return out


# ------------------------------------------------------------------ report
def _pct(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.2f}%"


def _pts(points: float | None) -> str:
    return "-" if points is None else f"{points:+.2f} points"


def _secs(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _baseline_source(results: dict, dataset: str) -> str | None:
    """An encoder whose rows carry the baselines of ``dataset`` (they are the same under each)."""
    for name, per_dataset in results["results"].items():
        if any(set(BASELINE_MODELS) & set(m) for m in per_dataset.get(dataset, {}).values()):
            return name
    return None


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The main table: a row per encoder (HyBNN) and per baseline; per data set its pair
    mean, worst pair and all10."""
    datasets = _datasets(results)
    header = ["model"]
    for dataset in datasets:
        header += [f"{dataset} pair mean", f"{dataset} worst pair", f"{dataset} all10"]

    def cells(encoder: str | None, dataset: str, model: str) -> list[str]:
        if encoder is None:
            return ["-", "-", "-"]
        s = summarize(results, encoder, dataset, model)
        worst = "-" if s["worst_pair"] is None else f"{_pct(s['worst_pair'])} ({s['worst_pair_task']})"
        return [_pct(s["pair_mean"]), worst, _pct(s["all10"])]

    rows = []
    for name in results["encoders"]:
        row = [f"HyBNN, encoder `{name}`"]
        for dataset in datasets:
            row += cells(name if name in results["results"] else None, dataset, "hybnn")
        rows.append(row)
    for model in BASELINE_MODELS:
        row = [MODEL_LABELS[model]]
        for dataset in datasets:
            row += cells(_baseline_source(results, dataset), dataset, model)
        rows.append(row)
    return header, rows


def cost_statements(results: dict) -> list[str]:
    """Plain sentences on what transfer costs, computed from the record."""
    lines = []
    for cost in transfer_costs(results):
        d = cost["dataset"]
        lines.append(
            f"On {d}, the in-domain encoder (`{cost['in_domain']}`) gives a pair mean of "
            f"{_pct(cost['pair_mean'])}, worst pair {_pct(cost['worst_pair'])}, all10 {_pct(cost['all10'])}.")
        for other in cost["others"]:
            lines.append(
                f"- {other['kind']} encoder `{other['encoder']}` on {d}: pair mean "
                f"{_pct(other['pair_mean'])} ({_pts(other['pair_mean_points'])}), worst pair "
                f"{_pct(other['worst_pair'])} ({_pts(other['worst_pair_points'])}), all10 "
                f"{_pct(other['all10'])} ({_pts(other['all10_points'])}) against in-domain.")
    return lines


def render_report(results: dict) -> str:
    """report.md of a transfer record."""
    validate_results(results)
    config = results.get("profile_config", {})
    lines = [f"# HyBNN transfer between data sets: profile `{results['profile']}`", ""]
    if results["profile"] != "transfer":
        lines += ["This is a reduced profile: its accuracies say nothing about the method.", ""]
    lines += [
        "Each encoder is a binary-latent VAE pretrained on the data named in its row and then "
        "frozen; HyBNN trains only the BNN on its codes "
        f"({config.get('bnn_epochs', '?')} epochs) for each task of each data set. The baselines "
        f"({config.get('baseline_epochs', '?')} epochs) train on the task's images and do not use an "
        "encoder, so their rows are the same for every encoder. Accuracies are on the task's test "
        "images; the pair mean averages 0v1 2v3 4v5 6v7 8v9.",
        "",
    ]
    header, rows = table_rows(results)
    lines += [_markdown_table(header, rows), ""]
    statements = cost_statements(results)
    if statements:
        lines += ["## What transfer costs", "",
                  "Differences are HyBNN test accuracy in percentage points against the encoder "
                  "trained on the task's own data set (negative: worse).", ""]
        lines += statements + [""]
    lines += ["## Encoders", ""]
    enc_rows = []
    for name, info in results["encoders"].items():
        enc_rows.append([f"`{name}`", " + ".join(info["datasets"]), str(info.get("epochs", "-")),
                         str(info.get("train_images", "-")),
                         "reused" if info.get("reused") else _secs(info.get("seconds")),
                         f"`{info['sha256'][:16]}`"])
    lines += [_markdown_table(["encoder", "trained on", "VAE epochs", "images", "pretraining", "sha256"],
                              enc_rows), ""]
    lines += ["## Per task", ""]
    for dataset in _datasets(results):
        tasks = _tasks(results, dataset)
        rows = []
        for name in results["encoders"]:
            accs = _models(results, name, dataset, "hybnn")
            rows.append([f"HyBNN, encoder `{name}`"] + [_pct(accs.get(t)) for t in tasks])
        source = _baseline_source(results, dataset)
        for model in BASELINE_MODELS:
            accs = _models(results, source, dataset, model) if source else {}
            rows.append([MODEL_LABELS[model]] + [_pct(accs.get(t)) for t in tasks])
        lines += [f"### {dataset}", "", _markdown_table(["model", *tasks], rows), ""]
    lines += ["## Time", ""]
    stage_rows = [[stage, _secs(s)] for stage, s in results.get("stages", {}).items()]
    stage_rows.append(["total", _secs(results.get("total_seconds"))])
    lines += [_markdown_table(["stage", "time"], stage_rows), ""]
    machine = results.get("machine") or {}
    if machine:
        lines += [f"Machine: {machine.get('cpus')} CPUs, {machine.get('torch_threads')} torch threads, "
                  f"torch {machine.get('torch_version')}, load average {machine.get('load_start')} at the "
                  f"start and {machine.get('load_end')} at the end.", ""]
    lines += [f"Plots: `{HEATMAP_PLOT}` (HyBNN pair mean and all10, encoder by task data set), "
              f"`{TASK_HEATMAP_PLOT}` (HyBNN per task).", ""]
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    """The main table as plain text for the terminal."""
    header, rows = table_rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [header, *rows])


# ------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heatmap(ax, values: list[list[float | None]], rows: list[str], cols: list[str], title: str) -> None:
    import numpy as np

    data = np.array([[np.nan if v is None else 100 * v for v in row] for row in values], dtype=float)
    finite = data[np.isfinite(data)]
    low = float(finite.min()) if finite.size else 0.0
    ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=min(low, 99.0) - 0.5, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30 if len(cols) > 4 else 0, ha="right" if len(cols) > 4 else "center")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            text = "-" if not np.isfinite(data[i, j]) else f"{data[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", color="white" if np.isfinite(data[i, j])
                    and data[i, j] < (low + 100) / 2 else "black", fontsize=8)


def plot_heatmaps(results: dict, out_dir: Path) -> list[Path]:
    """``transfer_heatmap.png``: HyBNN pair mean and all10 (%), encoder's data (rows) by
    task's data set (columns); ``transfer_tasks.png``: HyBNN per task."""
    plt = _pyplot()
    encoders = list(results["encoders"])
    datasets = _datasets(results)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(datasets) * 2, 1.2 + 0.7 * len(encoders)))
    for ax, key, title in zip(axes, ("pair_mean", "all10"), ("HyBNN pair mean (%)", "HyBNN all10 (%)")):
        values = [[summarize(results, e, d)[key] for d in datasets] for e in encoders]
        _heatmap(ax, values, [f"encoder {e}" for e in encoders], [f"tasks of {d}" for d in datasets], title)
    fig.tight_layout()
    heatmap = save_figure(fig, out_dir / HEATMAP_PLOT, dpi=110)
    plt.close(fig)

    cols = [(d, t) for d in datasets for t in _tasks(results, d)]
    fig, ax = plt.subplots(figsize=(2 + 0.8 * len(cols), 1.2 + 0.7 * len(encoders)))
    values = [[_models(results, e, d, "hybnn").get(t) for d, t in cols] for e in encoders]
    _heatmap(ax, values, [f"encoder {e}" for e in encoders], [f"{d} {t}" for d, t in cols],
             "HyBNN test accuracy per task (%)")
    fig.tight_layout()
    tasks = save_figure(fig, out_dir / TASK_HEATMAP_PLOT, dpi=110)
    plt.close(fig)
    return [heatmap, tasks]


# ------------------------------------------------------------------ all outputs
def write_outputs(results: dict, out_dir: Path | str) -> list[Path]:
    """Write results.json, report.md and the heatmaps into ``out_dir``; return the paths."""
    validate_results(results)
    out_dir = make_dir(out_dir)
    results_path = out_dir / RESULTS_FILE
    atomic_write_bytes(results_path, (json.dumps(results, indent=2) + "\n").encode())
    report_path = out_dir / REPORT_FILE
    atomic_write_bytes(report_path, render_report(results).encode())
    return [results_path, report_path, *plot_heatmaps(results, out_dir)]
