"""Sign-flip uplink against the 1-bit sign codec: bits per binary weight and final accuracy.

Usage::

    .venv/bin/python benchmarks/flip_codec.py [--tasks 0v1 2v3 4v5 6v7 8v9] [--rounds 20]
        [--clients 3] [--encoder artifacts/encoder-paper] [--data-root data] [--out runs/flip-codec]
        [--reuse] [--flip-blocks 1 2] [--flip-variants 1:0:0.01] [--flips-lr 0.01]

For every task it runs ``hybnn federate`` twice with the same seed and otherwise the
command's defaults (IID split, vote aggregation, threshold batch norm, ...):
once with ``--uplink-codec signs``, once with ``--uplink-codec flips`` (so with the
default ``--flip-blocks``: from round 2 on the clients train, and flip, one block of the
binary weights per round). Each run is its own process, so one Ray session never leaks
into the next. ``--reuse`` keeps a finished run's results.json instead of running it
again (to resume an interrupted measurement, or to print the tables again).

After the default runs come extra flip runs per task, each compared against the default
sign-codec run: ``--flip-blocks 1`` (every weight in every round: the flip codec without
blocks, lossless against the sign codec) or other block counts; ``--flip-variants
BLOCKS:LAST:MARGIN``: ``--flip-blocks``, ``--flip-block-rounds`` and ``--flip-margin`` together
(``1:0:0.01``: every weight, each client puts back the flips that ended less than 0.01 past
zero); ``--flips-lr 0.01``: a lower peak learning rate (the learning rate, not the coding,
decides how many signs training flips).

Reported per task, from results.json (the server measures every reply):

* final global test accuracy with each codec, and the difference in points (the target:
  within 0.2 points on every task);
* over rounds 2..R, the mean per client and round of the bits the *binary weights* cost on
  the wire per binary weight (flip header + body, or the packed signs: exactly 1.0), and of
  the *whole uplink record* (batch norm and Flower's record headers included), both
  divided by the number of binary weights (target: <= 0.25, mean over the tasks);
* the mean share of signs flipped against the received global model, per round.

Round 1 is left out of the means: it starts from a random model and about half the signs
flip whatever the codec (the flip payload then falls back to the plain bitmap; blocks
start in round 2). The per-round table and the "rounds 1-R" line include it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from federate_run import add_federation_options, federate

from common.federated.schedule import lr_for_round

CODECS = ("signs", "flips")
TARGET_BITS = 0.25
TARGET_POINTS = 0.2


def run(task: str, uplink_codec: str, args: argparse.Namespace, lr: float | None = None,
        flip_blocks: int | None = None, flip_block_rounds: int | None = None,
        flip_margin: float | None = None) -> dict:
    """One ``hybnn federate`` run (or its earlier results with ``--reuse``); its results.json."""
    name = f"{task}-{uplink_codec}" + (f"-lr{lr:g}" if lr is not None else "") + (
        f"-blocks{flip_blocks}" if flip_blocks is not None else "") + (
        f"-until{flip_block_rounds}" if flip_block_rounds is not None else "") + (
        f"-m{flip_margin:g}" if flip_margin is not None else "")
    out = Path(args.out) / name
    arguments = ["--task", task, "--clients", str(args.clients), "--rounds", str(args.rounds),
                 "--partition", "iid", "--uplink-codec", uplink_codec, "--encoder", str(args.encoder),
                 "--data-root", str(args.data_root), "--seed", str(args.seed)]
    arguments += ["--lr", str(lr)] if lr is not None else []
    arguments += ["--flip-blocks", str(flip_blocks)] if flip_blocks is not None else []
    arguments += ["--flip-block-rounds", str(flip_block_rounds)] if flip_block_rounds is not None else []
    arguments += ["--flip-margin", f"{flip_margin:g}"] if flip_margin is not None else []
    return federate(arguments, f"{name}", out, Path(args.out) / f"{name}.log",
                    reuse=args.reuse, rounds=args.rounds)


def mean_after_first(results: dict, key: str) -> float:
    values = [r[key] for r in results["rounds"] if r["round"] >= 2 and r.get(key) is not None]
    return sum(values) / len(values) if values else math.nan


def flip_row(flips: dict) -> dict:
    """What a flip run is reported with, beside its accuracy."""
    return {"flip_sign_bits": mean_after_first(flips, "sign_bits_per_binary_weight"),
            "flip_record_bits": mean_after_first(flips, "uplink_bits_per_binary_weight"),
            "flip_fraction": mean_after_first(flips, "sign_flip_fraction"),
            "round_1_sign_bits": flips["rounds"][0]["sign_bits_per_binary_weight"]}


def extra_table(title: str, label: str, entries: list[dict]) -> None:
    """The table of one extra flip setting against the default sign-codec runs."""
    print()
    print(title)
    print()
    print(f"| task | final acc signs (defaults) | final acc flips ({label}) | diff (points) | flips: weight bits/w | "
          "flips: whole record bits/w | signs flipped per round |")
    print("|---|---|---|---|---|---|---|")
    for e in entries:
        print(f"| {e['task']} | {e['acc_signs']:.4f} | {e['acc_flips']:.4f} | {e['diff_points']:+.2f} | "
              f"{e['flip_sign_bits']:.3f} | {e['flip_record_bits']:.3f} | {100 * e['flip_fraction']:.2f}% |")
    bits = sum(e["flip_sign_bits"] for e in entries) / len(entries)
    worst = max(abs(e["diff_points"]) for e in entries)
    print()
    print(f"Summary ({label}): {bits:.3f} bits per binary weight per client and round (rounds 2-R, mean over tasks), "
          f"largest final accuracy difference against the default sign codec {worst:.2f} points.")


def flip_variant(text: str) -> dict:
    """``"BLOCKS:LAST:MARGIN"`` (``"2:3:0"``, ``"1:0:0.01"``) -> the run's flip options."""
    try:
        blocks, last, margin = text.split(":")
        return {"flip_blocks": int(blocks), "flip_block_rounds": int(last), "flip_margin": float(margin)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BLOCKS:LAST:MARGIN (flip-blocks, flip-block-rounds, "
                                         f"flip-margin), got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_federation_options(parser, out="runs/flip-codec")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flips-lr", type=float, nargs="*", default=[],
                        help="extra flip runs per task at these peak learning rates (after the default runs)")
    parser.add_argument("--flip-blocks", type=int, nargs="*", default=[],
                        help="extra flip runs per task with these --flip-blocks values (after the default runs)")
    parser.add_argument("--flip-variants", type=flip_variant, nargs="*", default=[], metavar="BLOCKS:LAST:MARGIN",
                        help="extra flip runs per task with --flip-blocks BLOCKS --flip-block-rounds LAST "
                             "--flip-margin MARGIN")
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
            "signs_sign_bits": mean_after_first(res["signs"], "sign_bits_per_binary_weight"),
            "signs_record_bits": mean_after_first(res["signs"], "uplink_bits_per_binary_weight"),
            **flip_row(res["flips"]),
        })
        for r in res["flips"]["rounds"]:
            per_round.setdefault(r["round"], []).append((r["sign_flip_fraction"], r["sign_bits_per_binary_weight"]))

    last = args.rounds
    config = default_runs[args.tasks[0]]["flips"]["config"]

    def client_lr(server_round: int) -> float:
        """The clients' learning rate in a round, by the run's own schedule."""
        return lr_for_round(config["lr"], config["lr_schedule"], server_round, config["rounds"])

    print()
    print(f"Sign-flip uplink (the command's defaults) vs 1-bit sign codec: {args.clients} clients, {args.rounds} "
          f"rounds, IID, encoder {args.encoder}, seed {args.seed}; bits per binary weight per client and round, "
          f"mean over rounds 2-{last}")
    print()
    print("| task | final acc signs | final acc flips | diff (points) | flips: weight bits/w | "
          "signs: weight bits/w | flips: whole record bits/w | signs: whole record bits/w | "
          "signs flipped per round |")
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
        print(f"| {rnd} | {client_lr(rnd):.5f} | {100 * sum(fractions) / len(fractions):.2f}% | "
              f"{sum(bits) / len(bits):.3f} |")
    print()
    with_first = sum(sum(b for _, b in v) / len(v) for v in per_round.values()) / len(per_round)
    print(f"Rounds 1-{last}, flips codec: {with_first:.3f} bits per binary weight per client and round, mean over "
          f"tasks (round 1 starts from the random initial model and sends about half the signs).")
    worst = max(abs(r["diff_points"]) for r in rows)
    bits_ok = mean["flip_sign_bits"] <= TARGET_BITS
    acc_ok = worst <= TARGET_POINTS
    print(f"Summary: flip coding costs {mean['flip_sign_bits']:.3f} bits per binary weight per client and round "
          f"(rounds 2-{last}, mean over {len(rows)} tasks; the sign codec 1.000), "
          f"{mean['flip_record_bits']:.3f} for the whole uplink record (sign codec {mean['signs_record_bits']:.3f}); "
          f"largest final accuracy difference {worst:.2f} points. Target <= {TARGET_BITS} bits and <= "
          f"{TARGET_POINTS} points on every task: bits {'met' if bits_ok else 'NOT met'}, "
          f"accuracy {'met' if acc_ok else 'NOT met'}.")
    extra = []
    variants = ([(f"--flips-lr {lr:g}", {"lr": lr}) for lr in args.flips_lr]
                + [(f"--flip-blocks {blocks}", {"flip_blocks": blocks}) for blocks in args.flip_blocks]
                + [(f"--flip-blocks {v['flip_blocks']} --flip-block-rounds {v['flip_block_rounds']} "
                    f"--flip-margin {v['flip_margin']:g}", v) for v in args.flip_variants])
    for label, options in variants:
        entries = []
        for task in args.tasks:
            flips = run(task, "flips", args, **options)
            signs_acc = default_runs[task]["signs"]["final_test_acc"]
            entries.append({**options, "task": task, "acc_signs": signs_acc, "acc_flips": flips["final_test_acc"],
                            "diff_points": (flips["final_test_acc"] - signs_acc) * 100, **flip_row(flips)})
        extra_table(f"Flips with {label} against the sign codec with the defaults:", label, entries)
        extra += entries
    summary_path = Path(args.out) / "summary.json"
    summary_path.write_text(json.dumps({"rows": rows, "mean": mean, "extra": extra, "per_round": {
        k: {"flip_fraction": sum(f for f, _ in v) / len(v), "sign_bits": sum(b for _, b in v) / len(v)}
        for k, v in per_round.items()}}, indent=2))


if __name__ == "__main__":
    main()
