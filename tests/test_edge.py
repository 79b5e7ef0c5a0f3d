"""The deployment form: exact folding, the numpy engine, the npz file, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.bnn.model import BNN, BNNConfig
from common.edge.deploy import (
    DeployedBNN,
    export_model,
    load_npz,
    predict,
    save_npz,
    to_deployment,
)
from common.errors import HyBNNError
from edge_models import harden, probe_codes, random_codes, torch_predictions, trained_bnn

PAPER = BNNConfig(in_bits=200, hidden=(128,), num_classes=2)
DEEP = BNNConfig(in_bits=203, hidden=(37, 70), num_classes=10)  # padding bits, odd widths, two words
FLAT = BNNConfig(in_bits=200, hidden=(), num_classes=3)


@pytest.fixture(scope="module")
def paper_model() -> BNN:
    return trained_bnn(PAPER)


@pytest.fixture(scope="module", params=[PAPER, DEEP, FLAT], ids=["paper", "deep", "flat"])
def hard_model(request) -> BNN:
    return harden(trained_bnn(request.param, seed=1), seed=2)


def _all_codes(model: BNN, seed: int = 0, n_random: int = 3000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = [random_codes(rng, n_random, model.config.in_bits), probe_codes(model, rng, per_unit=1)]
    nbytes = codes[0].shape[1]
    codes.append(np.zeros((1, nbytes), np.uint8))  # every input bit -1
    codes.append(np.full((1, nbytes), 0xFF, np.uint8))  # every input bit +1
    all_codes = np.concatenate(codes)
    if model.config.in_bits % 8:
        all_codes[:, -1] &= np.uint8((0xFF << (8 - model.config.in_bits % 8)) & 0xFF)
    return all_codes


# ---------------------------------------------------------------- exact agreement
def test_numpy_engine_agrees_with_torch_on_a_trained_bnn(paper_model: BNN) -> None:
    deployed = to_deployment(paper_model)
    codes = _all_codes(paper_model)
    np.testing.assert_array_equal(predict(deployed, codes), torch_predictions(paper_model, codes))
    assert deployed.output.form == "affine"


def test_numpy_engine_agrees_with_torch_on_hard_batch_norms(hard_model: BNN) -> None:
    deployed = to_deployment(hard_model)
    codes = _all_codes(hard_model, seed=3)
    want = torch_predictions(hard_model, codes)
    np.testing.assert_array_equal(predict(deployed, codes), want)
    np.testing.assert_array_equal(predict(deployed, codes, batch_size=7), want)  # chunking is invisible
    assert len(np.unique(want)) > 1  # the test would be empty if every code got one class


def test_thresholds_follow_the_sign_of_the_scale() -> None:
    model = harden(trained_bnn(PAPER, seed=4), seed=5)
    n = PAPER.in_bits
    layer = to_deployment(model).hidden[0]
    gamma = model.hidden_bn[0].weight.detach().numpy()
    beta = model.hidden_bn[0].bias.detach().numpy()
    # unit 0: zero scale -> constant sign(beta): always (p >= 0) or never (p >= n + 1)
    assert not layer.flip[0] and layer.threshold[0] == (0 if beta[0] >= 0 else n + 1)
    assert layer.flip[1] and gamma[1] < 0  # negative scale -> p <= t
    assert not layer.flip[2] and layer.threshold[2] == n + 1  # 1e-30 scale, negative shift: never fires
    moving = (np.abs(gamma) > 1e-20) & (layer.threshold > 0) & (layer.threshold <= n)
    np.testing.assert_array_equal(layer.flip[moving], gamma[moving] < 0)


def test_thresholds_match_the_real_batch_norm_on_every_popcount() -> None:
    """Independent of the tabulation: float64 math gives the same step away from the boundary."""
    model = harden(trained_bnn(PAPER, seed=6), seed=7)
    bn = model.hidden_bn[0]
    layer = to_deployment(model).hidden[0]
    n = PAPER.in_bits
    p = np.arange(n + 1)[:, None]
    g, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    mu, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    y = g * ((2 * p - n) - mu) / np.sqrt(var + bn.eps) + b
    fires = np.where(layer.flip, p <= layer.threshold, p >= layer.threshold)
    clear = np.abs(y) > 1e-4 * (np.abs(b) + np.abs(g) * n)
    np.testing.assert_array_equal(fires[clear], (y >= 0)[clear])


def test_exact_output_ties_go_to_the_first_class() -> None:
    model = trained_bnn(BNNConfig(in_bits=64, hidden=(16,), num_classes=3), seed=8)
    with torch.no_grad():
        model.out.weight.copy_(model.out.weight[0].expand_as(model.out.weight))
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(model.out_bn, name)
            t.copy_(t[0].expand_as(t))
    deployed = to_deployment(model)
    codes = random_codes(np.random.default_rng(0), 500, 64)
    assert (torch_predictions(model, codes) == 0).all()
    assert (predict(deployed, codes) == 0).all()


def test_float_ties_that_no_affine_form_has_fall_back_to_an_exact_table() -> None:
    """Logits near 1e8 round to multiples of 8 in float32: many ties the real values lack."""
    model = trained_bnn(BNNConfig(in_bits=64, hidden=(16,), num_classes=2), seed=9)
    with torch.no_grad():
        model.out_bn.running_mean.zero_()
        model.out_bn.running_var.fill_(1.0)
        model.out_bn.weight.copy_(torch.tensor([1.0, 1.0000001]))
        model.out_bn.bias.copy_(torch.tensor([1e8, 1e8 + 8]))
    deployed = to_deployment(model)
    assert deployed.output.form == "table"
    with pytest.raises(HyBNNError, match="affine"):
        to_deployment(model, output_form="affine")
    codes = _all_codes(model, seed=10)
    want = torch_predictions(model, codes)
    assert len(np.unique(want)) == 2
    np.testing.assert_array_equal(predict(deployed, codes), want)


def test_table_form_agrees_too(hard_model: BNN) -> None:
    deployed = to_deployment(hard_model, output_form="table")
    codes = _all_codes(hard_model, seed=11, n_random=1000)
    np.testing.assert_array_equal(predict(deployed, codes), torch_predictions(hard_model, codes))


def test_one_code_is_one_prediction(paper_model: BNN) -> None:
    deployed = to_deployment(paper_model)
    code = random_codes(np.random.default_rng(12), 1, 200)
    assert predict(deployed, code[0]).tolist() == torch_predictions(paper_model, code).tolist()


def test_conversion_leaves_the_training_mode_alone(paper_model: BNN) -> None:
    paper_model.train()
    try:
        to_deployment(paper_model)
        assert paper_model.training
    finally:
        paper_model.eval()


def test_deployment_is_at_most_a_25th_of_the_float32_state_dict(paper_model: BNN) -> None:
    float_bytes = sum(t.numel() * t.element_size() for t in paper_model.state_dict().values())
    deployed = to_deployment(paper_model)
    assert deployed.nbytes() * 25 <= float_bytes, (deployed.nbytes(), float_bytes)


# ---------------------------------------------------------------- bad input
def test_only_a_trained_bnn_converts() -> None:
    with pytest.raises(HyBNNError, match="only a trained BNN"):
        to_deployment(nn.Linear(200, 2))  # type: ignore[arg-type]
    with pytest.raises(HyBNNError, match="never trained"):
        to_deployment(BNN(PAPER))
    model = trained_bnn(BNNConfig(in_bits=16, hidden=(8,), num_classes=2), samples=64)
    for bn in [*model.hidden_bn, model.out_bn]:  # as after federated averaging: no batch counter
        bn.num_batches_tracked.zero_()
    to_deployment(model)
    with torch.no_grad():
        model.hidden_bn[0].running_var[3] = float("nan")
    with pytest.raises(HyBNNError, match="NaN"):
        to_deployment(model)
    with pytest.raises(HyBNNError, match="output form"):
        to_deployment(trained_bnn(BNNConfig(in_bits=16, hidden=(8,), num_classes=2), samples=64), output_form="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "codes, message",
    [
        (np.zeros((4, 24), np.uint8), r"shape \(4, 24\).*25 bytes"),
        (np.zeros((4, 26), np.uint8), r"shape \(4, 26\)"),
        (np.zeros((2, 3, 25), np.uint8), "shape"),
        (np.zeros((4, 25), np.int64), "dtype int64"),
    ],
)
def test_codes_of_the_wrong_shape_or_type_are_refused(paper_model: BNN, codes: np.ndarray, message: str) -> None:
    with pytest.raises(HyBNNError, match=message):
        predict(to_deployment(paper_model), codes)


def test_inconsistent_deployment_models_are_refused(paper_model: BNN) -> None:
    good = to_deployment(paper_model)
    bad_layer = type(good.hidden[0])(n_in=200, weights=good.hidden[0].weights[:, :24],
                                      threshold=good.hidden[0].threshold, flip=good.hidden[0].flip)
    with pytest.raises(HyBNNError, match="hidden layer 0 weights"):
        DeployedBNN(config=good.config, hidden=(bad_layer,), output=good.output)


# ---------------------------------------------------------------- npz
def test_npz_round_trip(tmp_path, hard_model: BNN) -> None:
    deployed = to_deployment(hard_model)
    path = save_npz(deployed, tmp_path / "m.npz")
    loaded = load_npz(path)
    assert loaded.digest() == deployed.digest() and loaded.config == deployed.config
    codes = _all_codes(hard_model, n_random=500)
    np.testing.assert_array_equal(predict(loaded, codes), torch_predictions(hard_model, codes))


def test_corrupt_npz_files_are_refused(tmp_path, paper_model: BNN) -> None:
    deployed = to_deployment(paper_model)
    path = save_npz(deployed, tmp_path / "m.npz")
    raw = path.read_bytes()

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[: len(raw) // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all" * 10)
    flipped = tmp_path / "flipped.npz"
    mid = bytearray(raw)
    mid[len(raw) // 2] ^= 0x10  # inside the stored weights: the zip CRC or our sha256 catches it
    flipped.write_bytes(bytes(mid))
    for bad in (truncated, garbage, flipped):
        with pytest.raises(HyBNNError, match="export it again|Export it again"):
            load_npz(bad)

    edited = tmp_path / "edited.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["hidden0.threshold"] = arrays["hidden0.threshold"] + 1
    np.savez(edited, **arrays)
    with pytest.raises(HyBNNError, match="sha256"):
        load_npz(edited)

    missing = tmp_path / "missing.npz"
    del arrays["out.weights"]
    np.savez(missing, **arrays)
    with pytest.raises(HyBNNError, match="not a HyBNN deployment model"):
        load_npz(missing)

    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(HyBNNError):
        load_npz(foreign)
    with pytest.raises(HyBNNError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")


def test_export_model_npz_from_a_model_and_from_a_saved_bnn(tmp_path, paper_model: BNN) -> None:
    from common.bnn.store import save_bnn

    (npz,) = export_model(paper_model, tmp_path / "a", "npz")
    saved = save_bnn(paper_model, tmp_path / "bnn", {"task": "synthetic"})
    (npz2,) = export_model(saved, tmp_path / "b", "npz")
    codes = _all_codes(paper_model, n_random=500)
    want = torch_predictions(paper_model, codes)
    for path in (npz, npz2):
        np.testing.assert_array_equal(predict(load_npz(path), codes), want)
    assert load_npz(npz2).meta["source"] == {"task": "synthetic"}
    with pytest.raises(HyBNNError, match="format"):
        export_model(paper_model, tmp_path / "c", "onnx")  # type: ignore[arg-type]
    with pytest.raises(HyBNNError):
        export_model(tmp_path / "no-model-here", tmp_path / "d", "npz")
