"""What pre-training learned, over seeds: each metric before training (epoch 0) and after, with the gain.

    python tools/pretrain_table.py runs/medpix/amvlm_s0,runs/medpix/amvlm_s1,runs/medpix/amvlm_s2 \
        runs/medpix/mgca_s0,runs/medpix/mgca_s1,runs/medpix/mgca_s2 [--split test]

Each argument is one row group: comma-separated pre-training workdirs (seeds; or their pretrain/ folders) whose
<workdir>/pretrain/summary.json holds initial_retrieval and final_retrieval (``EncoderEvaluation``), or
BEFORE:AFTER pairs of mode-evaluate workdirs (retrieval.json) of one seed, BEFORE evaluated with
config.eval.initial (a split the run itself did not score):

    python tools/pretrain_table.py runs/ev/init_s0:runs/ev/s0,runs/ev/init_s1:runs/ev/s1 --split val

Prints a markdown table in percent: mean +- standard deviation over the seeds before and after
training, the mean gain, the smallest gain of any seed (positive: every seed improved), and the
two-sided p of a paired t-test over the seeds (each seed's own initialisation is its control). For the
retrieval scores (top-k and mean reciprocal rank), where every seed kept each query's rank (a run's
pretrain/ranks/step_<N>.json, the first and the last; an evaluation's retrieval_ranks.json), also the p
of a paired t-test over the split's queries, each query's score averaged over the seeds, before against
after (n = queries): whether the gain holds across the split's images and reports, where the seeds'
test asks whether it holds across initialisations.

With --against=CONTROL (a control configuration's seeds, comma-separated, in the same seed order as each
group), each group's scores after training are paired with the control's after training instead of with
its own before, seed i with seed i (and query by query where both kept ranks): does a change of code or
setting move what pre-training reaches?

    python tools/pretrain_table.py runs/new_s0,runs/new_s1,runs/new_s2 --against=runs/old_s0,runs/old_s1,runs/old_s2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from amvlm_jax.train.logging import null_as_nan  # noqa: E402 (after the path above)


def read(workdirs: str, split: str) -> tuple[dict, dict]:
    """({metric: (seeds,) before}, {metric: (seeds,) after}) in percent, for the split's metrics.

    Every seed must score the same metrics of the split after training, each also before: the
    statistics over the seeds would otherwise use fewer seeds than the row names.
    """
    before, after = {}, {}
    first, seen = None, {}
    for workdir in workdirs.split(","):
        scores = seed_scores(workdir)
        # A seed listed twice (also as its workdir and its pretrain/) would count as two, with a p over both.
        for folder in workdir.split(":", 1) if ":" in workdir else [pretrain_folder(workdir)]:
            if (resolved := pathlib.Path(folder).resolve()) in seen:
                raise SystemExit(f"error: '{workdirs}': {workdir} and {seen[resolved]} are the same run; list each "
                                 "seed once")
            seen[resolved] = workdir
        metrics = [{key[len(split) + 1:]: 100 * value for key, value in seed.items()
                    if key.startswith(split + "/") and not key.endswith(("/rows", "/majority"))} for seed in scores]
        if not metrics[1]:
            present = ", ".join(dict.fromkeys(key.split("/")[0] for key in scores[1])) or "none"
            raise SystemExit(f"error: {workdir}: no scores of split '{split}' after training (splits scored: {present})")
        if unscored := [metric for metric in metrics[1] if metric not in metrics[0]]:
            raise SystemExit(f"error: {workdir}: {split}/{unscored[0]} is scored after training but not before")
        first = first or (workdir, set(metrics[1]))
        if differ := sorted(first[1] ^ set(metrics[1])):
            raise SystemExit(f"error: {workdir}: scores other {split} metrics than {first[0]} ({', '.join(differ)}); "
                             "the seeds' statistics need the same ones")
        for target, values in zip((before, after), metrics):
            for metric in metrics[1]:
                target.setdefault(metric, []).append(values[metric])
    return {k: np.array(v) for k, v in before.items()}, {k: np.array(v) for k, v in after.items()}


def read_json(path: pathlib.Path):
    """The JSON value of a file; a one-line error naming it when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except ValueError as error:  # Also a UnicodeDecodeError.
        raise SystemExit(f"error: {path}: not JSON ({error})") from None


def seed_scores(workdir: str) -> tuple[dict, dict]:
    """One seed's ({'<split>/<metric>': fraction} before, after) from a workdir or a BEFORE:AFTER pair."""
    for folder in workdir.split(":", 1):
        if not pathlib.Path(folder).is_dir():
            raise SystemExit(f"error: {folder}: no such folder")
    if ":" in workdir:
        check_pair(*workdir.split(":", 1))
        pair = []
        for folder in workdir.split(":", 1):
            path = pathlib.Path(folder) / "retrieval.json"
            if not path.is_file():
                raise SystemExit(f"error: {path}: no evaluation of pre-trained encoders (mode 'evaluate')")
            splits = read_json(path)
            if not isinstance(splits, dict) or not all(isinstance(v, dict | None) for v in splits.values()):
                raise SystemExit(f"error: {path}: not an evaluation's scores ({{split: {{metric: value}} or null}})")
            pair.append({f"{split}/{key}": null_as_nan(value) for split, scores in splits.items() if scores
                         for key, value in scores.items() if key != "pairs"})  # A null score was NaN (json_text).
        return pair[0], pair[1]
    path = pretrain_folder(workdir) / "summary.json"
    if not path.is_file():
        if (pathlib.Path(workdir) / "results.json").is_file():  # What a segmentation run writes when it ends.
            raise SystemExit(f"error: {workdir}: a segmentation run, no pre-training (tools/compare.py compares it)")
        raise SystemExit(f"error: {path}: no pre-training summary (the run has not finished)")
    summary = read_json(path)
    if not isinstance(summary, dict) or not all(isinstance(summary.get(key), dict)
                                                for key in ("initial_retrieval", "final_retrieval")):
        raise SystemExit(f"error: {path}: no initial_retrieval and final_retrieval scores (not a pre-training summary)")
    return null_as_nan(summary["initial_retrieval"]), null_as_nan(summary["final_retrieval"])


def check_pair(before: str, after: str) -> None:
    """One-line errors for a BEFORE:AFTER pair whose evaluations' recorded configs (config.json) say BEFORE did
    not score the initial encoders, AFTER did, or the two scored different checkpoints (another seed's)."""
    evaluated = []
    for folder in (before, after):
        path = pathlib.Path(folder) / "config.json"
        if not path.is_file():  # Evaluations written before configs were recorded.
            return
        config = read_json(path)
        evaluation = config.get("eval") if isinstance(config, dict) else None
        if not isinstance(evaluation, dict):
            return
        evaluated.append((bool(evaluation.get("initial")), evaluation.get("checkpoint")))
    (before_initial, before_checkpoint), (after_initial, after_checkpoint) = evaluated
    if not before_initial or after_initial:
        raise SystemExit(f"error: {before}:{after}: BEFORE:AFTER needs BEFORE evaluated with config.eval.initial=True "
                         f"and AFTER without (here {before}: {before_initial}, {after}: {after_initial})")
    if before_checkpoint and after_checkpoint and before_checkpoint != after_checkpoint:
        raise SystemExit(f"error: {before}:{after}: the two evaluations scored other checkpoints ({before_checkpoint}, "
                         f"{after_checkpoint}); a pair is one seed's run before and after")


def pretrain_folder(workdir: str) -> pathlib.Path:
    """A pre-training run's pretrain/ folder, named by its workdir or by itself (as mode 'evaluate' takes it)."""
    path = pathlib.Path(workdir)
    return path if (path / "summary.json").is_file() and not (path / "pretrain").is_dir() else path / "pretrain"


def seed_ranks(workdir: str) -> tuple[dict, dict] | None:
    """One seed's ({split: {'i2t': ranks, 't2i': ranks}} before, after), or None where it kept no ranks."""
    if ":" in workdir:
        paths = [pathlib.Path(folder) / "retrieval_ranks.json" for folder in workdir.split(":", 1)]
    else:
        steps = sorted((pretrain_folder(workdir) / "ranks").glob("step_*.json"),
                       key=lambda path: int(path.stem.split("_")[1]))
        paths = [steps[0], steps[-1]] if len(steps) > 1 and steps[0].stem == "step_0" else []
    if not paths or not all(path.is_file() for path in paths):
        return None
    before, after = ({split: {k: np.asarray(v) for k, v in ranks.items()} for split, ranks in
                      read_json(path).items()} for path in paths)
    return before, after


def query_p(seeds: list, split: str, metric: str) -> str:
    """Two-sided p of a paired t-test over the split's queries of each one's score averaged over the seeds
    (a hit for 't2i_top1', 1 / (rank + 1) for 't2i_mrr'), before against after; seeds: ``seed_ranks`` of
    each seed. '-' where a seed kept no ranks or the seeds' queries differ (in number, or for report-to-image in
    the rows that ask them: 't2i_rows', where kept)."""
    direction, kind = metric.split("_", 1)
    score = ((lambda ranks: ranks < int(kind[3:])) if kind.startswith("top") else (lambda ranks: 1.0 / (ranks + 1)))
    before, after, asked = [], [], set()
    for ranks in seeds:
        if ranks is None or split not in ranks[0] or split not in ranks[1]:
            return "-"
        before.append(score(ranks[0][split][direction]))
        after.append(score(ranks[1][split][direction]))
        asked |= {tuple(np.asarray(side[split][f"{direction}_rows"]).tolist()) for side in ranks
                  if f"{direction}_rows" in side[split]}
    if len({len(values) for values in before + after}) != 1 or len(asked) > 1:
        return "-"  # Paired query by query, the queries must be the same ones.
    return paired_p(np.mean(after, axis=0), np.mean(before, axis=0))


def paired_p(after: np.ndarray, before: np.ndarray) -> str:
    """Two-sided p of a paired t-test, or '-' with fewer than 2 pairs or no variation in the gains."""
    from scipy import stats

    gain = after - before
    if len(gain) < 2 or np.all(gain == gain[0]):
        return "-"
    return f"{stats.ttest_rel(after, before).pvalue:.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", help="comma-separated workdirs of one configuration's seeds")
    parser.add_argument("--split", default="test")
    parser.add_argument("--against", help="comma-separated workdirs of a control's seeds, paired in order with each group's")
    args = parser.parse_args(argv)
    for group in args.groups + ([args.against] if args.against is not None else []):  # '' would read the current folder.
        if not all(group.split(",")):
            raise SystemExit(f"error: '{group}': an empty workdir name (a comma at an end or two in a row)")
    scores = [read(group, args.split) for group in args.groups]  # Every error before the table starts.
    columns = "before | after | gain | smallest gain"
    if args.against is not None:
        control = read(args.against, args.split)[1]
        seeds = len(args.against.split(","))
        for group, (_, after) in zip(args.groups, scores):
            if len(group.split(",")) != seeds:
                raise SystemExit(f"error: '{group}': {len(group.split(','))} seeds against the control's {seeds}; "
                                 "pairing needs the same seeds in the same order")
            if differ := sorted(set(after) ^ set(control)):
                raise SystemExit(f"error: '{group}': scores other {args.split} metrics than the control ({', '.join(differ)})")
        control_ranks = [seed_ranks(workdir) for workdir in args.against.split(",")]
        columns = "control | this | difference | smallest difference"
    print(f"| runs | metric | {columns} | p (paired t, seeds) | p (paired t, queries) |\n"
          "|---|---|---|---|---|---|---|---|")
    for group, (before, after) in zip(args.groups, scores):
        ranks = [seed_ranks(workdir) for workdir in group.split(",")]  # Read once for all the group's metrics.
        if args.against is not None:  # The control's scores after training stand where the group's own before stood.
            before = control
            ranks = [None if mine is None or theirs is None else (theirs[1], mine[1])
                     for mine, theirs in zip(ranks, control_ranks)]
        first = pathlib.Path(group.split(",")[0].split(":")[-1])
        name = (first.parent if pretrain_folder(str(first)) == first else first).name + f" (+{group.count(',')})"
        for metric in after:
            gain = after[metric] - before[metric]
            print(f"| {name} | {metric} | {before[metric].mean():.1f} ± {before[metric].std(ddof=1) if len(gain) > 1 else 0:.1f} "
                  f"| {after[metric].mean():.1f} ± {after[metric].std(ddof=1) if len(gain) > 1 else 0:.1f} "
                  f"| {gain.mean():+.1f} | {gain.min():+.1f} | {paired_p(after[metric], before[metric])} "
                  f"| {query_p(ranks, args.split, metric) if metric.startswith(('i2t_', 't2i_')) else '-'} |")


if __name__ == "__main__":
    main()
