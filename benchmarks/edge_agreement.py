"""Agreement of the numpy engine and the compiled C head with torch, on trained models.

For each task's BNN saved by ``hybnn reproduce`` (``RUN/models/<task>``), classify the
task's whole MNIST test set with torch (eval mode), the numpy engine and the C kernel
built with the strict flags, and print the agreement and the deployment size.

    python benchmarks/edge_agreement.py --run runs/paper --encoder artifacts/encoder-paper
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.bnn.model import codes_to_inputs
from common.bnn.store import load_bnn
from common.data.mnist import DEFAULT_DATA_ROOT
from common.edge.deploy import predict, to_deployment
from common.encoder.artifact import load_encoder_artifact
from common.errors import HyBNNError
from common.edge.export_c import STRICT_FLAGS, build_kernel
from common.encoder.features import load_codes
from common.data.tasks import TASKS, get_task, select_task
from common.bnn.training import predict as torch_predict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a reproduce output directory")
    parser.add_argument("--encoder", type=Path, required=True, help="the encoder artifact the run used")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        artifact = load_encoder_artifact(args.encoder)
        codes, labels = load_codes(artifact, args.data_root, "test", progress=False)
        bits = artifact.config.latent_bits
        all_agree = True
        print(f"{'task':6} {'samples':>7} {'torch acc':>9} {'numpy agree':>11} {'C agree':>8} {'C bytes':>8} {'fp32 bytes':>10}")
        for name in TASKS:
            model_dir = args.run / "models" / name
            if not model_dir.exists():
                continue
            model, _ = load_bnn(model_dir)
            task_codes, task_labels = select_task(codes, labels, get_task(name))
            want = torch_predict(model, codes_to_inputs(task_codes, bits)).numpy()
            deployed = to_deployment(model)
            with tempfile.TemporaryDirectory() as tmp:
                kernel = build_kernel(deployed, Path(tmp), STRICT_FLAGS)
                got_c = kernel.predict(task_codes)
                c_bytes = kernel.model_bytes
            got_np = predict(deployed, task_codes)
            # the whole float32 state dict, batch-norm counters included, as benchmarks/bnn_inference.py counts it
            fp32 = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            agree_np, agree_c = np.mean(got_np == want), np.mean(got_c == want)
            all_agree &= bool(agree_np == 1.0 and agree_c == 1.0)
            print(f"{name:6} {len(want):7d} {np.mean(want == task_labels):9.4f} {agree_np:11.2%} "
                  f"{agree_c:8.2%} {c_bytes:8d} {fp32:10d}")
    except HyBNNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"all_agree={all_agree}")
    return 0 if all_agree else 1


if __name__ == "__main__":
    sys.exit(main())
