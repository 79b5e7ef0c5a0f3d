"""results.json checks, report.md rendering and the plots, from a small fake results record."""

from __future__ import annotations

import json

import pytest

from common.experiments import report
from common.experiments.profiles import PROFILES
from common.errors import HyBNNError

H = PROFILES["paper"].bnn_epochs  # the paper profile's BNN epochs on a pair task (80)


def entry(acc: float, seconds: float, epochs: int, samples: int = 12665) -> dict:
    history = [{"epoch": e + 1, "loss": 1.0 / (e + 1), "acc": min(1.0, acc * (e + 1) / epochs)}
               for e in range(epochs)]
    return {"test_acc": acc, "train_seconds": seconds, "epochs": epochs, "history": history,
            "train_samples": samples, "train_config": {"batch_size": 2048}}


def fake_results(federated: bool = True) -> dict:
    results = report.new_results(
        {"name": "paper", "bnn_epochs": H, "baseline_epochs": 15, "train_limit": None},
        {"sha256": "ab" * 32, "variant": "bernoulli-ste", "latent_bits": 200, "epochs": 20,
         "reused": True},
    )
    results["tasks"] = {
        "0v1": {"hybnn": entry(0.9991, 6.0, H), "bcnn-sign": entry(0.5366, 50.0, 15),
                "bcnn-centered": entry(0.9985, 60.0, 15), "fp-cnn": entry(0.9995, 30.0, 15)},
        "all10": {"hybnn": entry(0.91, 10.0, 20, 60000), "bcnn-sign": entry(0.1135, 250.0, 15, 60000),
                  "bcnn-centered": entry(0.97, 300.0, 15, 60000), "fp-cnn": entry(0.99, 150.0, 15, 60000)},
    }
    if federated:
        results["tasks"]["0v1"]["fedhybnn"] = {
            "clients": 3, "rounds_run": 20, "final_test_acc": 0.998, "centralized_acc": 0.999,
            "first_round_within_0_5_points": 3, "uplink_bytes_per_client_round": 4000,
            "float_fedavg_uplink_bytes": 104000, "uplink_fraction_of_float": 4000 / 104000,
            "seconds": 70.0,
        }
    results["tasks"]["0v1"]["hybnn"].update(in_bits=200, hidden=[128], num_classes=2)
    results["tasks"]["all10"]["hybnn"].update(in_bits=200, hidden=[512], num_classes=10)
    results["stages"] = {"encoder": 1.0, "hybnn": 46.0}
    results["total_seconds"] = 900.0
    return results


def test_report_table_has_paper_column_times_and_ratio():
    text = report.render_report(fake_results())
    assert "| model | 0v1 | all10 | paper (pair tasks) |" in text
    assert "| hybnn | 99.91% | 91.00% | >95% |" in text
    assert "| bcnn-sign | 53.66% | 11.35% | ~50% |" in text
    assert "| bcnn-centered | 99.85% | 97.00% | n/a |" in text
    assert "| fp-cnn | 99.95% | 99.00% | n/a |" in text
    assert report.BCNN_SIGN_REASON in text
    assert "| hybnn | 6.0 s | 10.0 s |" in text  # training time per model
    assert "**0.100**" in text
    # 6 s / 80 epochs vs 60 s / 15 epochs (the paper profile's): the run's own ratio, 0.1
    assert f"| 0v1 | 6.0 s / {H} ep | 60.0 s / 15 ep | 0.100 | 0.100 | yes |" in text
    assert "the run meets the target on every task (at most 0.1, 1/10, per task)" in text
    assert "## FedHyBNN" in text and "| 0v1 | 3 clients, 20 rounds | 99.80% | 99.90% | 3 |" in text
    assert "(1/26)" in text
    assert "HyBNN BNN shapes (input bits - hidden units - classes): 0v1 200-128-2, all10 200-512-10." in text


def test_report_names_each_pair_task_that_misses_the_cost_target():
    results = fake_results(federated=False)
    results["tasks"]["2v3"] = {"hybnn": entry(0.99, 5.0, H), "bcnn-centered": entry(0.99, 60.0, 15)}
    results["tasks"]["0v1"]["hybnn"]["train_seconds"] = 7.2
    ratios = report.cost_ratios(results)
    assert ratios["per_task"]["0v1"]["meets_target"] is False
    assert ratios["per_task"]["2v3"]["meets_target"] is True
    assert ratios["meets_target"] is False
    text = report.render_report(results)
    assert f"| 0v1 | 7.2 s / {H} ep | 60.0 s / 15 ep | 0.120 | 0.120 | **no** |" in text
    assert f"| 2v3 | 5.0 s / {H} ep | 60.0 s / 15 ep | 0.083 | 0.083 | yes |" in text
    assert "the run misses the target on 0v1 (at most 0.1" in text
    assert "(target <= 0.1 on every task: missed)" in report.summary_table(results)


def test_cost_table_shows_the_cpu_time_ratio_when_both_runs_recorded_it():
    results = fake_results(federated=False)
    assert "CPU-time ratio" not in report.render_report(results)
    results["tasks"]["0v1"]["hybnn"]["train_cpu_seconds"] = 3.0
    results["tasks"]["0v1"]["bcnn-centered"]["train_cpu_seconds"] = 40.0
    ratio = report.cost_ratios(results)["per_task"]["0v1"]
    assert ratio["cpu_at_paper_epochs"] == pytest.approx(3.0 / 40.0)
    assert ratio["at_paper_epochs"] == pytest.approx(0.1)  # the target is still judged on wall time
    text = report.render_report(results)
    assert f"| 0v1 | 6.0 s / {H} ep | 60.0 s / 15 ep | 0.100 | 0.100 | yes | 0.075 |" in text


def test_cost_ratio_scales_short_profiles_to_paper_epochs_and_samples():
    results = fake_results(federated=False)
    results["tasks"]["0v1"]["hybnn"] = entry(0.99, 1.2, 20)                # 0.06 s/epoch
    results["tasks"]["0v1"]["bcnn-centered"] = entry(0.9, 0.4, 1, 1024)     # 1/12.4 of the samples
    ratio = report.cost_ratios(results)["per_task"]["0v1"]
    assert ratio["measured"] == pytest.approx(3.0)
    expected = (1.2 / 20 / 12665 * H) / (0.4 / 1 / 1024 * 15)
    assert ratio["at_paper_epochs"] == pytest.approx(expected)


def test_summary_table_lists_every_task_and_model():
    text = report.summary_table(fake_results())
    lines = text.splitlines()
    assert lines[0].split() == ["task", "hybnn", "bcnn-sign", "bcnn-centered", "fp-cnn", "fedhybnn"]
    assert lines[1].startswith("0v1") and "99.91%" in lines[1] and "99.80%" in lines[1]
    assert lines[2].startswith("all10") and lines[2].rstrip().endswith("-")
    assert "(target <= 0.1 on every task: met)" in text


def test_write_outputs_writes_json_report_and_nonempty_pngs(tmp_path):
    results = fake_results()
    paths = report.write_outputs(results, tmp_path)
    names = {p.name for p in paths}
    assert names == {"results.json", "report.md", "accuracy.png", "training_0v1.png", "training_all10.png"}
    for p in paths:
        assert p.stat().st_size > 0
    for png in ("accuracy.png", "training_0v1.png", "training_all10.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.read_results(tmp_path) == json.loads(json.dumps(results))
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("encoder"), "lacks 'encoder'"),
    (lambda r: r.update(schema="other"), "schema"),
    (lambda r: r["tasks"]["0v1"]["hybnn"].update(test_acc=99.9), "not a fraction in [0, 1]"),
    (lambda r: r["tasks"]["0v1"]["fp-cnn"].pop("epochs"), "lacks 'epochs'"),
])
def test_validate_rejects_bad_records(mutate, message):
    results = fake_results()
    mutate(results)
    with pytest.raises(HyBNNError, match=message.replace("[", r"\[").replace("]", r"\]")):
        report.validate_results(results)


def test_read_results_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(HyBNNError, match="results.json"):
        report.read_results(tmp_path)


def test_the_paper_bnn_trains_at_most_600_steps_worth_of_epochs():
    paper = PROFILES["paper"]
    assert paper.bnn_epochs_for(12_665, 2048) == 80   # a pair task: 7 steps an epoch
    assert paper.bnn_epochs_for(60_000, 2048) == 20   # all10: 30 steps an epoch
    assert paper.bnn_epochs_for(10, 2048) == 80 and paper.bnn_epochs_for(10**7, 2048) == 1
    assert PROFILES["quick"].bnn_epochs_for(60_000, 2048) == PROFILES["quick"].bnn_epochs


def test_cost_ratio_of_all10_is_judged_at_its_paper_epochs():
    results = fake_results(federated=False)
    # an all10 BNN trained 80 epochs (40 s) compares as its paper-profile 20 epochs would (10 s)
    results["tasks"]["all10"]["hybnn"] = entry(0.98, 40.0, 80, 60000)
    ratio = report.cost_ratios(results)["per_task"]["all10"]
    assert ratio["measured"] == pytest.approx(40.0 / 300.0)
    assert ratio["at_paper_epochs"] == pytest.approx(10.0 / 300.0)
    assert ratio["meets_target"] is True
