"""Sign-flip uplink against the 1-bit sign codec: bits per binary weight and final accuracy.

Usage::

    .venv/bin/python benchmarks/flip_codec.py [--tasks 0v1 2v3 4v5 6v7 8v9] [--rounds 20]
        [--clients 3] [--encoder artifacts/encoder-paper] [--out runs/flip-codec] [--reuse]

For every task it runs ``hybnn federate`` twice with the same seed and otherwise the
command's defaults (IID split, vote aggregation, 2 local epochs, cosine learning rate):
once with ``--uplink-codec signs``, once with ``--uplink-codec flips``. Each run is its own
process, so one Ray session never leaks into the next. ``--reuse`` keeps a finished
run's results.json instead of running it again (to resume an interrupted measurement).
``--flips-lr 0.01`` adds, after all the default runs, one more flip run per task at that
peak learning rate, compared against the default sign-codec run: the learning rate, not
the coding, decides how many signs flip per round.

Reported per task, from results.json (the server measures every reply):

* final global test accuracy with each codec, and the difference in points;
* over rounds 2..R, the mean per client and round of the bits the *binary weights* cost on
  the wire per binary weight (flip header + body, or the packed signs: exactly 1.0), and of
  the *whole uplink record* (batch norm and Flower's record headers included), both
  divided by the number of binary weights;
* the mean fraction of signs flipped against the received global model, per round.

Round 1 is left out of the means: it starts from a random model and about half the
signs flip whatever the codec (the flip payload then falls back to the plain bitmap).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from federate_run import federate

TASKS = ("0v1", "2v3", "4v5", "6v7", "8v9")
CODECS = ("signs", "flips")
TARGET_BITS = 0.25
TARGET_POINTS = 0.1


def run(task: str, uplink_codec: str, args: argparse.Namespace, lr: float | None = None) -> dict:
    """One ``hybnn federate`` run (or its earlier results with ``--reuse``); its results.json."""
    name = f"{task}-{uplink_codec}" + (f"-lr{lr:g}" if lr is not None else "")
    out = Path(args.out) / name
    arguments = ["--task", task, "--clients", str(args.clients), "--rounds", str(args.rounds),
                 "--partition", "iid", "--uplink-codec", uplink_codec, "--encoder", str(args.encoder),
                 "--data-root", str(args.data_root), "--seed", str(args.seed)]
    arguments += ["--lr", str(lr)] if lr is not None else []
    return federate(arguments, f"{task} {uplink_codec}", out, Path(args.out) / f"{name}.log",
                    reuse=args.reuse, rounds=args.rounds)


def mean_after_first(results: dict, key: str) -> float:
    values = [r[key] for r in results["rounds"] if r["round"] >= 2 and r.get(key) is not None]
    return sum(values) / len(values) if values else math.nan


def lr_for_round(server_round: int, rounds: int, lr: float = 0.03) -> float:
    """The clients' learning rate in a round (the ServerApp's cosine schedule, repeated here for the table)."""
    if rounds == 1:
        return lr
    return lr * (0.01 + 0.99 * (1 + math.cos(math.pi * (server_round - 1) / (rounds - 1))) / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--encoder", default="artifacts/encoder-paper")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/flip-codec")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs' results.json")
    parser.add_argument("--flips-lr", type=float, nargs="*", default=[],
                        help="extra flip runs per task at these peak learning rates (after the default runs)")
    args = parser.parse_args()

    rows = []
    per_round: dict[int, list[tuple[float, float]]] = {}
    default_runs = {}
    for task in args.tasks:
        res = default_runs[task] = {name: run(task, name, args) for name in CODECS}
        acc = {name: res[name]["final_test_acc"] for name in CODECS}
        rows.append({
            "task": task,
            "acc_signs": acc["signs"],
            "acc_flips": acc["flips"],
            "diff_points": (acc["flips"] - acc["signs"]) * 100,
            "flip_sign_bits": mean_after_first(res["flips"], "sign_bits_per_binary_weight"),
            "signs_sign_bits": mean_after_first(res["signs"], "sign_bits_per_binary_weight"),
            "flip_record_bits": mean_after_first(res["flips"], "uplink_bits_per_binary_weight"),
            "signs_record_bits": mean_after_first(res["signs"], "uplink_bits_per_binary_weight"),
            "flip_fraction": mean_after_first(res["flips"], "sign_flip_fraction"),
        })
        for r in res["flips"]["rounds"]:
            per_round.setdefault(r["round"], []).append((r["sign_flip_fraction"], r["sign_bits_per_binary_weight"]))

    last = args.rounds
    print()
    print(f"Sign-flip uplink vs 1-bit sign codec: {args.clients} clients, {args.rounds} rounds, IID, "
          f"encoder {args.encoder}, seed {args.seed}; bits per binary weight per client and round, "
          f"mean over rounds 2-{last}")
    print()
    print(f"| task | final acc signs | final acc flips | diff (points) | flips: weight bits/w | "
          f"signs: weight bits/w | flips: whole record bits/w | signs: whole record bits/w | "
          f"signs flipped per round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['acc_signs']:.4f} | {row['acc_flips']:.4f} | {row['diff_points']:+.2f} | "
              f"{row['flip_sign_bits']:.3f} | {row['signs_sign_bits']:.3f} | {row['flip_record_bits']:.3f} | "
              f"{row['signs_record_bits']:.3f} | {100 * row['flip_fraction']:.2f}% |")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "task"}
    print(f"| mean | {mean['acc_signs']:.4f} | {mean['acc_flips']:.4f} | {mean['diff_points']:+.2f} | "
          f"{mean['flip_sign_bits']:.3f} | {mean['signs_sign_bits']:.3f} | {mean['flip_record_bits']:.3f} | "
          f"{mean['signs_record_bits']:.3f} | {100 * mean['flip_fraction']:.2f}% |")
    print()
    print("Per round, flips codec, mean over tasks:")
    print()
    print("| round | client lr | signs flipped | weight bits/w |")
    print("|---|---|---|---|")
    for rnd in sorted(per_round):
        fractions, bits = zip(*per_round[rnd])
        print(f"| {rnd} | {lr_for_round(rnd, args.rounds):.5f} | {100 * sum(fractions) / len(fractions):.2f}% | "
              f"{sum(bits) / len(bits):.3f} |")
    print()
    late = [sum(b for _, b in per_round[k]) / len(per_round[k]) for k in per_round if k > last // 2]
    late_bits = sum(late) / len(late) if late else math.nan
    print(f"Second half (rounds {last // 2 + 1}-{last}), flips codec: {late_bits:.3f} bits per binary weight "
          "per client and round, mean over tasks.")
    worst = max(abs(r["diff_points"]) for r in rows)
    bits_ok = mean["flip_sign_bits"] <= TARGET_BITS
    acc_ok = worst <= TARGET_POINTS
    print(f"Summary: flip coding costs {mean['flip_sign_bits']:.3f} bits per binary weight per client and round "
          f"(rounds 2-{last}, mean over {len(rows)} tasks; the sign codec 1.000), "
          f"{mean['flip_record_bits']:.3f} for the whole uplink record (sign codec {mean['signs_record_bits']:.3f}); "
          f"largest final accuracy difference {worst:.2f} points. Target <= {TARGET_BITS} bits and <= "
          f"{TARGET_POINTS} points: bits {'met' if bits_ok else 'NOT met'}, accuracy {'met' if acc_ok else 'NOT met'}.")
    extra = []
    for lr in args.flips_lr:
        for task in args.tasks:
            flips = run(task, "flips", args, lr=lr)
            signs_acc = default_runs[task]["signs"]["final_test_acc"]
            extra.append({"lr": lr, "task": task, "acc_signs_default_lr": signs_acc,
                          "acc_flips": flips["final_test_acc"],
                          "diff_points": (flips["final_test_acc"] - signs_acc) * 100,
                          "flip_sign_bits": mean_after_first(flips, "sign_bits_per_binary_weight"),
                          "flip_record_bits": mean_after_first(flips, "uplink_bits_per_binary_weight"),
                          "flip_fraction": mean_after_first(flips, "sign_flip_fraction")})
        rows_lr = [e for e in extra if e["lr"] == lr]
        print()
        print(f"Flips at peak lr {lr:g} (cosine) against the sign codec at the default lr:")
        print()
        print("| task | final acc signs (default lr) | final acc flips (lr %g) | diff (points) | flips: weight bits/w | "
              "flips: whole record bits/w | signs flipped per round |" % lr)
        print("|---|---|---|---|---|---|---|")
        for e in rows_lr:
            print(f"| {e['task']} | {e['acc_signs_default_lr']:.4f} | {e['acc_flips']:.4f} | {e['diff_points']:+.2f} | "
                  f"{e['flip_sign_bits']:.3f} | {e['flip_record_bits']:.3f} | {100 * e['flip_fraction']:.2f}% |")
        bits = sum(e["flip_sign_bits"] for e in rows_lr) / len(rows_lr)
        worst_lr = max(abs(e["diff_points"]) for e in rows_lr)
        print()
        print(f"Summary (lr {lr:g}): {bits:.3f} bits per binary weight per client and round, largest final accuracy "
              f"difference against the default sign codec {worst_lr:.2f} points.")
    summary_path = Path(args.out) / "summary.json"
    summary_path.write_text(json.dumps({"rows": rows, "mean": mean, "extra": extra, "per_round": {
        k: {"flip_fraction": sum(f for f, _ in v) / len(v), "sign_bits": sum(b for _, b in v) / len(v)}
        for k, v in per_round.items()}}, indent=2))


if __name__ == "__main__":
    main()
