"""BNN head inference speed, side by side in one run: torch float32, the numpy engine, compiled C.

Usage::

    .venv/bin/python benchmarks/bnn_inference.py [--model DIR] [--encoder DIR --task 0v1]
        [--data-root data] [--batch 10000] [--single 2000] [--repeats 7] [--compare-ref REV]

What is timed (one thread everywhere: ``torch.set_num_threads(1)``, numpy's popcount is
single-threaded, the C kernel is plain sequential code):

* torch float32: the training-form BNN in eval mode under ``torch.inference_mode``, fed
  the +-1 float tensor (unpacking the codes is *not* timed, which favours torch);
* numpy: :func:`common.edge.deploy.predict` on the packed codes;
* C: ``hybnn.c`` from :mod:`common.edge.export_c`, compiled with ``cc -O3 -march=native``
  (and, for reference, with ``-O3 -march=x86-64-v3``, AVX2 without AVX-512, where the
  CPU has AVX2, and with the portable test flags ``-O2`` without ``-march``), loaded
  with ctypes. ``--compare-ref REV`` also times the C that ``export_c.py`` of git
  revision ``REV`` generates, with the same flags, in the same run.

Batch ``--batch`` (default 10,000): one call per engine (``hybnn_predict_batch`` for C).
Batch 1: one call per sample for every engine, over ``--single`` samples: torch on a
``(1, 200)`` tensor, numpy on one code, C through ``hybnn_predict`` (one ctypes call per
sample, so the ctypes call cost is included). Each figure is the best of ``--repeats``
passes. Before timing, the three engines' predictions are compared on every sample.

The model: ``--model`` (a BNN saved by ``hybnn train``), else a BNN of ``--hidden``
units (default 128, the paper's shape 200 -> 128 -> 2) and ``--classes`` classes trained
for one epoch on synthetic codes; speed does not depend on the weights. The codes: the MNIST test set of ``--task`` encoded by ``--encoder``, else
random codes. The last line is ``c_vs_torch_batch10k=<ratio>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.bnn.model import BNN, BNNConfig, codes_to_inputs
from common.edge.deploy import predict as numpy_predict
from common.edge.deploy import save_npz, to_deployment
from common.edge.export_c import AVX2_FLAGS, FAST_FLAGS, STRICT_FLAGS, CKernel, build_kernel, generate_c
from common.bnn.training import TrainConfig, fit


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def synthetic_model(config: BNNConfig, seed: int = 0) -> BNN:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (4096, -(-config.in_bits // 8)), dtype=np.uint8)
    x = codes_to_inputs(codes, config.in_bits)
    scores = x.numpy() @ rng.standard_normal((config.in_bits, config.num_classes)).astype(np.float32)
    y = torch.from_numpy(scores.argmax(1).astype(np.int64))
    model = BNN(config)
    fit(model, x, y, TrainConfig(epochs=1, seed=seed), progress=False)
    return model.eval()


def load_inputs(args: argparse.Namespace, in_bits: int, n: int) -> tuple[np.ndarray, str]:
    if args.encoder:
        from common.encoder.artifact import load_encoder_artifact
        from common.encoder.features import load_codes
        from common.data.tasks import get_task, select_task

        artifact = load_encoder_artifact(args.encoder)
        codes, labels = load_codes(artifact, args.data_root, "test", progress=False)
        codes, _ = select_task(codes, labels, get_task(args.task))
        source = f"MNIST test set, task {args.task}, encoder {args.encoder}"
    else:
        codes = np.random.default_rng(1).integers(0, 256, (n, -(-in_bits // 8)), dtype=np.uint8)
        source = "random codes"
    if len(codes) < n:  # repeat the test set up to the batch size
        source += f" ({len(codes)} codes, repeated)"
        codes = np.concatenate([codes] * (-(-n // len(codes))))
    return np.ascontiguousarray(codes[:n]), source


def cpuinfo(field: str) -> str:
    """The first ``field`` line of /proc/cpuinfo (Linux), "" elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == field), "")


def cpu_has_avx2() -> bool:
    """Whether this CPU runs AVX2 code; elsewhere the AVX2 build is not timed."""
    return "avx2" in cpuinfo("flags").split()


def export_c_at_revision(revision: str, folder: Path):
    """``common/edge/export_c.py`` as it was at git ``revision``, imported as a module of its own."""
    repo = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{revision}:common/edge/export_c.py"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "export_c_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("export_c_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a BNN saved by `hybnn train` (default: a synthetic one)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128],
                        help="the synthetic BNN's hidden widths (all10's shape: --hidden 512 --classes 10)")
    parser.add_argument("--classes", type=int, default=2, help="the synthetic BNN's classes")
    parser.add_argument("--encoder", help="encoder artifact for real codes (default: random codes)")
    parser.add_argument("--task", default="0v1")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--single", type=int, default=2_000, help="samples timed one call at a time")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compare-ref", metavar="REV",
                        help="also time the C generated by common/edge/export_c.py at this git revision")
    args = parser.parse_args()

    torch.set_num_threads(1)
    if args.model:
        from common.bnn.store import load_bnn

        model, _ = load_bnn(args.model)
        model_source = args.model
    else:
        config = BNNConfig(hidden=tuple(args.hidden), num_classes=args.classes)
        model = synthetic_model(config)
        model_source = "synthetic BNN, one epoch on random codes"
    model.eval()
    deployed = to_deployment(model)
    work = Path(tempfile.mkdtemp(prefix="hybnn-bench-"))
    kernel = build_kernel(deployed, work / "native", FAST_FLAGS)
    portable = build_kernel(deployed, work / "portable", STRICT_FLAGS)
    # further C builds timed at batch size: (label, kernel)
    extra: list[tuple[str, CKernel]] = []
    if cpu_has_avx2():
        extra.append(("C -O3 -march=x86-64-v3 (ctypes)", build_kernel(deployed, work / "avx2", AVX2_FLAGS)))
    if args.compare_ref:
        reference = export_c_at_revision(args.compare_ref, work / "ref")
        extra.append((f"C {args.compare_ref} -march=native",
                      reference.build_kernel(deployed, work / "ref-native", FAST_FLAGS)))
        if cpu_has_avx2():
            extra.append((f"C {args.compare_ref} -march=x86-64-v3",
                          reference.build_kernel(deployed, work / "ref-avx2", AVX2_FLAGS)))
        extra.append((f"C {args.compare_ref} portable -O2",
                      reference.build_kernel(deployed, work / "ref-portable", STRICT_FLAGS)))
    codes, code_source = load_inputs(args, model.config.in_bits, args.batch)
    x = codes_to_inputs(codes, model.config.in_bits)

    def torch_batch() -> np.ndarray:
        with torch.inference_mode():
            return model(x).argmax(1).numpy()

    # ---- agreement on every sample before any timing
    want = torch_batch()
    agree = {
        "numpy": float(np.mean(numpy_predict(deployed, codes) == want)),
        "C": float(np.mean(kernel.predict(codes) == want)),
        "C portable": float(np.mean(portable.predict(codes) == want)),
        **{label.replace(" (ctypes)", ""): float(np.mean(k.predict(codes) == want)) for label, k in extra},
    }

    # ---- batch = args.batch
    t_torch = best_time(torch_batch, args.repeats)
    t_numpy = best_time(lambda: numpy_predict(deployed, codes), args.repeats)
    out = np.empty(len(codes), dtype=np.uint8)
    t_c = best_time(lambda: kernel.lib.hybnn_predict_batch(codes.ctypes.data, len(codes), out.ctypes.data), args.repeats)
    t_cp = best_time(lambda: portable.lib.hybnn_predict_batch(codes.ctypes.data, len(codes), out.ctypes.data),
                     max(1, args.repeats // 2))
    t_extra = [best_time(lambda k=k: k.lib.hybnn_predict_batch(codes.ctypes.data, len(codes), out.ctypes.data),
                         args.repeats) for _, k in extra]

    # ---- batch 1: one call per sample
    m = min(args.single, len(codes))
    rows = [x[i : i + 1] for i in range(m)]
    singles = [np.ascontiguousarray(codes[i]) for i in range(m)]
    ptrs = [c.ctypes.data for c in singles]

    def torch_single() -> None:
        with torch.inference_mode():
            for r in rows:
                int(model(r).argmax(1))

    def numpy_single() -> None:
        for c in singles:
            numpy_predict(deployed, c)

    def c_single(fn=kernel.lib.hybnn_predict) -> None:
        for p in ptrs:
            fn(p)

    reps1 = max(1, args.repeats // 2)
    s_torch = best_time(torch_single, reps1)
    s_numpy = best_time(numpy_single, reps1)
    s_c = best_time(c_single, reps1)

    # ---- sizes
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    _, _, c_bytes = generate_c(deployed)
    npz_bytes = save_npz(deployed, work / "model.npz").stat().st_size

    n = len(codes)
    rate = lambda seconds, count: count / seconds  # noqa: E731
    print(f"model:   {model_source} ({model.config.in_bits}-{'-'.join(map(str, model.config.hidden))}-"
          f"{model.config.num_classes}, output form {deployed.output.form})")
    print(f"inputs:  {code_source}, {n} samples")
    print(f"machine: {cpuinfo('model name') or platform.processor() or platform.machine()}, {os.cpu_count()} cpus; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread; numpy {np.__version__}; C flags {' '.join(FAST_FLAGS)}")
    print(f"agreement with torch on all {n} samples: " + ", ".join(f"{k} {v:.2%}" for k, v in agree.items()))
    print()
    print(f"{'engine':<32}{'batch ' + str(n) + ' (samples/s)':>26}{'batch 1 (samples/s)':>22}{'model bytes':>14}")
    print(f"{'torch float32 (eval)':<32}{rate(t_torch, n):>26,.0f}{rate(s_torch, m):>22,.0f}{float_bytes:>14,}")
    print(f"{'numpy engine (bitwise_count)':<32}{rate(t_numpy, n):>26,.0f}{rate(s_numpy, m):>22,.0f}"
          f"{deployed.nbytes():>14,}")
    print(f"{'C -O3 -march=native (ctypes)':<32}{rate(t_c, n):>26,.0f}{rate(s_c, m):>22,.0f}{kernel.model_bytes:>14,}")
    for (label, _), seconds in zip(extra, t_extra):
        print(f"{label:<32}{rate(seconds, n):>26,.0f}")
    print(f"{'C portable -O2 (ctypes)':<32}{rate(t_cp, n):>26,.0f}{'':>22}{portable.model_bytes:>14,}")
    print(f"(npz file of the deployment form: {npz_bytes:,} bytes)")
    print()
    print(f"numpy vs torch: batch {n} {t_torch / t_numpy:.2f}x, batch 1 {s_torch / s_numpy:.2f}x")
    print(f"C vs torch:     batch {n} {t_torch / t_c:.2f}x, batch 1 {s_torch / s_c:.2f}x")
    print(f"C vs numpy:     batch {n} {t_numpy / t_c:.2f}x, batch 1 {s_numpy / s_c:.2f}x")
    print(f"size: float32 state dict / C arrays = {float_bytes / c_bytes:.1f}x, "
          f"/ numpy arrays = {float_bytes / deployed.nbytes():.1f}x")
    print(f"c_vs_torch_batch{n // 1000}k={t_torch / t_c:.2f}" if n % 1000 == 0 else f"c_vs_torch_batch{n}={t_torch / t_c:.2f}")


if __name__ == "__main__":
    main()
