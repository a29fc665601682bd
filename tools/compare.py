"""Compares segmentation runs: mean Dice/mIoU per run and a paired t-test on per-image Dice.

    python tools/compare.py runs/unet25 runs/mt25 runs/amvlm25 [--split test] [--baseline runs/unet25]

Each RUN is a workdir holding per_image_<split>.csv (written by every job
that evaluates); the first run is the baseline unless --baseline names
another. Several workdirs can be pooled into one row with commas
(runs/a_s0,runs/a_s1,runs/a_s2): their per-image Dice values are concatenated
in order, so pooled rows pair up when the same seeds are listed in the same
order. The pooled test counts every image of every seed as a pair, so it
treats the same image under three seeds as three independent samples; where
both rows pool the same number of runs over the same images, two tests
without that assumption are added: on the images' Dice averaged over the
runs (n = images) and on the runs' mean Dice (n = runs, seeds paired in
order). Prints a markdown table; --json prints the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import sys

import numpy as np
from scipy import stats


COLUMNS = ("file", "dice", "iou")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from amvlm_jax.train.logging import json_text  # noqa: E402 (after the path above)


def read_per_image(workdir: str | pathlib.Path, split: str) -> dict[str, np.ndarray]:
    """{'file': names, 'dice': (N,), 'iou': (N,), 'masks': (N,)} from <workdir>/per_image_<split>.csv (Dice
    and IoU in percent), sorted by image name (runs pair image by image whatever order their rows were
    written in). 'masks' repeats the split's digest of the true masks from results.json ('' where an older
    or re-evaluated run has none) so that runs scored against other masks under the same names are not paired."""
    path = pathlib.Path(workdir) / f"per_image_{split}.csv"
    if not path.is_file():
        if not path.parent.is_dir():
            raise SystemExit(f"error: {path.parent}: no such folder")
        # per_image_guidance_<split>.csv holds a mean teacher's pseudo-label scores, no per-image Dice.
        others = sorted(found.stem.removeprefix("per_image_") for found in path.parent.glob("per_image_*.csv")
                        if not found.stem.startswith("per_image_guidance_"))
        if others:
            hint = f"it has {', '.join(others)}: --split {others[0]}"
        elif (path.parent / "pretrain" / "summary.json").is_file() or (path.parent / "summary.json").is_file():
            hint = "a pre-training run: tools/pretrain_table.py tabulates what it learned"
        else:
            hint = "run an evaluation of this workdir first"
        raise SystemExit(f"error: {path}: no per-image results ({hint})")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            fieldnames = reader.fieldnames or []
            rows = [(reader.line_num, row) for row in reader]
        except UnicodeDecodeError as error:
            raise SystemExit(f"error: {path}: not UTF-8 text ({error.reason}); evaluate the workdir "
                             "again (--config.mode=evaluate) to rewrite it") from None
    missing = [name for name in COLUMNS if name not in fieldnames]
    if missing:
        raise SystemExit(f"error: {path}: no column {', '.join(missing)} (a per-image CSV has {', '.join(COLUMNS)})")
    if not rows:
        raise SystemExit(f"error: {path}: no images, only a header")
    values = {"file": np.array([row["file"] for _, row in rows])}
    for name in ("dice", "iou"):
        column = []
        for line, row in rows:
            try:
                column.append(float(row[name]))
            except (TypeError, ValueError):  # TypeError: a row shorter than the header.
                raise SystemExit(f"error: {path}: line {line}: {name} {row[name]!r} is not a number") from None
            if not math.isfinite(column[-1]):  # An image's Dice is always defined: 'nan' made every mean and p NaN.
                raise SystemExit(f"error: {path}: line {line}: {name} {row[name]!r} is not a finite number")
        values[name] = np.array(column)
    values["masks"] = np.full(len(rows), masks_digest(path.parent, split), dtype=object)
    order = np.argsort(values["file"], kind="stable")
    return {name: column[order] for name, column in values.items()}


def masks_digest(workdir: pathlib.Path, split: str) -> str:
    """The digest of the true masks the workdir's last evaluation of `split` scored against, or ''."""
    try:
        summary = json.loads((workdir / "results.json").read_text()).get(split)
    except (OSError, ValueError, AttributeError):  # No results.json, not JSON, or not an object.
        return ""
    return summary.get("masks", "") if isinstance(summary, dict) else ""


def check_pairs(base: dict[str, np.ndarray], run: dict[str, np.ndarray], base_name: str, run_name: str) -> None:
    """Stops unless the pooled runs hold the same images, scored against the same masks where both say."""
    if not np.array_equal(run["file"], base["file"]):
        raise SystemExit(f"error: {run_name} and {base_name} hold different images; a paired test needs the same ones")
    known = (run["masks"] != "") & (base["masks"] != "")
    if np.any(run["masks"][known] != base["masks"][known]):
        raise SystemExit(f"error: {run_name} and {base_name} scored images of the same names against different "
                         "masks (other data, data seed or image size: results.json 'masks'); a paired test needs "
                         "the same ones")


def read_parts(spec: str, split: str) -> list[dict[str, np.ndarray]]:
    """The per-image results of each comma-joined workdir of `spec`."""
    workdirs = spec.split(",")
    if not all(workdirs):  # An empty name would read per_image_<split>.csv of the current folder.
        raise SystemExit(f"error: '{spec}': an empty workdir name (a comma at an end or two in a row)")
    # The same run twice would count its images twice in the pooled test and give the seed tests a seed twice.
    resolved = [pathlib.Path(p).resolve() for p in workdirs]
    if len(set(resolved)) < len(resolved):
        twice = next(p for p, r in zip(workdirs, resolved) if resolved.count(r) > 1)
        raise SystemExit(f"error: '{spec}': {twice} is listed twice; pool each run once")
    return [read_per_image(p, split) for p in workdirs]


def pool(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The parts concatenated image by image (seeds pooled in the order listed)."""
    return {k: np.concatenate([p[k] for p in parts]) for k in ("file", "dice", "iou", "masks")}


def seed_tests(base: list[dict[str, np.ndarray]], run: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Paired tests of pooled runs that keep images and seeds apart, or {} where they do not apply.

    Needs the same number (>= 2) of workdirs on both sides, each over the
    same images (``read_per_image`` sorts them by name). `p_images`: per-image Dice averaged over
    the workdirs (n = images); `p_runs`: each workdir's mean Dice, paired in
    the order listed (n = workdirs).
    """
    if len(base) < 2 or len(base) != len(run):
        return {}
    files = base[0]["file"]
    if not all(np.array_equal(part["file"], files) for part in base + run):
        return {}
    base_dice = np.stack([part["dice"] for part in base])  # (runs, images)
    run_dice = np.stack([part["dice"] for part in run])
    _, p_images = paired_t_test(base_dice.mean(0), run_dice.mean(0))
    _, p_runs = paired_t_test(base_dice.mean(1), run_dice.mean(1))
    return {"p_images": p_images, "p_runs": p_runs}


def paired_t_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(t statistic, two-sided p) of the paired t-test of b against a."""
    differences = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    n = len(differences)
    if n < 2:
        return math.nan, math.nan
    spread = differences.std(ddof=1)
    if spread == 0:
        return (0.0, 1.0) if differences.mean() == 0 else (math.copysign(math.inf, differences.mean()), 0.0)
    t = differences.mean() / (spread / math.sqrt(n))
    return float(t), float(2 * stats.t.sf(abs(t), df=n - 1))


def compare(runs: list[str], split: str, baseline: str | None = None, alpha: float = 0.05) -> list[dict]:
    """One row per run: name, images, dice, miou, dice_std, and t / p / significant against the baseline
    (with p_images / p_runs where both pool seeds over the same images: `seed_tests`)."""
    baseline = baseline or runs[0]
    same = lambda spec: [pathlib.Path(p).resolve() for p in spec.split(",")]  # noqa: E731  runs/a/ is runs/a
    baseline = next((run for run in runs if same(run) == same(baseline)), baseline)
    base_parts = read_parts(baseline, split)
    base = pool(base_parts)
    rows = []
    for run in runs:
        parts = read_parts(run, split)
        values = pool(parts)
        row = {"run": run, "images": len(values["dice"]), "dice": float(values["dice"].mean()),
               "miou": float(values["iou"].mean()), "dice_std": float(values["dice"].std(ddof=1)) if len(values["dice"]) > 1 else 0.0}
        if run != baseline:
            if len(parts) != len(base_parts):  # Pooled image by image: each image of a seed pairs with one of the other's.
                raise SystemExit(f"error: {run} pools {len(parts)} run(s) and {baseline} {len(base_parts)}; a paired "
                                 "test needs as many on both sides (one per seed)")
            check_pairs(base, values, baseline, run)
            t, p = paired_t_test(base["dice"], values["dice"])
            row |= {"t": t, "p": p, "significant": bool(p < alpha)}
            row |= seed_tests(base_parts, parts)
        rows.append(row)
    return rows


def format_table(rows: list[dict], baseline: str, alpha: float = 0.05) -> str:
    seeded = any("p_images" in row for row in rows)
    header = f"| run | images | Dice | mIoU | p vs {baseline} |"
    if seeded:
        header += " p, images averaged over runs | p, run means |"
    lines = [header, "|---|---:|---:|---:|---:|" + ("---:|---:|" if seeded else "")]

    for row in rows:
        line = f"| {row['run']} | {row['images']} | {row['dice']:.2f} | {row['miou']:.2f} | "
        line += "(baseline) |" if "p" not in row else f"{format_p(row['p'], alpha)} |"
        lines.append(line + (seed_cells(row, alpha) if seeded else ""))
    return "\n".join(lines)


def format_p(p: float, alpha: float = 0.05) -> str:
    """A p-value as the tables show it: 3 significant digits, ' *' below alpha."""
    return f"{p:.3g}{' *' if p < alpha else ''}"


def seed_cells(row: dict, alpha: float = 0.05) -> str:
    """The two seed-aware table cells of a row (empty where `seed_tests` did not apply)."""
    if "p_images" not in row:
        return " | |"
    return f" {format_p(row['p_images'], alpha)} | {format_p(row['p_runs'], alpha)} |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="workdirs (comma-joined workdirs are pooled into one row)")
    parser.add_argument("--split", default="test", help="the per_image_<split>.csv to compare")
    parser.add_argument("--baseline", default=None, help="the run every other is tested against (default: the first)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the * marks, in (0, 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 0.0 < args.alpha < 1.0:
        parser.error(f"--alpha={args.alpha}: a significance level in (0, 1), e.g. 0.05")
    rows = compare(args.runs, args.split, args.baseline, args.alpha)
    if args.json:
        print(json_text(rows, indent=2))
    else:
        baseline = next((row["run"] for row in rows if "p" not in row), args.baseline or args.runs[0])
        print(format_table(rows, baseline, args.alpha))
        print(f"\npaired t-test on per-image Dice ({args.split}); * = p < {args.alpha}")


if __name__ == "__main__":
    main(sys.argv[1:])
