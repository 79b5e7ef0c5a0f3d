"""A deploy-local run whose SuperLink is killed mid-run, resumed, against the same run uninterrupted.

Usage::

    .venv/bin/python benchmarks/resume.py [--task 4v5] [--clients 3] [--rounds 5] [--kill-after 2]
        [--encoder artifacts/encoder] [--data-root data] [--out runs/resume-benchmark]

Three runs of ``hybnn deploy-local``'s library function, one after the other, with the same
seed and options (the command's defaults otherwise: IID, vote, 2 local epochs):

1. ``whole``: uninterrupted, ``--rounds`` rounds;
2. ``cut``: the SuperLink (with the ServerApp below it) is SIGKILLed once the checkpoint
   of round ``--kill-after`` is saved; the run publishes what it reached, status ``stopped``;
3. the same folder with ``resume``: the run goes on after the checkpoint's round.

It prints the test accuracy of every round of both runs side by side, the final accuracies
and their difference in points, and whether the final global models are the same bits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from common.errors import HyBNNError
    from simulation.deploy_local import DeployConfig, deploy_local

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="4v5")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kill-after", type=int, default=2)
    parser.add_argument("--encoder", type=Path, default=Path("artifacts/encoder"))
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("runs/resume-benchmark"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    common = dict(task=args.task, clients=args.clients, rounds=args.rounds, encoder=args.encoder,
                  data_root=args.data_root, seed=args.seed, min_nodes=args.clients, progress=False)
    seconds = {}
    start = time.perf_counter()
    whole = deploy_local(DeployConfig(**common, out=args.out / "whole"))
    seconds["whole"] = time.perf_counter() - start

    cut_dir = args.out / "cut"
    start = time.perf_counter()
    try:
        deploy_local(DeployConfig(**common, out=cut_dir, kill_superlink_after_round=args.kill_after))
        print("The run finished before the SuperLink could be killed; nothing to compare.")
        return 1
    except HyBNNError as exc:
        print(f"cut: {exc}")
    seconds["cut"] = time.perf_counter() - start
    stopped = json.loads((cut_dir / "results.json").read_text())
    start = time.perf_counter()
    resumed = deploy_local(DeployConfig(**common, out=cut_dir, resume=cut_dir))
    seconds["resumed"] = time.perf_counter() - start
    server = json.loads((cut_dir / "server.json").read_text())

    print(f"\n{args.task}, {args.clients} clients, {args.rounds} rounds, SuperLink killed after round "
          f"{args.kill_after}; stopped run status {stopped['status']!r} with {len(stopped['rounds'])} rounds; "
          f"resumed after round(s) {server.get('resumed_after_rounds')}")
    print("| round | uninterrupted test acc | stopped + resumed test acc |")
    print("|---|---|---|")
    for a, b in zip(whole["rounds"], resumed["rounds"]):
        print(f"| {a['round']} | {a['test_acc']:.4f} | {b['test_acc']:.4f} |")
    diff = (resumed["final_test_acc"] - whole["final_test_acc"]) * 100
    same = ((args.out / "whole" / "global" / "model.safetensors").read_bytes()
            == (cut_dir / "global" / "model.safetensors").read_bytes())
    print(f"final: uninterrupted {whole['final_test_acc']:.4f}, resumed {resumed['final_test_acc']:.4f}, "
          f"difference {diff:+.2f} points; final global models identical: {same}")
    print(f"rounds completed: {len(resumed['rounds'])} of {args.rounds}; status {resumed['status']}")
    print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return 0 if abs(diff) <= 0.2 and len(resumed["rounds"]) == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
