"""A run's training curve from <workdir>/metrics.jsonl as a markdown table; for several runs their best-epoch
and last-N-epochs validation Dice.

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
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from amvlm_jax.train.logging import null_as_nan  # noqa: E402 (after the path above)


def epoch_rows(workdir: pathlib.Path) -> list[dict]:
    """The per-epoch records of a run (those with an 'epoch' field), in order.

    The training loop appends one line per record, so a killed run can leave its last line cut short:
    that line is skipped with a note. Any other line that is no JSON record is an error.
    """
    path = workdir / "metrics.jsonl"
    lines = path.read_bytes().splitlines()  # Line by line: a kill or a damaged disk may leave bytes that are no UTF-8.
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # Also a UnicodeDecodeError.
            if number == len(lines):
                print(f"note: {path}: line {number} is cut short (a killed run?); skipped", file=sys.stderr)
                break
            raise SystemExit(f"error: {path}: line {number} is not a JSON record") from None
        if not isinstance(record, dict):
            raise SystemExit(f"error: {path}: line {number} is not a JSON record")
        records.append(null_as_nan(record))  # Every field is a number: a null was a NaN (json_text).
    return [record for record in records if "epoch" in record]


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
    validated = [row for row in rows if "val/dice" in row]
    best = max(validated, key=lambda r: r["val/dice"]) if validated else None  # Never validated: no best epoch.
    print("| epoch | minutes | train loss | val Dice | val mIoU |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        epoch = int(row["epoch"])
        if epoch % every and row is not best and row is not rows[-1] and epoch != 1:
            continue
        mark = " (best)" if row is best else ""
        print(f"| {epoch}{mark} | {(row['time'] - start) / 60:.1f} | {row['train/epoch_loss']:.4f} | "
              f"{row.get('val/dice', float('nan')):.2f} | {row.get('val/miou', float('nan')):.2f} |")


def print_summaries(runs: list[tuple[pathlib.Path, list[dict]]], last: int) -> None:
    """The table of several runs: (workdir, its ``epoch_rows``) each."""
    for workdir, rows in runs:
        if not any("val/dice" in row for row in rows):
            raise SystemExit(f"error: {workdir / 'metrics.jsonl'}: no validated epochs (val/dice) to compare")
    summaries = [validation_summary(rows, last) for _, rows in runs]
    print(f"| run | epochs | best epoch | best val Dice | mean val Dice, last {last} |")
    print("|---|---:|---:|---:|---:|")
    for (workdir, _), s in zip(runs, summaries):
        print(f"| {workdir} | {s['epochs']} | {s['best_epoch']} | {s['best_dice']:.2f} | {s['last_mean_dice']:.2f} |")
    if len(summaries) > 1:
        cells = []
        for key in ("best_dice", "last_mean_dice"):
            values = [s[key] for s in summaries]
            cells.append(f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}")
        print(f"| mean ± sd over {len(summaries)} runs | | | {cells[0]} | {cells[1]} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("workdirs", type=pathlib.Path, nargs="+")
    parser.add_argument("--every", type=int, default=10, help="one run: show every N-th epoch (and the best and last)")
    parser.add_argument("--last", type=int, default=10, help="the mean of the last N validations (beside the best epoch)")
    args = parser.parse_args()
    for flag, value in (("--every", args.every), ("--last", args.last)):
        if value < 1:
            raise SystemExit(f"error: {flag} {value}: must be 1 or more")
    runs = []
    for workdir in args.workdirs:
        if not (workdir / "metrics.jsonl").is_file():
            pretraining = (workdir / "pretrain" / "metrics.jsonl").is_file()
            raise SystemExit(f"error: {workdir / 'metrics.jsonl'} not found" + (
                " (a pre-training run: tools/pretrain_table.py tabulates what it learned)" if pretraining else ""))
        rows = epoch_rows(workdir)
        if not rows:
            raise SystemExit(f"error: {workdir / 'metrics.jsonl'} holds no epoch records")
        # A pre-training run logs its evaluation before training as epoch 0, without a training loss.
        if any("train/epoch_loss" not in row for row in rows):
            raise SystemExit(f"error: {workdir / 'metrics.jsonl'}: epochs without train/epoch_loss: "
                             "not a segmentation run's curve (a pre-training run's?)")
        runs.append((workdir, rows))
    if len(runs) == 1:
        rows = runs[0][1]
        print_curve(rows, args.every)
        if not any("val/dice" in row for row in rows):
            return
        summary = validation_summary(rows, args.last)
        print(f"\nbest val Dice {summary['best_dice']:.2f} at epoch {summary['best_epoch']}; "
              f"mean of the last {args.last} validations {summary['last_mean_dice']:.2f}")
    else:
        print_summaries(runs, args.last)


if __name__ == "__main__":
    main()
