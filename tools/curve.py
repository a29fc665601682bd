"""A run's training curve from <workdir>/metrics.jsonl as a markdown table, or for several runs
their best-epoch and last-N-epochs validation Dice.

    python tools/curve.py runs/monuseg_cpu [--every 10]
    python tools/curve.py runs/mon/sup25_s0 runs/mon/sup25_s1 runs/mon/sup25_s2 [--last 10]

With few validation images the best epoch's Dice is the maximum of a noisy
curve (it sits a few points above its neighbours); the mean over the last
N validations compares runs without that selection.
"""

import argparse
import json
import pathlib
import statistics


def epoch_rows(workdir: pathlib.Path) -> list[dict]:
    """The per-epoch records of a run (those with an 'epoch' field), in order."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "epoch" in record]


def validation_summary(rows: list[dict], last: int) -> dict:
    """best_epoch, best_dice and last_mean_dice (mean val Dice of the last `last` validated epochs)."""
    validated = [row for row in rows if "val/dice" in row]
    if not validated:
        raise ValueError("no validated epochs")
    best = max(validated, key=lambda r: r["val/dice"])
    return {"epochs": int(rows[-1]["epoch"]), "best_epoch": int(best["epoch"]), "best_dice": best["val/dice"],
            "last_mean_dice": statistics.fmean(row["val/dice"] for row in validated[-last:])}


def print_curve(rows: list[dict], every: int) -> None:
    start = rows[0]["time"] - rows[0].get("epoch_seconds", 0.0)
    best = max(rows, key=lambda r: r.get("val/dice", -1.0))
    print("| epoch | minutes | train loss | val Dice | val mIoU |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        epoch = int(row["epoch"])
        if epoch % every and row is not best and row is not rows[-1] and epoch != 1:
            continue
        mark = " (best)" if row is best else ""
        print(f"| {epoch}{mark} | {(row['time'] - start) / 60:.1f} | {row['train/epoch_loss']:.4f} | "
              f"{row.get('val/dice', float('nan')):.2f} | {row.get('val/miou', float('nan')):.2f} |")


def print_summaries(workdirs: list[pathlib.Path], last: int) -> None:
    summaries = [validation_summary(epoch_rows(w), last) for w in workdirs]
    print(f"| run | epochs | best epoch | best val Dice | mean val Dice, last {last} |")
    print("|---|---:|---:|---:|---:|")
    for workdir, s in zip(workdirs, summaries):
        print(f"| {workdir} | {s['epochs']} | {s['best_epoch']} | {s['best_dice']:.2f} | {s['last_mean_dice']:.2f} |")
    if len(summaries) > 1:
        cells = []
        for key in ("best_dice", "last_mean_dice"):
            values = [s[key] for s in summaries]
            cells.append(f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}")
        print(f"| mean ± sd over {len(summaries)} runs | | | {cells[0]} | {cells[1]} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", type=pathlib.Path, nargs="+")
    parser.add_argument("--every", type=int, default=10, help="one run: show every N-th epoch (and the best and last)")
    parser.add_argument("--last", type=int, default=10, help="several runs: average the last N validations")
    args = parser.parse_args()
    for workdir in args.workdirs:
        if not (workdir / "metrics.jsonl").is_file():
            raise SystemExit(f"error: {workdir / 'metrics.jsonl'} not found")
        if not epoch_rows(workdir):
            raise SystemExit(f"error: {workdir / 'metrics.jsonl'} holds no epoch records")
    if len(args.workdirs) == 1:
        rows = epoch_rows(args.workdirs[0])
        print_curve(rows, args.every)
        if not any("val/dice" in row for row in rows):
            return
        summary = validation_summary(rows, args.last)
        print(f"\nbest val Dice {summary['best_dice']:.2f} at epoch {summary['best_epoch']}; "
              f"mean of the last {args.last} validations {summary['last_mean_dice']:.2f}")
    else:
        print_summaries(args.workdirs, args.last)


if __name__ == "__main__":
    main()
