"""tools/monuseg_gpu.py: the bundle's resized data reads as the originals do; the plan of runs, what a later call
keeps, the table, and bad flags."""

import pathlib

import numpy as np
import pytest

from amvlm_jax.data import folders

from conftest import repo_module
from test_folders import untidy_root  # noqa: F401 (a fixture)

tool = repo_module("tools/monuseg_gpu.py")


def test_resized_folders_load_as_the_originals_do(untidy_root, tmp_path):  # noqa: F811
    target = tmp_path / "bundle" / "data"
    reports = tool.resized_data(untidy_root, target)
    assert sorted(reports) == sorted(["Two areas, upper left.", "One area, middle.", "None.", "A report, with a comma."])
    # Every file is a PNG of the bundle's size; the sheets are the originals'.
    written = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert written == ["Train_Folder/Train_text.xlsx", "Train_Folder/img/a.png", "Train_Folder/img/b.png",
                       "Train_Folder/img/c.png", "Train_Folder/labelcol/b.png", "Train_Folder/labelcol/c.png",
                       "Train_Folder/labelcol/mask_a.png", "Val_Folder/Val_text.csv", "Val_Folder/img/v.png",
                       "Val_Folder/labelcol/v.png"]
    for split in ("train", "val"):
        original = folders.load_split(untidy_root, split, tool.SIZE, progress=False)
        copy = folders.load_split(target, split, tool.SIZE, progress=False)
        np.testing.assert_array_equal(copy.images, original.images)
        np.testing.assert_array_equal(copy.masks, original.masks)
        assert copy.names == original.names and copy.reports == original.reports


def test_every_seed_has_the_papers_rows_and_amvlm_waits_for_its_own_pre_training():
    work = pathlib.Path("/w")
    runs = tool.plan([0, 1], pathlib.Path("/d"), pathlib.Path("/t"), work, quick=False, extra=["--config.dtype=bfloat16"])
    names = [run.name for run in runs]
    assert names[:2] == ["pre_s0", "pre_s1"] and len(names) == len(set(names)) == 2 * 8
    for run in runs:
        seed = run.name.rsplit("_s", 1)[1]
        assert f"--config.seed={seed}" in run.args and f"--workdir={work / run.name}" in run.args
        assert run.args[-1] == "--config.dtype=bfloat16" and "--config.data.root=/d" in run.args
        if run.name.startswith("amvlm"):
            assert run.after == f"pre_s{seed}"
            assert f"--config.ssl.pretrained={work / f'pre_s{seed}' / 'pretrain'}" in run.args
            assert "--config.mode=ssl" in run.args and not any(a.endswith(",vision") for a in run.args)
        else:
            assert run.after == ""
    modes = {run.name[:-3]: (run.args[0], run.args[1]) for run in runs}
    assert modes["mt25"] == ("--config=experiments/monuseg.py:labeled25,vision", "--config.mode=ssl")
    assert modes["sup100"] == ("--config=experiments/monuseg.py", "--config.mode=supervised")


def test_a_later_call_keeps_the_runs_that_wrote_their_last_file(tmp_path):
    runs = {run.name: run for run in tool.plan([0], tmp_path / "d", tmp_path / "t", tmp_path, quick=False, extra=[])}
    # Checkpoints alone (a run stopped at the budget) are not an end: that run resumes.
    (tmp_path / "sup25_s0" / "checkpoints" / "latest").mkdir(parents=True)
    (tmp_path / "pre_s0" / "pretrain" / "checkpoints").mkdir(parents=True)
    assert not tool.finished(runs["sup25_s0"], tmp_path) and not tool.finished(runs["pre_s0"], tmp_path)
    (tmp_path / "sup25_s0" / "results.json").write_text("{}")
    (tmp_path / "pre_s0" / "pretrain" / "summary.json").write_text("{}")
    # A pre-training run's workdir holds no results.json; a segmentation run's pretrain/ is not its own.
    (tmp_path / "mt25_s0" / "pretrain").mkdir(parents=True)
    (tmp_path / "mt25_s0" / "pretrain" / "summary.json").write_text("{}")
    assert [name for name, run in runs.items() if tool.finished(run, tmp_path)] == ["pre_s0", "sup25_s0"]


def test_the_table_has_each_rows_seeds_their_spread_and_last_10_mean_beside_the_papers_row(tmp_path):
    import json
    runs = tool.plan([0, 1], tmp_path / "d", tmp_path / "t", tmp_path, quick=False, extra=[])
    best = {"sup100_s0": 76.0, "sup100_s1": 78.0, "mt25_s0": 70.0}  # mt25_s1 stopped at the budget.
    for run in runs:
        run.status = "done" if run.name in best else "stopped at the budget"
        if run.name in best:
            (tmp_path / run.name).mkdir()
            (tmp_path / run.name / "results.json").write_text(json.dumps({"val": {"dice": best[run.name], "miou": 60.0}}))
            # 12 epochs: the last 10 hold val Dice 1..10 shifted by the seed's best (mean best - 4.5).
            rows = [{"epoch": e, "val/dice": best[run.name] - 10 + max(e - 2, 0)} for e in range(1, 13)]
            (tmp_path / run.name / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    lines = tool.table(runs, tmp_path).splitlines()
    assert lines[2] == "| all | supervised U-Net | 76.00 / 78.00 | 77.00 ± 1.41 | 60.00 ± 0.00 | 72.50 ± 1.41 | 2 of 2 | 78.66 / 68.46 |"
    assert lines[4] == "| 25% | MT (vision only) | 70.00 | 70.00 | 60.00 | 65.50 | 1 of 2 | 72.80 / 56.70 |"
    assert lines[5] == "| 25% | AMVLM-guided MT | - | - | - | - | 0 of 2 | 76.63 / 58.90 |"
    assert lines[3].endswith("| 0 of 2 |  |")  # Supervised at 25%: no paper row.


@pytest.mark.parametrize("flags, expected", [
    (["--seeds=0,a"], "error: --seeds=0,a: not a comma-separated list of seeds (0, 1, 2, ...)"),
    (["--seeds=,"], "error: --seeds=,: not a comma-separated list of seeds (0, 1, 2, ...)"),
    (["--parallel=0"], "error: --parallel=0 --budget=540: need at least 1 run at a time and a budget above 0 seconds"),
    (["--budget=-5"], "error: --parallel=12 --budget=-5: need at least 1 run at a time and a budget above 0 seconds"),
    (["--work={file}"], "error: --work={file}: not a folder"),
])
def test_bad_run_flags_are_one_line_errors_before_anything_runs(tmp_path, flags, expected):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "text_encoder.tar.xz").write_bytes(b"")
    (tmp_path / "file").write_text("")
    flags = [flag.format(file=tmp_path / "file") for flag in flags]
    with pytest.raises(SystemExit) as stop:
        tool.main(["run", f"--bundle={bundle}", f"--out={tmp_path / 'out'}", *flags])
    assert str(stop.value) == expected.format(file=tmp_path / "file")
    assert not (tmp_path / "out").exists()
