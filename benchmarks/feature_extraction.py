"""Feature-extraction speed: images per second through the frozen encoder, and bytes per code.

Usage::

    .venv/bin/python benchmarks/feature_extraction.py [--encoder DIR] [--data-root data]
        [--split test] [--batch-size 1024] [--repeats 3] [--threads N]

Without ``--encoder`` a freshly initialised encoder of the default architecture is
timed; the speed does not depend on the weights. Prints the best of ``--repeats``
passes (the first pass also warms up the allocator), and the load average, since a
figure measured while other jobs share the cores is not the machine's speed.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from common.data.mnist import load_mnist
from common.encoder.artifact import load_encoder_artifact
from common.encoder.features import DEFAULT_BATCH_SIZE, encode_images
from common.encoder.vae import Encoder, VAEConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", help="encoder artifact directory (default: a fresh encoder)")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.encoder:
        encoder = load_encoder_artifact(args.encoder).encoder
        source = args.encoder
    else:
        torch.manual_seed(0)
        encoder = Encoder(VAEConfig()).eval().requires_grad_(False)
        source = "fresh encoder (default architecture)"
    images, _ = load_mnist(args.data_root, args.split)

    best = float("inf")
    best_cpu = float("inf")
    codes = None
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        codes = encode_images(encoder, images, batch_size=args.batch_size, progress=False)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    assert codes is not None
    print(f"encoder:          {source}")
    print(f"images:           {len(images)} ({args.split}), batch size {args.batch_size}")
    print(f"torch threads:    {torch.get_num_threads()} (cpu count {os.cpu_count()})")
    print(f"best pass:        {best:.3f} s")
    print(f"images/s:         {len(images) / best:,.0f}")
    # CPU time of this process: a check on the wall-clock figure when other jobs
    # share the cores (it includes OpenMP spin-waits, so it understates the speed).
    print(f"images/cpu-s:     {len(images) / best_cpu:,.0f} (best pass used {best_cpu:.3f} CPU s)")
    print(f"load average:     {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"bytes per sample: {codes.shape[1]} ({codes.shape[1] * 8} bits incl. padding, dtype {codes.dtype})")


if __name__ == "__main__":
    main()
