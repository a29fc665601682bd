"""tools/compare.py: the paired t-test against scipy, and the table from per-image CSVs."""

import csv
import importlib.util
import math

import numpy as np
import pytest
from scipy import stats

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("compare", REPO_ROOT / "tools" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


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
    compare.main([str(tmp_path / "base"), str(tmp_path / "better")])
    out = capsys.readouterr().out
    assert "| 68.75 |" in out and " *" in out


def test_compare_rejects_missing_results(tmp_path):
    with pytest.raises(SystemExit, match="no per-image results"):
        compare.compare([str(tmp_path)], "test")
