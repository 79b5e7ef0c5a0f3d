"""The BNN's kernels on this machine, side by side in one run: each first-layer product in a
training epoch, the torch head and the C head.

Usage::

    .venv/bin/python benchmarks/kernels.py [--epochs 2] [--repeats 5] [--batch 10000]

The header names the CPU, the flags that decide which kernels are fast (8-bit dot products,
AVX-512, vector popcount), torch's version and the thread count (one, as the BNN trains).

Training (``common.bnn.training.fit`` with the BNN recipe's batch size and learning rate, on
random codes; the time does not depend on what the codes say), per shape (the pair tasks'
200-128-2 on 12,000 codes, all10's 200-512-10 on 60,000) and per first-layer product
(``common.bnn.product``):

* ``int8``: ``torch._int_mm``, as torch runs it here (oneDNN where torch hands it over);
* ``int8, oneDNN off``: the same call with ``torch.backends.mkldnn`` disabled, torch's plain
  loop: what ``_int_mm`` runs on a CPU without 8-bit dot-product instructions (there torch
  does not hand it to oneDNN), so this row stands in for such a CPU on any machine;
* ``float32``: the float product of the same +-1 values (exact, docs/reproduce.md);
* ``auto``: what the probe picks in that setting, as every command trains.

Each row gives the median seconds per epoch over ``--epochs`` epochs after a warm-up epoch.

Inference, batch ``--batch`` codes, one thread: the torch head (training form, eval mode, the
chosen product) and the C head (``common.edge.export_c``, ``-O3 -march=native`` and the
portable ``-O2``), best of ``--repeats``; predictions compared on every code first.

The last lines are ratios from this one run: ``float32_vs_int8_plain=<x>`` (how much the
float product saves where int8 is the plain loop), ``auto_vs_best=<x>`` (1.00 when the probe
picked the faster product) and ``c_head_codes_per_s=<n>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common.bnn import product
from common.bnn.model import BNN, BNNConfig, codes_to_inputs
from common.bnn.pipeline import HYBNN_TRAIN_CONFIG
from common.bnn.training import fit
from common.edge.deploy import to_deployment
from common.edge.export_c import FAST_FLAGS, STRICT_FLAGS, build_kernel

FLAGS_SHOWN = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_vpopcntdq",
               "avx512_bf16", "amx_int8", "asimddp", "sve")
SHAPES = {"pair 200-128-2": ((128,), 2, 12_000), "all10 200-512-10": ((512,), 10, 60_000)}


@contextlib.contextmanager
def setting(path: str, onednn: bool = True):
    """First-layer product ``path`` (or ``auto``) with oneDNN on or off, for the block."""
    saved = os.environ.get(product.ENV_OVERRIDE)
    os.environ[product.ENV_OVERRIDE] = path
    try:
        with torch.backends.mkldnn.flags(enabled=onednn):
            yield
    finally:
        if saved is None:
            os.environ.pop(product.ENV_OVERRIDE, None)
        else:
            os.environ[product.ENV_OVERRIDE] = saved


def epoch_seconds(hidden: tuple[int, ...], classes: int, n: int, epochs: int) -> float:
    """Median wall seconds of one BNN training epoch (after a warm-up epoch)."""
    rng = np.random.default_rng(0)
    x = codes_to_inputs(rng.integers(0, 256, (n, 25), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, classes, n))
    model = BNN(BNNConfig(in_bits=200, hidden=hidden, num_classes=classes))
    config = replace(HYBNN_TRAIN_CONFIG, epochs=1)
    fit(model, x, y, config, progress=False)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        fit(model, x, y, config, progress=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per row (median)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per inference engine (best)")
    parser.add_argument("--batch", type=int, default=10_000, help="codes per inference call")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # toggling oneDNN makes torch warn about a GPU feature each time
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
    flags = set(product.cpu_flags())
    print(f"cpu:     {product.cpu_model()}, {os.cpu_count()} cpus; flags: "
          + " ".join(f"{f}{'+' if f in flags else '-'}" for f in FLAGS_SHOWN))
    print(f"torch:   {torch.__version__}, 1 thread, oneDNN {'available' if torch.backends.mkldnn.is_available() else 'absent'}; "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as cache:
        os.environ[product.ENV_CACHE_DIR] = cache  # probe afresh, not the user's cached answer
        with setting("auto"):
            on = product.product_choice()
        with setting("auto", onednn=False):
            off = product.product_choice()
    print(f"probe:   {on.describe()}")
    print(f"         with oneDNN off: {off.describe()}")
    print()

    rows = [("int8", "int8", True), ("int8, oneDNN off", "int8", False), ("float32", "float32", True),
            (f"auto ({on.path})", "auto", True), (f"auto, oneDNN off ({off.path})", "auto", False)]
    seconds: dict[tuple[str, str], float] = {}
    print(f"{'BNN training epoch (s)':<34}" + "".join(f"{s:>20}" for s in SHAPES))
    for label, path, onednn in rows:
        with setting(path, onednn):
            for shape, (hidden, classes, n) in SHAPES.items():
                seconds[label, shape] = epoch_seconds(hidden, classes, n, args.epochs)
        print(f"{label:<34}" + "".join(f"{seconds[label, s]:>20.3f}" for s in SHAPES), flush=True)
    print()

    torch.manual_seed(0)
    model = BNN(BNNConfig())
    codes = np.random.default_rng(1).integers(0, 256, (args.batch, 25), dtype=np.uint8)
    x = codes_to_inputs(codes)
    fit(model, x, torch.from_numpy((codes[:, 0] & 1).astype(np.int64)), replace(HYBNN_TRAIN_CONFIG, epochs=1),
        progress=False)  # the head needs trained batch-norm statistics; speed does not depend on them
    model.eval()
    deployed = to_deployment(model)
    work = Path(tempfile.mkdtemp(prefix="hybnn-kernels-"))
    native = build_kernel(deployed, work / "native", FAST_FLAGS)
    portable = build_kernel(deployed, work / "portable", STRICT_FLAGS)

    def torch_head() -> np.ndarray:
        with torch.inference_mode():
            return model(x).argmax(1).numpy()

    want = torch_head()
    for name, kernel in (("native", native), ("portable", portable)):
        agree = float(np.mean(kernel.predict(codes) == want))
        if agree != 1.0:
            raise SystemExit(f"the C head ({name}) agrees with torch on only {agree:.4%} of the codes")
    out = np.empty(len(codes), dtype=np.uint8)
    t_torch = best_time(torch_head, args.repeats)
    t_native = best_time(lambda: native.lib.hybnn_predict_batch(codes.ctypes.data, len(codes), out.ctypes.data),
                         args.repeats)
    t_portable = best_time(lambda: portable.lib.hybnn_predict_batch(codes.ctypes.data, len(codes), out.ctypes.data),
                           args.repeats)
    print(f"{'BNN head 200-128-2, batch ' + str(args.batch):<40}{'codes/s':>14}")
    print(f"{'torch float32 head (' + on.path + ' first layer)':<40}{args.batch / t_torch:>14,.0f}")
    print(f"{'C head -O3 -march=native':<40}{args.batch / t_native:>14,.0f}")
    print(f"{'C head portable -O2':<40}{args.batch / t_portable:>14,.0f}")
    print("(predictions of both C builds equal torch's on every code)")
    print()

    pair = "pair 200-128-2"
    worst_plain = min(seconds["int8, oneDNN off", s] / seconds["float32", s] for s in SHAPES)
    auto_ratio = max(seconds[f"auto ({on.path})", s] / min(seconds["int8", s], seconds["float32", s])
                     for s in SHAPES)
    print(f"int8_vs_float32={seconds['int8', pair] / seconds['float32', pair]:.2f} (pair shape, oneDNN on)")
    print(f"float32_vs_int8_plain={worst_plain:.1f}x faster (worst shape)")
    print(f"auto_vs_best={auto_ratio:.2f}")
    print(f"c_head_codes_per_s={args.batch / t_native:,.0f}")


if __name__ == "__main__":
    main()
