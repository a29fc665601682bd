"""tools/compare.py: the paired t-test against scipy, and the table from per-image CSVs."""

import csv
import json
import math
import pathlib
import re
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import repo_module

compare = repo_module("tools/compare.py")


def test_paired_t_test_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(70, 10, size=25)
    b = a + rng.normal(2, 3, size=25)
    t, p = compare.paired_t_test(a, b)
    expected = stats.ttest_rel(b, a)
    assert t == pytest.approx(expected.statistic, rel=1e-10)
    assert p == pytest.approx(expected.pvalue, rel=1e-8)


def test_paired_t_test_known_small_sample():
    # Differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.4641, df 2.
    t, p = compare.paired_t_test([10, 10, 10], [11, 12, 13])
    assert t == pytest.approx(2 * math.sqrt(3))
    assert p == pytest.approx(0.07418, abs=1e-4)
    assert compare.paired_t_test([1, 2], [1, 2]) == (0.0, 1.0)


def _write(workdir, dice):
    workdir.mkdir()
    with open(workdir / "per_image_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "dice", "iou"])
        for i, d in enumerate(dice):
            writer.writerow([f"img{i}", d, d / 2])


def test_compare_table_and_pooling(tmp_path, capsys):
    _write(tmp_path / "base", [60, 70, 80, 65])
    _write(tmp_path / "better", [66, 75, 84, 70])
    _write(tmp_path / "base2", [50, 50, 50, 50])
    _write(tmp_path / "better2", [52, 55, 51, 56])
    rows = compare.compare([str(tmp_path / "base"), str(tmp_path / "better")], "test")
    assert rows[0]["dice"] == pytest.approx(68.75) and rows[0]["miou"] == pytest.approx(34.375)
    assert rows[1]["p"] == pytest.approx(stats.ttest_rel([66, 75, 84, 70], [60, 70, 80, 65]).pvalue)
    assert rows[1]["significant"]
    pooled = compare.compare([f"{tmp_path / 'base'},{tmp_path / 'base2'}", f"{tmp_path / 'better'},{tmp_path / 'better2'}"], "test")
    assert pooled[1]["images"] == 8
    expected = stats.ttest_rel([66, 75, 84, 70, 52, 55, 51, 56], [60, 70, 80, 65, 50, 50, 50, 50]).pvalue
    assert pooled[1]["p"] == pytest.approx(expected)
    # The same images under two seeds: tests on seed-averaged images (n = 4) and on seed means (n = 2).
    image_means = stats.ttest_rel([59, 65, 67.5, 63], [55, 60, 65, 57.5]).pvalue
    seed_means = stats.ttest_rel([73.75, 53.5], [68.75, 50]).pvalue
    assert pooled[1]["p_images"] == pytest.approx(image_means)
    assert pooled[1]["p_runs"] == pytest.approx(seed_means)
    assert "p_images" not in rows[1] and "p_images" not in pooled[0]
    compare.main([str(tmp_path / "base"), str(tmp_path / "better")])
    out = capsys.readouterr().out
    assert "| 68.75 |" in out and " *" in out and "run means" not in out
    compare.main([f"{tmp_path / 'base'},{tmp_path / 'base2'}", f"{tmp_path / 'better'},{tmp_path / 'better2'}"])
    out = capsys.readouterr().out
    assert "p, images averaged over runs | p, run means |" in out
    assert f"| {image_means:.3g} |" in out.replace(" *", "")
    # The baseline named with a trailing slash is the run listed without one (it was tested against itself).
    named = compare.compare([str(tmp_path / "base"), str(tmp_path / "better")], "test", str(tmp_path / "base") + "/")
    assert "p" not in named[0] and named[1]["p"] == pytest.approx(rows[1]["p"])
    with pytest.raises(SystemExit):  # A significance level outside (0, 1): argparse's one-line error.
        compare.main([str(tmp_path / "base"), str(tmp_path / "better"), "--alpha", "5"])
    assert "--alpha=5.0: a significance level in (0, 1)" in capsys.readouterr().err


def test_compare_row_spread_miou_and_a_chosen_significance_level_by_hand(tmp_path, capsys):
    """mIoU is the mean of the iou column, dice_std the sample sd of the images' Dice, and --alpha decides both
    the 'significant' flag and the table's stars; a baseline named with a trailing slash heads the table as listed."""
    for name, dice, iou in (("base", [60, 70, 80, 65], [40, 50, 70, 45]), ("better", [62, 75, 81, 70], [41, 60, 70, 52])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "per_image_test.csv").write_text(
            "file,dice,iou\n" + "".join(f"img{i},{d},{u}\n" for i, (d, u) in enumerate(zip(dice, iou))))
    base, better = str(tmp_path / "base"), str(tmp_path / "better")
    rows = compare.compare([base, better], "test", alpha=0.1)
    # Base: mean 68.75, squared deviations 76.5625 + 1.5625 + 126.5625 + 14.0625 = 218.75 over 3.
    assert rows[0]["miou"] == 51.25 and rows[0]["dice_std"] == pytest.approx(math.sqrt(218.75 / 3))
    assert rows[1]["miou"] == 55.75
    p = stats.ttest_rel([62, 75, 81, 70], [60, 70, 80, 65]).pvalue  # Differences 2, 5, 1, 5.
    assert 0.05 < p < 0.1 and rows[1]["p"] == pytest.approx(p) and rows[1]["significant"]
    assert not compare.compare([base, better], "test")[1]["significant"]
    # A baseline listed second: the first run is tested against it (a negative t), the baseline against nothing.
    against = compare.compare([base, better], "test", better)
    assert "p" not in against[1] and against[0]["p"] == pytest.approx(p) and against[0]["t"] < 0
    compare.main([base, better, "--alpha", "0.1", "--baseline", base + "/"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"| run | images | Dice | mIoU | p vs {base} |"
    assert lines[3] == f"| {better} | 4 | 72.00 | 55.75 | {p:.3g} * |"
    compare.main([base, better])
    assert capsys.readouterr().out.splitlines()[3] == f"| {better} | 4 | 72.00 | 55.75 | {p:.3g} |"


def test_seed_tests_need_the_same_images_in_every_run(tmp_path):
    parts = {}
    for name, files, dice in (("a0", "xy", [60, 70]), ("a1", "uv", [61, 72]), ("b0", "xy", [65, 71]), ("b1", "uv", [63, 75])):
        parts[name] = {"file": np.array(list(files)), "dice": np.array(dice, float), "iou": np.array(dice, float) / 2}
    # Each seed evaluated other images (say, another split): neither seed-aware test applies.
    assert compare.seed_tests([parts["a0"], parts["a1"]], [parts["b0"], parts["b1"]]) == {}
    assert compare.seed_tests([parts["a0"]], [parts["b0"]]) == {}
    # Only the second row's second run evaluated other images.
    assert compare.seed_tests([parts["a0"], parts["b0"]], [parts["b0"], parts["a1"]]) == {}
    assert compare.seed_tests([parts["a0"], parts["a0"]], [parts["b0"]]) == {}


def test_compare_rejects_missing_results(tmp_path):
    with pytest.raises(SystemExit, match=r"no per-image results \(run an evaluation of this workdir first\)$"):
        compare.compare([str(tmp_path)], "test")
    # Results of other splits only (MoNuSeg has no test split): the split to ask for.
    (tmp_path / "per_image_val.csv").write_text("file,dice,iou\nx.png,50,33\n")
    with pytest.raises(SystemExit, match=r"per_image_test.csv: no per-image results \(it has val: --split val\)$"):
        compare.compare([str(tmp_path)], "test")


def test_compare_hints_only_per_image_dice_splits_and_names_missing_or_pretraining_folders(tmp_path):
    # A mean teacher's per_image_guidance_<split>.csv has no dice column: no split to suggest.
    (tmp_path / "per_image_guidance_val.csv").write_text("file,teacher_dice\nx.png,50\n")
    (tmp_path / "per_image_val.csv").write_text("file,dice,iou\nx.png,50,33\n")
    with pytest.raises(SystemExit, match=r"per_image_train.csv: no per-image results \(it has val: --split val\)$"):
        compare.compare([str(tmp_path)], "train")
    with pytest.raises(SystemExit, match=r"^error: .*typo: no such folder$"):
        compare.compare([str(tmp_path / "typo")], "test")
    (tmp_path / "pre" / "pretrain").mkdir(parents=True)
    (tmp_path / "pre" / "pretrain" / "summary.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"no per-image results \(a pre-training run: tools/pretrain_table.py"):
        compare.compare([str(tmp_path / "pre")], "test")


def test_compare_refuses_a_run_pooled_twice(tmp_path):
    _write(tmp_path / "a", [60, 70, 80, 65])
    _write(tmp_path / "b", [66, 75, 84, 70])
    # a,a against b,b would count every image twice (a smaller p) and give the seed-means test a zero spread.
    with pytest.raises(SystemExit, match=r"^error: '.*a,.*a/': .*a is listed twice; pool each run once$"):
        compare.compare([f"{tmp_path / 'a'},{tmp_path / 'a'}/", f"{tmp_path / 'b'},{tmp_path / 'b'}"], "test")


def _ablation_tool():
    module = repo_module("tools/ablation.py")
    return module


def test_ablation_rows_pretrainings_and_table(tmp_path):
    import json

    from conftest import tiny_synthetic_config

    ablation = _ablation_tool()
    base = tiny_synthetic_config()
    keys = {row: ablation.pretrain_key(ablation.row_config(base, row, 0, tmp_path)) for row in ablation.ROWS}
    # +CSS+ICL and +CSS+ICL+L_tg share the full pre-training; +CSS and +ICL each drop one term.
    assert keys["+CSS"] == "pretrain_ita_css_local" and keys["+ICL"] == "pretrain_ita_local_icl"
    assert keys["+CSS+ICL"] == keys["+CSS+ICL+L_tg"] == "pretrain_ita_css_local_icl"
    mt = ablation.row_config(base, "MT", 1, tmp_path)
    assert mt.ssl.w_text == 0 and not mt.ssl.train_decoder and mt.seed == 1
    assert mt.data.root == str(tmp_path / "data")  # One copy of the synthetic data for every row.
    named = base.copy_and_resolve_references()
    named.data.root = str(tmp_path / "mine")  # Synthetic data the command names is the data every row reads.
    assert ablation.row_config(named, "+CSS", 0, tmp_path).data.root == str(tmp_path / "mine")
    assert ablation.row_config(base, "+CSS+ICL+L_tg", 0, tmp_path).ssl.train_decoder

    dice = {"MT": [[60, 70, 80, 65], [61, 69, 79, 66]], "+CSS": [[66, 75, 84, 70], [64, 72, 83, 69]]}
    runs = {}
    for row, per_seed in dice.items():
        runs[row] = []
        for seed, values in enumerate(per_seed):
            run = tmp_path / f"{row}_seed{seed}"
            _write(run, values)
            results = {"val": {"dice": 50.0 + seed, "miou": 40.0, "images": 4},
                       "test": {"dice": float(np.mean(values)), "miou": float(np.mean(values)) / 2, "images": 4}}
            (run / "results.json").write_text(json.dumps(results))
            runs[row].append(str(run))
    table, text = ablation.summarize(runs, tmp_path)
    assert table[0]["val_dice"] == pytest.approx(50.5) and table[0]["test_dice"] == pytest.approx(np.mean(dice["MT"]))
    expected = stats.ttest_rel(sum(dice["+CSS"], []), sum(dice["MT"], [])).pvalue
    assert table[1]["p"] == pytest.approx(expected) and "p" not in table[0]
    image_means = stats.ttest_rel(np.mean(dice["+CSS"], 0), np.mean(dice["MT"], 0)).pvalue
    seed_means = stats.ttest_rel(np.mean(dice["+CSS"], 1), np.mean(dice["MT"], 1)).pvalue
    assert table[1]["p_images"] == pytest.approx(image_means) and table[1]["p_runs"] == pytest.approx(seed_means)
    assert "p, seed-averaged images | p, seed means |" in text
    assert (tmp_path / "ablation.md").read_text().startswith("| row | val Dice")
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["rows"][1]["row"] == "+CSS" and saved["runs"] == runs  # Which run folders each row pooled.
    # A results.json cut short by a kill is named in one line; so is one that holds no results object.
    cut = pathlib.Path(runs["+CSS"][0]) / "results.json"
    whole = cut.read_text()
    cut.write_text(whole[:20])
    with pytest.raises(SystemExit, match=r"^error: .*CSS_seed0/results.json: unreadable \(JSONDecodeError\); run "):
        ablation.summarize(runs, tmp_path)
    cut.write_text("[70.0, 72.0]")
    with pytest.raises(SystemExit, match=r"^error: .*CSS_seed0/results.json: not a results object; run "):
        ablation.summarize(runs, tmp_path)
    cut.write_text(whole)
    # Rows scored against other masks under the same image names (another data seed) are not paired.
    for row, digest in (("MT", "sha256:0"), ("+CSS", "sha256:1")):
        results = json.loads((pathlib.Path(runs[row][1]) / "results.json").read_text())
        results["test"]["masks"] = digest
        (pathlib.Path(runs[row][1]) / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=r"^error: \+CSS and MT scored images of the same names against different masks"):
        ablation.summarize(runs, tmp_path)


def test_curve_best_epoch_and_last_validations(tmp_path, capsys):
    """tools/curve.py: best epoch and the mean of the last N validated epochs, for one and several runs."""
    import json
    import sys

    curve = repo_module("tools/curve.py")
    runs = []
    for name, dice in (("a", [50.0, 70.0, 60.0, 62.0, 64.0]), ("b", [55.0, 58.0, 66.0, 61.0, 63.0])):
        workdir = tmp_path / name
        workdir.mkdir()
        records = [{"step": 2}]  # A step record without an epoch is skipped.
        records += [{"epoch": e + 1, "time": 10.0 * (e + 1), "train/epoch_loss": 1.0 / (e + 1), "val/dice": d,
                     "val/miou": d - 10} for e, d in enumerate(dice)]
        (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        runs.append(workdir)
    summary = curve.validation_summary(curve.epoch_rows(runs[0]), last=3)
    assert summary == {"epochs": 5, "best_epoch": 2, "best_dice": 70.0, "last_mean_dice": 62.0}
    sys.argv = ["curve.py", *map(str, runs), "--last", "3"]
    curve.main()
    table = capsys.readouterr().out
    # Best 70 and 66 (mean 68, sd 2.83); last-3 means 62 and 63.33 (mean 62.67, sd 0.94).
    assert "| 5 | 2 | 70.00 | 62.00 |" in table and "| 5 | 3 | 66.00 | 63.33 |" in table
    assert "68.00 ± 2.83 | 62.67 ± 0.94 |" in table
    # Bytes that are no UTF-8: a last line cut short is skipped, any other line named.
    damaged = runs[0] / "metrics.jsonl"
    damaged.write_bytes(damaged.read_bytes() + b'\n{"epoch": 6, "val/dice": \xff')
    assert len(curve.epoch_rows(runs[0])) == 5
    damaged.write_bytes(b'{"epoch": \xff\n' + damaged.read_bytes())
    with pytest.raises(SystemExit, match="metrics.jsonl: line 1 is not a JSON record"):
        curve.epoch_rows(runs[0])


def test_curve_of_one_run_and_validations_every_other_epoch_by_hand(tmp_path, capsys, monkeypatch):
    """One run's table: the first, every N-th, the best and the last epoch, minutes from the start of the first
    epoch; a tie for the best is the first epoch that reached it (the loop's best checkpoint); with validations
    every other epoch, the last N validations are the last N validated epochs, not the validated ones among the
    last N epochs."""
    curve = repo_module("tools/curve.py")
    # Epoch e ends at 60 e + 30 s after 60 s of training: e minutes after the first epoch began.
    dice = [50.0, 58.0, 61.0, 57.0, 66.0, 66.0, 63.0]
    records = [{"epoch": e, "time": 60.0 * e + 30, "epoch_seconds": 60.0, "train/epoch_loss": 1.0 / e, "val/dice": d,
                "val/miou": d - 20} for e, d in enumerate(dice, start=1)]
    run = _metrics(tmp_path / "run", records)
    monkeypatch.setattr(sys, "argv", ["curve.py", str(run), "--every", "3", "--last", "2"])
    curve.main()
    assert capsys.readouterr().out.splitlines() == [
        "| epoch | minutes | train loss | val Dice | val mIoU |", "|---:|---:|---:|---:|---:|",
        "| 1 | 1.0 | 1.0000 | 50.00 | 30.00 |", "| 3 | 3.0 | 0.3333 | 61.00 | 41.00 |",
        "| 5 (best) | 5.0 | 0.2000 | 66.00 | 46.00 |", "| 6 | 6.0 | 0.1667 | 66.00 | 46.00 |",
        "| 7 | 7.0 | 0.1429 | 63.00 | 43.00 |", "",
        "best val Dice 66.00 at epoch 5; mean of the last 2 validations 64.50"]
    # Validated at epochs 2, 4, 6 and 8: the last two validations are epochs 6 and 8.
    sparse = [{"epoch": e, "time": 10.0 * e, "train/epoch_loss": 1.0} | ({"val/dice": 40.0 + e} if e % 2 == 0 else {})
              for e in range(1, 9)]
    summary = curve.validation_summary(sparse, last=2)
    assert summary == {"epochs": 8, "best_epoch": 8, "best_dice": 48.0, "last_mean_dice": 47.0}
    # A ninth epoch without validation: the run trained 9 epochs, its validations are the same.
    summary = curve.validation_summary(sparse + [{"epoch": 9, "time": 90.0, "train/epoch_loss": 1.0}], last=2)
    assert summary == {"epochs": 9, "best_epoch": 8, "best_dice": 48.0, "last_mean_dice": 47.0}


def test_pretrain_table_reports_before_after_and_the_smallest_gain(tmp_path, capsys):
    import json

    table = repo_module("tools/pretrain_table.py")
    runs = []
    for seed, (before, after) in enumerate([(0.10, 0.30), (0.20, 0.25), (0.15, 0.50)]):
        (tmp_path / f"s{seed}" / "pretrain").mkdir(parents=True)
        summary = {"initial_retrieval": {"test/i2t_top1": before, "test/probe/Type/rows": 200, "val/i2t_top1": 0.9},
                   "final_retrieval": {"test/i2t_top1": after, "test/probe/Type/rows": 200, "val/i2t_top1": 0.9}}
        (tmp_path / f"s{seed}" / "pretrain" / "summary.json").write_text(json.dumps(summary))
        runs.append(str(tmp_path / f"s{seed}"))
    table.main([",".join(runs)])
    rows = [line for line in capsys.readouterr().out.splitlines() if "i2t_top1" in line]
    # Before 10, 20, 15 (mean 15, sd 5); after 30, 25, 50 (mean 35, sd 13.2); gains 20, 5, 35.
    p = stats.ttest_rel([30, 25, 50], [10, 20, 15]).pvalue  # Gains 20, 5, 35: t = 20 / (15 / sqrt 3).
    assert p == pytest.approx(2 * stats.t.sf(20 / (15 / math.sqrt(3)), 2))
    assert rows == [f"| s0 (+2) | i2t_top1 | 15.0 ± 5.0 | 35.0 ± 13.2 | +20.0 | +5.0 | {p:.3f} | - |"]
    # The same seeds as BEFORE:AFTER pairs of evaluations (retrieval.json; a split the data lacks is null).
    pairs = []
    for seed, (before, after) in enumerate([(0.10, 0.30), (0.20, 0.25), (0.15, 0.50)]):
        for name, value in (("init", before), ("trained", after)):
            (tmp_path / f"{name}{seed}").mkdir()
            retrieval = {"test": {"i2t_top1": value, "probe/Type/rows": 200, "pairs": 200}, "val": None}
            (tmp_path / f"{name}{seed}" / "retrieval.json").write_text(json.dumps(retrieval))
        pairs.append(f"{tmp_path / f'init{seed}'}:{tmp_path / f'trained{seed}'}")
    table.main([",".join(pairs)])
    rows = [line for line in capsys.readouterr().out.splitlines() if "i2t_top1" in line]
    assert rows == [f"| trained0 (+2) | i2t_top1 | 15.0 ± 5.0 | 35.0 ± 13.2 | +20.0 | +5.0 | {p:.3f} | - |"]
    # With each query's rank kept (retrieval_ranks.json): two seeds, four report-to-image queries.
    # Before, top-1 hits per seed [1, 0, 0, 0] and [0, 0, 0, 0]; after [1, 1, 0, 1] and [0, 1, 1, 1]. Hit
    # rates over the seeds: before .5, 0, 0, 0; after .5, 1, .5, 1; differences 0, 1, .5, 1: mean .625,
    # sd sqrt(((.625)^2 + 2 (.375)^2 + (.125)^2) / 3) = .4787, t = .625 / (.4787 / 2) = 2.611, 3 degrees
    # of freedom. Over the seeds: top-1 25 and 0 before, 75 and 75 after, gains 50 and 75.
    before_ranks = [[0, 3, 1, 2], [1, 1, 2, 4]]
    after_ranks = [[0, 0, 2, 0], [5, 0, 0, 0]]
    pairs = []
    for seed in range(2):
        for name, ranks in (("rinit", before_ranks[seed]), ("rtrained", after_ranks[seed])):
            (tmp_path / f"{name}{seed}").mkdir()
            scores = {"t2i_top1": float(np.mean(np.array(ranks) < 1)), "t2i_mrr": float(np.mean(1 / (np.array(ranks) + 1)))}
            (tmp_path / f"{name}{seed}" / "retrieval.json").write_text(json.dumps({"test": scores}))
            kept = {"test": {"i2t": [0] * 6, "t2i": ranks, "t2i_rows": [0, 1, 2, 4]}}
            (tmp_path / f"{name}{seed}" / "retrieval_ranks.json").write_text(json.dumps(kept))
        pairs.append(f"{tmp_path / f'rinit{seed}'}:{tmp_path / f'rtrained{seed}'}")
    table.main([",".join(pairs)])
    rows = [line for line in capsys.readouterr().out.splitlines() if "t2i_" in line]
    seeds_p = stats.ttest_rel([75, 75], [25, 0]).pvalue
    queries_p = 2 * stats.t.sf(0.625 / (math.sqrt((0.625 ** 2 + 2 * 0.375 ** 2 + 0.125 ** 2) / 3) / 2), 3)
    assert rows[0] == (f"| rtrained0 (+1) | t2i_top1 | 12.5 ± 17.7 | 75.0 ± 0.0 | +62.5 | +50.0 | {seeds_p:.3f} "
                       f"| {queries_p:.3f} |")
    # Reciprocal ranks averaged over the two seeds, query by query: before (1 + 1/2) / 2, (1/4 + 1/2) / 2,
    # (1/2 + 1/3) / 2, (1/3 + 1/5) / 2; after (1 + 1/6) / 2, 1, (1/3 + 1) / 2, 1.
    mrr_p = stats.ttest_rel([7 / 12, 1, 2 / 3, 1], [3 / 4, 3 / 8, 5 / 12, 4 / 15]).pvalue
    assert rows[1].startswith("| rtrained0 (+1) | t2i_mrr |") and rows[1].endswith(f"| {mrr_p:.3f} |")
    # Queries asked by other rows (other data, the same count) are not paired query by query.
    kept = json.loads((tmp_path / "rtrained1" / "retrieval_ranks.json").read_text())
    kept["test"]["t2i_rows"] = [0, 1, 3, 4]
    (tmp_path / "rtrained1" / "retrieval_ranks.json").write_text(json.dumps(kept))
    table.main([",".join(pairs)])
    other = [line for line in capsys.readouterr().out.splitlines() if "t2i_" in line]
    assert other[0].endswith(f"| {seeds_p:.3f} | - |") and other[1].endswith("| - |")
    kept["test"]["t2i_rows"] = [0, 1, 2, 4]
    (tmp_path / "rtrained1" / "retrieval_ranks.json").write_text(json.dumps(kept))
    # A pre-training workdir's ranks: its first (step 0) and last evaluation.
    for seed in range(2):
        ranks_dir = tmp_path / f"w{seed}" / "pretrain" / "ranks"
        ranks_dir.mkdir(parents=True)
        for step, ranks in ((0, before_ranks[seed]), (7, [9, 9, 9, 9]), (14, after_ranks[seed])):
            (ranks_dir / f"step_{step}.json").write_text(json.dumps({"test": {"t2i": ranks}}))
        summary = {"initial_retrieval": json.loads((tmp_path / f"rinit{seed}" / "retrieval.json").read_text()),
                   "final_retrieval": json.loads((tmp_path / f"rtrained{seed}" / "retrieval.json").read_text())}
        summary = {key: {f"test/{k}": v for k, v in scores["test"].items()} for key, scores in summary.items()}
        (tmp_path / f"w{seed}" / "pretrain" / "summary.json").write_text(json.dumps(summary))
    table.main([f"{tmp_path / 'w0'},{tmp_path / 'w1'}"])
    assert [line for line in capsys.readouterr().out.splitlines() if "t2i_" in line] == [
        row.replace("rtrained0", "w0") for row in rows]
    # Their pretrain/ folders (as mode 'evaluate' takes them) read the same, under the workdir's name.
    table.main([f"{tmp_path / 'w0' / 'pretrain'},{tmp_path / 'w1' / 'pretrain'}"])
    assert [line for line in capsys.readouterr().out.splitlines() if "t2i_" in line] == [
        row.replace("rtrained0", "w0") for row in rows]
    with pytest.raises(SystemExit, match=f"^error: {tmp_path / 'w2'}: no such folder$"):
        table.main([f"{tmp_path / 'w0'},{tmp_path / 'w2'}"])


def test_pretrain_table_against_a_control_pairs_the_seeds_after_training(tmp_path, capsys):
    import json

    table = repo_module("tools/pretrain_table.py")
    groups = {}
    # Report-to-image ranks of four queries after training; top-1 per seed: control 25, 0; new 75, 50.
    last_ranks = {"old": [[0, 3, 1, 2], [1, 1, 2, 4]], "new": [[0, 0, 2, 0], [5, 0, 0, 1]]}
    for name, finals in (("old", [0.25, 0.0]), ("new", [0.75, 0.50])):
        runs = []
        for seed, final in enumerate(finals):
            workdir = tmp_path / f"{name}{seed}"
            (workdir / "pretrain" / "ranks").mkdir(parents=True)
            summary = {"initial_retrieval": {"test/t2i_top1": 0.5}, "final_retrieval": {"test/t2i_top1": final}}
            (workdir / "pretrain" / "summary.json").write_text(json.dumps(summary))
            for step, ranks in ((0, [9, 9, 9, 9]), (14, last_ranks[name][seed])):
                (workdir / "pretrain" / "ranks" / f"step_{step}.json").write_text(json.dumps({"test": {"t2i": ranks}}))
            runs.append(str(workdir))
        groups[name] = ",".join(runs)
    table.main([groups["new"], "--against", groups["old"]])
    out = capsys.readouterr().out
    assert "| control | this | difference | smallest difference |" in out
    # Seeds: 75 against 25, 50 against 0 (differences 50, 50: no variation, no p). Queries, hits averaged
    # over the two seeds: control .5, 0, 0, 0; new .5, 1, .5, .5: differences 0, 1, .5, .5.
    queries_p = stats.ttest_rel([0.5, 1, 0.5, 0.5], [0.5, 0, 0, 0]).pvalue
    row = [line for line in out.splitlines() if "t2i_top1" in line]
    assert row == [f"| new0 (+1) | t2i_top1 | 12.5 ± 17.7 | 62.5 ± 17.7 | +50.0 | +50.0 | - | {queries_p:.3f} |"]
    with pytest.raises(SystemExit, match=r"2 seeds against the control's 1; pairing needs the same seeds"):
        table.main([groups["new"], "--against", str(tmp_path / "old0")])
    other = _summary(tmp_path / "other", {"test/i2t_top1": 0.1}, {"test/i2t_top1": 0.2})
    with pytest.raises(SystemExit, match=r"new0': scores other test metrics than the control \(i2t_top1, t2i_top1\)$"):
        table.main([str(tmp_path / "new0"), "--against", other])


def test_pretrain_table_pairs_queries_only_from_the_first_evaluation_and_equal_counts(tmp_path, capsys):
    """The queries' test pairs a run's step-0 ranks with its last; ranks kept from a later step only (no step 0)
    are no 'before', and seeds that asked different numbers of queries are not paired query by query ('-', not a
    traceback). A probe's majority share (a property of the data) is no metric row."""
    table = repo_module("tools/pretrain_table.py")

    def seed(name, steps):
        summary = {"initial_retrieval": {"test/t2i_top1": 0.0, "test/probe/Type/majority": 0.6},
                   "final_retrieval": {"test/t2i_top1": 0.5, "test/probe/Type/majority": 0.6}}
        workdir = _summary(tmp_path / name, summary["initial_retrieval"], summary["final_retrieval"])
        (tmp_path / name / "pretrain" / "ranks").mkdir()
        for step, ranks in steps.items():
            (tmp_path / name / "pretrain" / "ranks" / f"step_{step}.json").write_text(json.dumps({"test": {"t2i": ranks}}))
        return workdir

    # Hits before 0, 0, 0, 0 and 0, 1, 0, 0; after 1, 1, 0, 1 and 1, 1, 1, 0: means 1, 1, .5, .5 against 0, .5, 0, 0,
    # differences 1, .5, .5, .5 (mean .625, sd .25): t = .625 / (.25 / 2) = 5 with 3 degrees of freedom.
    full = [seed("a0", {0: [3, 2, 1, 1], 9: [0, 0, 2, 0]}), seed("a1", {0: [2, 0, 3, 1], 5: [9, 9, 9, 9], 9: [0, 0, 0, 1]})]
    table.main([",".join(full)])
    out = capsys.readouterr().out
    assert "majority" not in out
    rows = [line for line in out.splitlines() if "t2i_top1" in line]
    assert rows == [f"| a0 (+1) | t2i_top1 | 0.0 ± 0.0 | 50.0 ± 0.0 | +50.0 | +50.0 | - | {2 * stats.t.sf(5, 3):.3f} |"]
    for other in (seed("late", {4: [2, 0, 3, 1], 9: [0, 0, 0, 1]}), seed("five", {0: [2, 0, 3, 1, 4], 9: [0, 0, 0, 1, 0]})):
        table.main([f"{full[0]},{other}"])
        assert [line for line in capsys.readouterr().out.splitlines() if "t2i_top1" in line][0].endswith("| - |")


def test_compare_reports_bad_per_image_csvs_in_one_line(tmp_path):
    (tmp_path / "header").mkdir()
    (tmp_path / "header" / "per_image_test.csv").write_text("file,dice,iou\n")
    (tmp_path / "columns").mkdir()
    (tmp_path / "columns" / "per_image_test.csv").write_text("name,dice,iou\nimg0,60,30\n")
    (tmp_path / "value").mkdir()
    (tmp_path / "value" / "per_image_test.csv").write_text("file,dice,iou\nimg0,60,30\nimg1,high,30\n")
    (tmp_path / "nan").mkdir()
    (tmp_path / "nan" / "per_image_test.csv").write_text("file,dice,iou\nimg0,nan,30\nimg1,61,31\n")
    (tmp_path / "inf").mkdir()
    (tmp_path / "inf" / "per_image_test.csv").write_text("file,dice,iou\nimg0,60,30\nimg1,61,inf\n")
    (tmp_path / "bytes").mkdir()  # Damaged on disk: bytes that are no UTF-8.
    (tmp_path / "bytes" / "per_image_test.csv").write_bytes(b"file,dice,iou\nimg0,60,30\nimg\xff\xfe,61,31\n")
    for run, problem in (("header", "per_image_test.csv: no images, only a header"),
                         ("bytes", "per_image_test.csv: not UTF-8 text \\(invalid start byte\\); "
                                   "evaluate the workdir again"),
                         ("columns", "per_image_test.csv: no column file "),
                         ("value", "per_image_test.csv: line 3: dice 'high' is not a number"),
                         # float() reads them; the row's mean and p were NaN without a word.
                         ("nan", "per_image_test.csv: line 2: dice 'nan' is not a finite number"),
                         ("inf", "per_image_test.csv: line 3: iou 'inf' is not a finite number")):
        with pytest.raises(SystemExit, match=problem):
            compare.compare([str(tmp_path / run)], "test")
    # A trailing comma would read per_image_test.csv of the current folder.
    _write(tmp_path / "a", [60, 70])
    with pytest.raises(SystemExit, match=r"an empty workdir name"):
        compare.compare([f"{tmp_path / 'a'},"], "test")


def test_compare_pairs_images_by_name_whatever_their_row_order(tmp_path):
    _write(tmp_path / "base", [60, 70, 80, 65])
    (tmp_path / "shuffled").mkdir()
    rows = [("img2", 84), ("img0", 66), ("img3", 70), ("img1", 75)]
    (tmp_path / "shuffled" / "per_image_test.csv").write_text(
        "file,dice,iou\n" + "".join(f"{name},{dice},{dice / 2}\n" for name, dice in rows))
    result = compare.compare([str(tmp_path / "base"), str(tmp_path / "shuffled")], "test")
    assert result[1]["p"] == pytest.approx(stats.ttest_rel([66, 75, 84, 70], [60, 70, 80, 65]).pvalue)
    # Pooled seeds: the seed-aware tests apply too.
    _write(tmp_path / "base2", [60, 70, 80, 65])
    pooled = compare.compare([f"{tmp_path / 'base'},{tmp_path / 'base2'}", f"{tmp_path / 'shuffled'},{tmp_path / 'base'}"], "test")
    assert "p_images" in pooled[1]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "per_image_test.csv").write_text("file,dice,iou\nimg0,1,1\nimg1,1,1\nimg2,1,1\nimg9,1,1\n")
    with pytest.raises(SystemExit, match="hold different images"):
        compare.compare([str(tmp_path / "base"), str(tmp_path / "other")], "test")
    # Two seeds pooled against one: the images are the same, the counts not (it said 'hold different images').
    with pytest.raises(SystemExit, match=r"^error: .*shuffled,.*base pools 2 run\(s\) and .*base 1; a paired test "):
        compare.compare([str(tmp_path / "base"), f"{tmp_path / 'shuffled'},{tmp_path / 'base'}"], "test")


def test_compare_refuses_runs_scored_against_other_masks_under_the_same_names(tmp_path):
    from amvlm_jax.data.folders import SplitArrays
    from amvlm_jax.train import evaluate

    rng = np.random.default_rng(0)
    names, masks = [f"img{i}" for i in range(4)], rng.integers(0, 2, (4, 8, 8), dtype=np.uint8)
    scores = (rng.random((4, 1)), rng.random((4, 1)), np.ones((4, 1), bool))

    def evaluated(workdir, order, masks):
        workdir.mkdir()
        split = SplitArrays([names[i] for i in order], np.zeros((4, 8, 8, 3), np.uint8), masks[order], [""] * 4)
        evaluate.write_results(workdir, {"test": tuple(v[order] for v in scores)}, {"test": split})

    evaluated(tmp_path / "a", [0, 1, 2, 3], masks)
    evaluated(tmp_path / "a_shuffled", [2, 0, 3, 1], masks)  # Same data, read in another order: pairs.
    other = masks.copy()
    other[3, 0, 0] ^= 1  # Another data seed's image 3 (one pixel is enough).
    evaluated(tmp_path / "b", [0, 1, 2, 3], other)
    assert compare.compare([str(tmp_path / "a"), str(tmp_path / "a_shuffled")], "test")[1]["p"] == 1.0
    with pytest.raises(SystemExit, match=r"b and .*a scored images of the same names against different masks"):
        compare.compare([str(tmp_path / "a"), str(tmp_path / "b")], "test")
    # Pooled rows are checked run by run; a run without the digest (an older one) pairs on names alone.
    with pytest.raises(SystemExit, match="against different masks"):
        compare.compare([f"{tmp_path / 'a'},{tmp_path / 'a_shuffled'}", f"{tmp_path / 'a'},{tmp_path / 'b'}"], "test")
    _write(tmp_path / "older", [60, 70, 80, 65])
    assert "p" in compare.compare([str(tmp_path / "b"), str(tmp_path / "older")], "test")[1]


def test_results_cut_short_by_a_kill_leave_the_previous_ones_whole(tmp_path, monkeypatch):
    """A kill (or a full disk) while an evaluation rewrites results.json or a per-image CSV leaves the files of
    the evaluation before whole: a CSV row cut inside a number ('23.05' of '23.0571') read as that number."""
    from amvlm_jax.data.folders import SplitArrays
    from amvlm_jax.train import evaluate

    names, masks = [f"img{i}" for i in range(3)], np.zeros((3, 4, 4), np.uint8)
    split = {"test": SplitArrays(names, np.zeros((3, 4, 4, 3), np.uint8), masks, [""] * 3)}

    def scores(dice):
        return {"test": (np.array(dice)[:, None], np.array(dice)[:, None] / 2, np.ones((3, 1), bool))}

    evaluate.write_results(tmp_path, scores([0.6, 0.7, 0.8]), split)
    before = {name: (tmp_path / name).read_text() for name in ("results.json", "per_image_test.csv")}
    write_text = pathlib.Path.write_text

    def killed_halfway(path, text, *args, **kwargs):
        write_text(path, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        evaluate.write_results(tmp_path, scores([0.230571, 0.5, 0.5]), split)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_text() for name in before} == before
    assert compare.read_per_image(tmp_path, "test")["dice"].tolist() == [60.0, 70.0, 80.0]


def test_ablation_table_rows_by_hand(tmp_path):
    """Each row's means over its seeds (mIoU too), the signed t and p of its pooled per-image test Dice against
    the first row's, the markdown cells, and the fallbacks: one seed per row (a p, no seed columns), and a row
    whose seed lacks test scores (its test cells '-', its test on val, which the footnote names)."""
    ablation = _ablation_tool()
    # (row, seed): per-image test Dice, per-image val Dice, results.json (val dice, val mIoU, test dice, test mIoU).
    seeds = {("MT", 0): ([60, 70, 80], [50, 55], (50, 40, 70, 30)), ("MT", 1): ([62, 66, 82], [52, 51], (52, 44, 70, 36)),
             ("+CSS", 0): ([64, 71, 86], [56, 54], (54, 45, 74, 38)), ("+CSS", 1): ([65, 70, 84], [57, 60], (56, 47, 73, 41))}
    runs = {}
    for (row, seed), (test, val, (val_dice, val_miou, test_dice, test_miou)) in seeds.items():
        run = tmp_path / f"{row}_seed{seed}"
        run.mkdir()
        for split, dice in (("test", test), ("val", val)):
            (run / f"per_image_{split}.csv").write_text(
                "file,dice,iou\n" + "".join(f"img{i},{d},{d - 20}\n" for i, d in enumerate(dice)))
        (run / "results.json").write_text(json.dumps({"val": {"dice": val_dice, "miou": val_miou},
                                                      "test": {"dice": test_dice, "miou": test_miou}}))
        runs.setdefault(row, []).append(str(run))
    table, text = ablation.summarize(runs, tmp_path)
    assert {k: table[0][k] for k in ("val_dice", "val_miou", "test_dice", "test_miou")} == {
        "val_dice": 51.0, "val_miou": 42.0, "test_dice": 70.0, "test_miou": 33.0}
    assert {k: table[1][k] for k in ("val_dice", "val_miou", "test_dice", "test_miou")} == {
        "val_dice": 55.0, "val_miou": 46.0, "test_dice": 73.5, "test_miou": 39.5}
    # Differences +CSS - MT, seed by seed and image by image: 4, 1, 6, 3, 4, 2 (mean 10 / 3, a positive t).
    pooled = stats.ttest_rel([64, 71, 86, 65, 70, 84], [60, 70, 80, 62, 66, 82])
    assert table[1]["t"] == pytest.approx(pooled.statistic) and table[1]["t"] > 0
    assert table[1]["p"] == pytest.approx(pooled.pvalue) and pooled.pvalue < 0.05
    p_images = stats.ttest_rel([64.5, 70.5, 85], [61, 68, 81]).pvalue
    p_runs = stats.ttest_rel([221 / 3, 73], [70, 70]).pvalue
    assert p_images < 0.05 < p_runs
    assert text.splitlines()[2:] == [
        "| MT | 51.00 | 42.00 | 70.00 | 33.00 | (baseline) | | |",
        f"| +CSS | 55.00 | 46.00 | 73.50 | 39.50 | {pooled.pvalue:.3g} * | {p_images:.3g} * | {p_runs:.3g} |",
        "",
        "mean over 2 seed(s); paired t-test on per-image Dice (test, seeds pooled); * = p < 0.05"]
    # One seed per row: the pooled test of that seed's images, without the seed-aware columns.
    table, text = ablation.summarize({row: dirs[:1] for row, dirs in runs.items()}, tmp_path)
    single = stats.ttest_rel([64, 71, 86], [60, 70, 80])
    assert table[1]["p"] == pytest.approx(single.pvalue) and "p_images" not in table[1]
    assert text.splitlines()[3] == f"| +CSS | 54.00 | 45.00 | 74.00 | 38.00 | {single.pvalue:.3g} |"
    assert text.splitlines()[-1].startswith("mean over 1 seed(s); ")  # Seeds per row, not rows.
    # A seed evaluated on val only: the row has no test means, and its test pairs the val images.
    (pathlib.Path(runs["+CSS"][1]) / "results.json").write_text(json.dumps({"val": {"dice": 56, "miou": 47}}))
    table, text = ablation.summarize(runs, tmp_path)
    assert "test_dice" not in table[1] and table[1]["p_split"] == "val"
    assert table[1]["p"] == pytest.approx(stats.ttest_rel([56, 54, 57, 60], [50, 55, 52, 51]).pvalue)
    assert text.splitlines()[3].startswith("| +CSS | 55.00 | 46.00 | - | - | ")
    assert text.endswith("(val, seeds pooled); * = p < 0.05")


def test_ablation_rejects_bad_rows_and_seeds_up_front():
    from amvlm_jax.config import ConfigError

    ablation = _ablation_tool()
    assert ablation.workdir_flag("runs/x") == pathlib.Path("runs/x")
    for empty in ("", "  "):  # Was the current folder: every row's run and the table written there.
        with pytest.raises(ConfigError, match=r"^--workdir is empty: name the ablation's folder"):
            ablation.workdir_flag(empty)
    assert ablation.parse_selection("MT, +CSS", "0,2") == (["MT", "+CSS"], [0, 2])
    for rows, seeds, problem in ((",", "0", "--rows=,: names no row"), ("MT,bogus", "0", "unknown ablation row"),
                                 ("MT", "a", "--seeds=a: takes"), ("MT", "-1", "--seeds=-1: takes"),
                                 ("MT", "0,", "--seeds=0,: takes"), ("MT", "1,1", "--seeds=1,1: takes")):
        with pytest.raises(SystemExit, match=f"^error: {re.escape(problem)}"):
            ablation.parse_selection(rows, seeds)


def test_ablation_pretraining_seed_does_not_follow_the_seeds_selected(tmp_path, monkeypatch):
    """The shared pre-training was seeded by the first of --seeds: after --seeds=0, a command adding
    --seeds=1 met the seed-0 pre-training and stopped ('written for other data (config.seed=0 -> 1)')."""
    from amvlm_jax.train import pretrain, ssl
    from conftest import tiny_synthetic_config

    ablation = _ablation_tool()
    trained = []
    monkeypatch.setattr(pretrain, "train", lambda config, workdir: trained.append(("pretrain", config.seed, workdir)))
    monkeypatch.setattr(ssl, "train", lambda config, workdir: trained.append(("ssl", config.seed, workdir)))
    base = tiny_synthetic_config()
    base.seed = 5
    for seeds in ([0], [1, 2]):
        ablation.run_rows(base, tmp_path, ["+CSS"], seeds)
    pre = tmp_path / "pretrain_ita_css_local"
    assert trained == [("pretrain", 5, pre), ("ssl", 0, tmp_path / "+CSS_seed0"), ("pretrain", 5, pre),
                       ("ssl", 1, tmp_path / "+CSS_seed1"), ("pretrain", 5, pre), ("ssl", 2, tmp_path / "+CSS_seed2")]


def test_ablation_runs_record_their_resolved_configs(tmp_path, monkeypatch):
    """With the default relative --workdir=runs/ablation the runs recorded relative data and encoder paths (an
    evaluation from another folder found neither) and wrote no config.json, which every run's workdir holds."""
    from amvlm_jax.train import pretrain, ssl
    from conftest import tiny_synthetic_config

    ablation = _ablation_tool()
    trained = []
    monkeypatch.setattr(pretrain, "train", lambda config, workdir: trained.append(("pretrain", config)))
    monkeypatch.setattr(ssl, "train", lambda config, workdir: trained.append(("ssl", config)))
    monkeypatch.chdir(tmp_path)
    ablation.run_rows(tiny_synthetic_config(), pathlib.Path("runs/ablation"), ["MT", "+CSS"], [0])
    assert [job for job, _ in trained] == ["ssl", "pretrain", "ssl"]
    pre, css = trained[1][1], trained[2][1]
    assert pre.mode == "pretrain" and css.mode == "ssl"
    assert css.data.root == pre.data.root == str(tmp_path / "runs" / "ablation" / "data")
    assert css.ssl.pretrained == str(tmp_path / "runs" / "ablation" / "pretrain_ita_css_local" / "pretrain")
    for folder, config in (("MT_seed0", trained[0][1]), ("pretrain_ita_css_local", pre), ("+CSS_seed0", css)):
        recorded = json.loads((tmp_path / "runs" / "ablation" / folder / "config.json").read_text())
        assert recorded["mode"] == config.mode and recorded["data"]["root"] == config.data.root


def test_ablation_refuses_bases_whose_rows_would_not_differ_as_named():
    """Under MGCA's objective +CSS, +ICL and +CSS+ICL shared one pre-training (pretrain_mgca); with a text head
    +CSS+ICL+L_tg trained the same model as +CSS+ICL: tables of identical rows under different names."""
    from amvlm_jax.config import ConfigError
    from amvlm_jax.experiment import load_config
    from conftest import REPO_ROOT

    ablation = _ablation_tool()
    synthetic = REPO_ROOT / "experiments" / "synthetic.py"
    check = lambda base: ablation.check_base(base, list(ablation.ROWS), [0, 1], REPO_ROOT / "runs")  # noqa: E731
    check(load_config(synthetic, "labeled25"))
    for variant, field in (("mgca", "pretrain.objective='mgca'"), ("text_report", "ssl.text_head='report'"),
                           ("text_head", "ssl.text_head='words'")):
        with pytest.raises(ConfigError, match=f"^config.{re.escape(field)}: the ablation rows"):
            check(load_config(synthetic, variant))
    constant = load_config(synthetic)
    constant.ssl.constant_text_mask = 0.3
    with pytest.raises(ConfigError, match=r"^config.ssl.constant_text_mask=0.3: every text-guided row"):
        check(constant)
    # The rows' own configs are validated as main validates a run's (the jobs do not): an epoch count of 0
    # trained nothing and stopped on a missing best checkpoint; a ramp-up longer than the run was trained.
    for field, value, problem in (("train.epochs", 0, "config.train.epochs must be an integer >= 1"),
                                  ("ssl.rampup_epochs", 50.0, "config.ssl.rampup_epochs=50.0 exceeds")):
        bad = load_config(synthetic)
        bad[field.split(".")[0]][field.split(".")[1]] = value
        with pytest.raises(ConfigError, match=f"^{re.escape(problem)}"):
            check(bad)


def _metrics(workdir, records):
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return workdir


def _epochs(dice):
    return [{"epoch": e + 1, "time": 10.0 * (e + 1), "train/epoch_loss": 1.0, "val/dice": d, "val/miou": d / 2}
            for e, d in enumerate(dice)]


def test_curve_reports_bad_metrics_and_arguments_in_one_line(tmp_path, capsys, monkeypatch):
    curve = repo_module("tools/curve.py")

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["curve.py", *map(str, args)])
        curve.main()
        return capsys.readouterr()

    good = _metrics(tmp_path / "good", _epochs([50.0, 60.0]))
    # A killed run's cut-short last line is skipped with a note; a damaged line before it is an error.
    with open(good / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "time": 30.0, "train/ep')
    out = run(good)
    assert "| 2 (best) |" in out.out and "| 3 " not in out.out
    assert "metrics.jsonl: line 3 is cut short" in out.err
    (good / "metrics.jsonl").write_text(json.dumps(_epochs([50.0])[0]) + '\n{"epo\n' + json.dumps(_epochs([50.0, 60.0])[1]))
    with pytest.raises(SystemExit, match=r"metrics.jsonl: line 2 is not a JSON record$"):
        run(good)
    good = _metrics(tmp_path / "good2", _epochs([50.0, 60.0]))
    for flag, value in (("--every", 0), ("--last", 0), ("--last", -1)):
        with pytest.raises(SystemExit, match=f"^error: {flag} {value}: must be 1 or more$"):
            run(good, flag, value)
    # Several runs, one never validated.
    unvalidated = _metrics(tmp_path / "unvalidated", [{"epoch": 1, "time": 10.0, "train/epoch_loss": 1.0}])
    with pytest.raises(SystemExit, match=r"unvalidated.metrics.jsonl: no validated epochs"):
        run(good, unvalidated)
    # One run never validated: its curve, with no epoch marked best and no best-epoch line.
    assert run(unvalidated).out.splitlines() == ["| epoch | minutes | train loss | val Dice | val mIoU |",
                                                 "|---:|---:|---:|---:|---:|", "| 1 | 0.0 | 1.0000 | nan | nan |"]
    # A pre-training run: its evaluation before training is epoch 0, without a training loss.
    pretraining = _metrics(tmp_path / "pretrain", [{"epoch": 0, "time": 1.0, "val/i2t_top1": 0.1},
                                                   {"epoch": 1, "time": 2.0, "train/epoch_loss": 3.0, "val/i2t_top1": 0.2}])
    for runs in ((pretraining,), (good, pretraining)):
        with pytest.raises(SystemExit, match=r"pretrain.metrics.jsonl: epochs without train/epoch_loss: not a segmentation"):
            run(*runs)
    # Its workdir (the records lie in pretrain/): named as a pre-training run, not only as missing.
    with pytest.raises(SystemExit, match=r"^error: .*metrics.jsonl not found \(a pre-training run: tools/pretrain_table.py"):
        run(tmp_path)


def _summary(workdir, before, after):
    (workdir / "pretrain").mkdir(parents=True)
    (workdir / "pretrain" / "summary.json").write_text(json.dumps({"initial_retrieval": before, "final_retrieval": after}))
    return str(workdir)


def test_pretrain_table_reports_bad_splits_metrics_and_summaries_in_one_line(tmp_path, capsys):
    table = repo_module("tools/pretrain_table.py")
    scores = {"train/i2t_top1": 0.1, "test/i2t_top1": 0.2, "test/t2i_top1": 0.3}
    s0 = _summary(tmp_path / "s0", scores, scores)
    with pytest.raises(SystemExit, match=r"s0: no scores of split 'bogus' after training \(splits scored: train, test\)$"):
        table.main([s0, "--split", "bogus"])
    assert capsys.readouterr().out == ""  # No table header before the error.
    with pytest.raises(SystemExit, match=r"an empty workdir name"):
        table.main([f"{s0},"])
    # One seed lacks the split: the row's statistics would silently use the other seed only.
    s1 = _summary(tmp_path / "s1", {"train/i2t_top1": 0.1}, {"train/i2t_top1": 0.2})
    with pytest.raises(SystemExit, match=r"s1: no scores of split 'test' after training \(splits scored: train\)$"):
        table.main([f"{s0},{s1}"])
    # The same seed twice (by its workdir and by its pretrain/ folder) would be two seeds with a p over them.
    with pytest.raises(SystemExit, match=rf"{re.escape(s0)}/pretrain and {re.escape(s0)} are the same run; list each seed once$"):
        table.main([f"{s0},{s1},{s0}/pretrain", "--split", "train"])
    s2 = _summary(tmp_path / "s2", scores, {**scores, "test/i2t_mrr": 0.5})
    with pytest.raises(SystemExit, match=r"s2: test/i2t_mrr is scored after training but not before$"):
        table.main([s2])
    s3 = _summary(tmp_path / "s3", {"test/i2t_top1": 0.1}, {"test/i2t_top1": 0.2})
    with pytest.raises(SystemExit, match=r"s3: scores other test metrics than .*s0 \(t2i_top1\)"):
        table.main([f"{s0},{s3}"])
    (tmp_path / "s4" / "pretrain").mkdir(parents=True)
    (tmp_path / "s4" / "pretrain" / "summary.json").write_text('{"initial_retrieval": {')
    with pytest.raises(SystemExit, match=r"s4.pretrain.summary.json: not JSON"):
        table.main([str(tmp_path / "s4")])
    (tmp_path / "s4" / "pretrain" / "summary.json").write_text('{"initial_retrieval": {}}')
    with pytest.raises(SystemExit, match=r"s4.pretrain.summary.json: no initial_retrieval and final_retrieval"):
        table.main([str(tmp_path / "s4")])


def test_pretrain_table_refuses_a_swapped_or_mixed_before_after_pair(tmp_path, capsys):
    table = repo_module("tools/pretrain_table.py")
    for name, initial, checkpoint, score in (("init_s0", True, "runs/s0/pretrain", 0.1), ("ev_s0", False, "runs/s0/pretrain", 0.5),
                                             ("ev_s1", False, "runs/s1/pretrain", 0.6)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "retrieval.json").write_text(json.dumps({"test": {"i2t_top1": score}}))
        (tmp_path / name / "config.json").write_text(json.dumps({"eval": {"initial": initial, "checkpoint": checkpoint}}))
    table.main([f"{tmp_path / 'init_s0'}:{tmp_path / 'ev_s0'}"])
    assert "| 10.0 ± 0.0 | 50.0 ± 0.0 | +40.0 |" in capsys.readouterr().out
    # AFTER:BEFORE would print the gain with its sign flipped; another seed's AFTER pairs two initialisations.
    with pytest.raises(SystemExit, match=r"ev_s0:.*init_s0: BEFORE:AFTER needs BEFORE evaluated with config.eval.initial=True"):
        table.main([f"{tmp_path / 'ev_s0'}:{tmp_path / 'init_s0'}"])
    with pytest.raises(SystemExit, match=r"init_s0:.*ev_s1: the two evaluations scored other checkpoints"):
        table.main([f"{tmp_path / 'init_s0'}:{tmp_path / 'ev_s1'}"])


def test_pretrain_table_names_a_segmentation_run_as_such(tmp_path):
    table = repo_module("tools/pretrain_table.py")
    (tmp_path / "sup").mkdir()
    (tmp_path / "sup" / "results.json").write_text('{"test": {"dice": 50.0}}')
    # Was "no pre-training summary (the run has not finished)" for a finished supervised run.
    with pytest.raises(SystemExit, match=r"^error: .*sup: a segmentation run, no pre-training \(tools/compare.py compares it\)$"):
        table.main([str(tmp_path / "sup")])


def test_multiclass_results_and_per_class_columns_by_hand(tmp_path):
    """results.json and the per-image CSV of a 3-class task from hand-scored masks: each image's Dice averages
    the classes in its prediction or truth, a class's column is blank where it is in neither, and a class's
    summary averages only the images that hold it."""
    from amvlm_jax import metrics
    from amvlm_jax.data.folders import SplitArrays
    from amvlm_jax.train import evaluate

    truth = np.array([[[1, 1, 2, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0]]])
    predicted = np.array([[[1, 2, 2, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0]]])
    scores = tuple(np.asarray(v) for v in metrics.dice_iou_per_class(predicted, truth, num_classes=3))
    split = SplitArrays(["img0", "img1", "img2"], np.zeros((3, 1, 4, 3), np.uint8), truth.astype(np.uint8), [""] * 3)
    results = evaluate.write_results(tmp_path, {"test": scores}, {"test": split})
    # img0: class 1 |P| 1 |Y| 2 -> Dice 2/3, IoU 1/2; class 2 |P| 2 |Y| 1 -> 2/3, 1/2. img1: class 1 exact (1, 1),
    # class 2 in neither. img2: no class anywhere, scored 1.
    assert results["test"]["dice"] == pytest.approx(100 * (2 / 3 + 1 + 1) / 3)
    assert results["test"]["miou"] == pytest.approx(100 * (1 / 2 + 1 + 1) / 3)
    assert results["test"]["classes"] == {"1": {"dice": pytest.approx(100 * (2 / 3 + 1) / 2),
                                                "miou": pytest.approx(100 * (1 / 2 + 1) / 2), "images": 2},
                                          "2": {"dice": pytest.approx(200 / 3), "miou": pytest.approx(50.0), "images": 1}}
    with open(tmp_path / "per_image_test.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["file", "dice", "iou", "dice_class_1", "dice_class_2"],
                    ["img0", "66.6667", "50.0000", "66.6667", "66.6667"],
                    ["img1", "100.0000", "100.0000", "100.0000", ""],
                    ["img2", "100.0000", "100.0000", "", ""]]
