"""``hybnn reproduce --profile transfer-smoke`` end to end, and the transfer report's arithmetic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from simulation.cli import main

ENCODERS = ("mnist", "fashion-mnist", "mnist+fashion-mnist")
DATASETS = ("mnist", "fashion-mnist")
TASKS = ("0v1", "2v3", "4v5", "6v7", "8v9", "all10")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mnist_root) -> Path:
    """A data root that shares MNIST with the repository but keeps its feature cache private."""
    from common.data.datasets import get_dataset

    root = tmp_path_factory.mktemp("transfer")
    (root / "data").mkdir()
    os.symlink(Path(mnist_root).resolve() / "MNIST", root / "data" / "MNIST")
    try:
        get_dataset("fashion-mnist").load(root / "data", "train")
    except Exception as exc:  # noqa: BLE001 - any missing source
        pytest.skip(f"Fashion-MNIST is not available here: {exc}")
    return root


def run(workspace: Path, out: Path, *extra: str) -> int:
    return main(["reproduce", "--profile", "transfer-smoke", "--out", str(out), "--data-root",
                 str(workspace / "data"), "--encoder-dir", str(workspace / "encoders"), *extra])


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def first_run(workspace) -> Path:
    out = workspace / "out"
    assert run(workspace, out) == 0
    return out


def test_results_json_schema(first_run, workspace):
    results = json.loads((first_run / "results.json").read_text())
    assert results["profile"] == "transfer-smoke" and results["schema"] == "hybnn-transfer/1"
    assert list(results["encoders"]) == list(ENCODERS)
    for name, info in results["encoders"].items():
        assert info["datasets"] == name.split("+") and len(info["sha256"]) == 64
        assert info["reused"] is False and info["seconds"] > 0 and info["epochs"] == 1
        manifest = json.loads((workspace / "encoders" / f"encoder-transfer-smoke-{name}" / "manifest.json").read_text())
        assert manifest["datasets"] == info["datasets"]
    assert results["encoders"]["mnist+fashion-mnist"]["train_images"] == 2 * 512
    assert len({info["sha256"] for info in results["encoders"].values()}) == 3
    assert list(results["results"]) == list(ENCODERS)
    for name in ENCODERS:
        assert list(results["results"][name]) == list(DATASETS)
        for dataset in DATASETS:
            assert list(results["results"][name][dataset]) == list(TASKS)
            for task in TASKS:
                models = results["results"][name][dataset][task]
                assert set(models) == {"hybnn", "fp-cnn", "bcnn-centered"}
                for entry in models.values():
                    assert 0.0 <= entry["test_acc"] <= 1.0 and entry["train_seconds"] > 0
                assert models["hybnn"]["epochs"] == 2 and models["fp-cnn"]["epochs"] == 1
                assert models["hybnn"]["num_classes"] == (10 if task == "all10" else 2)
                assert (first_run / models["hybnn"]["model_dir"] / "model.safetensors").is_file()
                # the baselines do not depend on the encoder: one run, the same beside every encoder
                assert models["fp-cnn"] == results["results"]["mnist"][dataset][task]["fp-cnn"]
    assert set(results["stages"]) == {"encoders", "features", "hybnn", "baselines", "report"}
    assert results["machine"]["cpus"] >= 1 and results["total_seconds"] > 0


def test_report_table_and_transfer_statement_follow_the_numbers(first_run):
    from common.experiments.transfer import summarize

    results = json.loads((first_run / "results.json").read_text())
    report = (first_run / "report.md").read_text()
    assert ("| model | mnist pair mean | mnist worst pair | mnist all10 | fashion-mnist pair mean | "
            "fashion-mnist worst pair | fashion-mnist all10 |") in report
    for name in ENCODERS:
        s = summarize(results, name, "fashion-mnist")
        assert f"| HyBNN, encoder `{name}` |" in report
        assert f"{100 * s['pair_mean']:.2f}%" in report and f"{100 * s['all10']:.2f}%" in report
    assert "| fp-cnn (full-precision CNN) |" in report and "| bcnn-centered (binary CNN) |" in report
    in_domain = summarize(results, "mnist", "mnist")["pair_mean"]
    cross = summarize(results, "fashion-mnist", "mnist")["pair_mean"]
    assert (f"cross-domain encoder `fashion-mnist` on mnist: pair mean {100 * cross:.2f}% "
            f"({100 * (cross - in_domain):+.2f} points)") in report
    assert "union encoder `mnist+fashion-mnist` on fashion-mnist" in report


def test_heatmaps_are_valid_pngs(first_run):
    import matplotlib.image

    for name in ("transfer_heatmap.png", "transfer_tasks.png"):
        path = first_run / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300


def test_rerun_reuses_the_encoders_and_keeps_the_earlier_run(first_run, workspace, capsys):
    before = tree(first_run)
    assert run(workspace, first_run, "--tasks", "0v1") == 0
    results = json.loads((first_run / "results.json").read_text())
    assert all(info["reused"] for info in results["encoders"].values())
    assert list(results["results"]["mnist"]["fashion-mnist"]) == ["0v1"]
    kept = list(workspace.glob("out.previous-*"))
    assert len(kept) == 1 and tree(kept[0]) == before
    out = capsys.readouterr().out
    assert "reusing the encoder" in out and "[1/" in out and "earlier run is kept" in out
    assert not list(workspace.glob(".*partial*"))


def test_an_encoder_artifact_as_encoder_dir_is_refused(workspace, capsys):
    artifact = workspace / "encoders" / "encoder-transfer-smoke-mnist"
    code = main(["reproduce", "--profile", "transfer-smoke", "--out", str(workspace / "never"),
                 "--data-root", str(workspace / "data"), "--encoder-dir", str(artifact)])
    err = capsys.readouterr().err
    assert code == 2 and "is an encoder artifact" in err and "parent folder" in err and "Traceback" not in err
    assert not (workspace / "never").exists()


def test_foreign_nonempty_out_is_refused(workspace, capsys):
    foreign = workspace / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert run(workspace, foreign) == 2
    assert "non-empty directory" in capsys.readouterr().err
    assert tree(foreign) == {"notes.txt": b"mine"}


def test_transfer_costs_are_differences_to_the_in_domain_encoder():
    from common.experiments.transfer import new_results, transfer_costs, validate_results

    def entry(acc):
        return {"test_acc": acc}

    results = new_results({"name": "transfer"})
    accs = {  # encoder -> data set -> (pair accuracy, all10)
        "a": {"a": (0.99, 0.95), "b": (0.90, 0.80)},
        "b": {"a": (0.97, 0.91), "b": (0.98, 0.85)},
        "a+b": {"a": (0.985, 0.94), "b": (0.975, 0.84)},
    }
    for name in accs:
        results["encoders"][name] = {"datasets": name.split("+"), "sha256": "0" * 64}
        results["results"][name] = {
            d: {**{t: {"hybnn": entry(p)} for t in ("0v1", "2v3")}, "all10": {"hybnn": entry(a)}}
            for d, (p, a) in accs[name].items()}
    results["results"]["b"]["a"]["2v3"]["hybnn"] = entry(0.95)  # the worst pair
    validate_results(results)
    costs = {c["dataset"]: c for c in transfer_costs(results)}
    assert costs["a"]["in_domain"] == "a" and costs["b"]["in_domain"] == "b"
    others = {o["encoder"]: o for o in costs["a"]["others"]}
    assert others["b"]["kind"] == "cross-domain" and others["a+b"]["kind"] == "union"
    assert others["b"]["pair_mean_points"] == pytest.approx(100 * (0.96 - 0.99))
    assert others["b"]["worst_pair_points"] == pytest.approx(100 * (0.95 - 0.99))
    assert others["b"]["worst_pair_task"] == "2v3"
    assert others["a+b"]["all10_points"] == pytest.approx(100 * (0.94 - 0.95))


def test_a_record_with_an_accuracy_out_of_range_is_refused():
    from common.errors import HyBNNError
    from common.experiments.transfer import new_results, validate_results

    results = new_results({"name": "transfer"})
    results["encoders"]["mnist"] = {"datasets": ["mnist"], "sha256": "0" * 64}
    results["results"]["mnist"] = {"mnist": {"0v1": {"hybnn": {"test_acc": 1.5}}}}
    with pytest.raises(HyBNNError, match="test_acc in"):
        validate_results(results)


def test_interrupted_run_leaves_out_and_encoders_untouched(first_run, workspace, monkeypatch, capsys):
    import common.experiments.baselines

    before, encoders_before = tree(first_run), tree(workspace / "encoders")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.experiments.baselines, "train_baseline", interrupt)
    assert run(workspace, first_run, "--tasks", "0v1") == 130
    assert "interrupted" in capsys.readouterr().err
    assert tree(first_run) == before and tree(workspace / "encoders") == encoders_before
    assert not list(workspace.glob(".*partial*"))
