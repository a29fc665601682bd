"""Prints a run's training curve from <workdir>/metrics.jsonl as a markdown table.

    python tools/curve.py runs/monuseg_cpu [--every 10]
"""

import argparse
import json
import pathlib


def epoch_rows(workdir: pathlib.Path) -> list[dict]:
    """The per-epoch records of a run (those with an 'epoch' field), in order."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "epoch" in record]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("--every", type=int, default=10, help="show every N-th epoch (and the best and last)")
    args = parser.parse_args()
    rows = epoch_rows(args.workdir)
    if not rows:
        raise SystemExit(f"error: {args.workdir / 'metrics.jsonl'} holds no epoch records")
    start = rows[0]["time"] - rows[0].get("epoch_seconds", 0.0)
    best = max(rows, key=lambda r: r.get("val/dice", -1.0))
    print("| epoch | minutes | train loss | val Dice | val mIoU |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        epoch = int(row["epoch"])
        if epoch % args.every and row is not best and row is not rows[-1] and epoch != 1:
            continue
        mark = " (best)" if row is best else ""
        print(f"| {epoch}{mark} | {(row['time'] - start) / 60:.1f} | {row['train/epoch_loss']:.4f} | "
              f"{row.get('val/dice', float('nan')):.2f} | {row.get('val/miou', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
