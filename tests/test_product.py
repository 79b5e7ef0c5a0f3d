"""The BNN's first-layer product: int8 and float32 give the same numbers; the faster is chosen."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from common.bnn import product
from common.bnn.model import BNN, BNNConfig
from common.errors import HyBNNError


@pytest.fixture
def fresh_choice(tmp_path: Path, monkeypatch):
    """A private cache folder and no remembered choice, so each test probes or reads anew."""
    monkeypatch.setenv(product.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(product.ENV_OVERRIDE, raising=False)
    monkeypatch.setattr(product, "_chosen", {})
    return tmp_path / "bnn-product.json"


def _train_step(path: str, monkeypatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    monkeypatch.setenv(product.ENV_OVERRIDE, path)
    torch.manual_seed(0)
    model = BNN(BNNConfig(in_bits=200, hidden=(64,), num_classes=3))
    x = torch.randint(0, 2, (96, 200), generator=torch.Generator().manual_seed(1), dtype=torch.int8) * 2 - 1
    x[:5] = 0  # input dropout zeroes codes: still exact in both products
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, torch.arange(96) % 3).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_int8_and_float32_products_give_identical_logits_and_gradients(monkeypatch):
    logits_int8, grads_int8 = _train_step("int8", monkeypatch)
    logits_float, grads_float = _train_step("float32", monkeypatch)
    assert torch.equal(logits_int8, logits_float)
    for a, b in zip(grads_int8, grads_float):
        assert torch.equal(a, b)


def test_the_faster_measured_product_is_chosen_and_cached(fresh_choice, monkeypatch):
    monkeypatch.setattr(product, "measure", lambda: (3.0, 1.0))
    choice = product.product_choice()
    assert (choice.path, choice.reason) == ("float32", "probe")
    assert "int8 3.00 ms, float32 1.00 ms" in choice.describe()
    record = json.loads(fresh_choice.read_text())
    assert [e["path"] for e in record["machines"].values()] == ["float32"]

    monkeypatch.setattr(product, "_chosen", {})
    monkeypatch.setattr(product, "measure", lambda: pytest.fail("a cached choice is measured again"))
    again = product.product_choice()
    assert (again.path, again.reason) == ("float32", "cached probe")


def test_a_real_probe_picks_one_product_and_both_agree(fresh_choice):
    choice = product.product_choice()
    assert choice.path in product.PRODUCTS and choice.int8_ms > 0 and choice.float32_ms > 0
    assert choice.path == ("int8" if choice.int8_ms < choice.float32_ms else "float32")


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"version": 1, "machines": "x"}),
    json.dumps({"version": 1, "machines": {"KEY": {"path": "int4", "int8_ms": 1, "float32_ms": 2}}}),
    json.dumps({"version": 1, "machines": {"KEY": {"path": "int8", "int8_ms": "fast", "float32_ms": 2}}}),
    # a choice that contradicts its own times (an edited file) is not believed
    json.dumps({"version": 1, "machines": {"KEY": {"path": "int8", "int8_ms": 9.0, "float32_ms": 1.0}}}),
])
def test_a_damaged_or_edited_cache_is_ignored_and_measured_again(fresh_choice, monkeypatch, caplog, content):
    fresh_choice.write_text(content.replace("KEY", product.machine_key()))
    monkeypatch.setattr(product, "measure", lambda: (1.0, 2.0))
    with caplog.at_level(logging.WARNING, logger=product.__name__):
        choice = product.product_choice()
    assert (choice.path, choice.reason) == ("int8", "probe")
    assert "Ignoring the BNN product cache" in caplog.text
    assert json.loads(fresh_choice.read_text())["machines"][product.machine_key()]["path"] == "int8"


def test_an_unwritable_cache_still_gives_a_choice(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(product.ENV_CACHE_DIR, str(blocker / "sub"))
    monkeypatch.delenv(product.ENV_OVERRIDE, raising=False)
    monkeypatch.setattr(product, "_chosen", {})
    monkeypatch.setattr(product, "measure", lambda: (2.0, 1.0))
    with caplog.at_level(logging.WARNING, logger=product.__name__):
        assert product.product_choice().path == "float32"
    assert "Could not cache the BNN product choice" in caplog.text


def test_the_override_wins_and_a_wrong_value_is_refused(fresh_choice, monkeypatch):
    monkeypatch.setattr(product, "measure", lambda: pytest.fail("an override is not measured"))
    monkeypatch.setenv(product.ENV_OVERRIDE, "int8")
    assert product.product_choice() == product.ProductChoice("int8", product.ENV_OVERRIDE)
    monkeypatch.setenv(product.ENV_OVERRIDE, "int4")
    with pytest.raises(HyBNNError, match="HYBNN_PRODUCT='int4' is not a product"):
        product.product_choice()


def test_the_cache_key_follows_the_thread_count(monkeypatch):
    threads = torch.get_num_threads()
    one = product.machine_key()
    torch.set_num_threads(threads + 1)
    try:
        assert product.machine_key() != one
    finally:
        torch.set_num_threads(threads)
