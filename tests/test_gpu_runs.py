"""tools/gpu_runs.py: the bundle's resized data reads as the originals do, MedPix's copy holds what its splits
name; the plans of runs, what a later call keeps, the tables, and bad flags."""

import json
import pathlib

import numpy as np
import pytest

from amvlm_jax.data import folders
from amvlm_jax.experiment import load_config

from conftest import repo_module
from test_folders import untidy_root  # noqa: F401 (a fixture)

tool = repo_module("tools/gpu_runs.py")
MEDPIX = tool.REPO_ROOT / "experiments" / "medpix.py"


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
        # Later seeds start once seed 0's run of the same kind has compiled and logged a step.
        kind = run.name.rsplit("_s", 1)[0]
        assert run.warm_after == ("" if seed == "0" else f"{kind}_s0")
    modes = {run.name[:-3]: (run.args[0], run.args[1]) for run in runs}
    assert modes["mt25"] == ("--config=experiments/monuseg.py:labeled25,vision", "--config.mode=ssl")
    assert modes["sup100"] == ("--config=experiments/monuseg.py", "--config.mode=supervised")


def test_medpix_copy_holds_the_splits_and_their_images_as_they_are_and_every_text(tmp_path):
    from PIL import Image

    from amvlm_jax.data import corpus

    root = tmp_path / "MedPix-2.0"
    (root / "images").mkdir(parents=True)
    (root / "splits").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "unused"):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
    captions = {"train": ["Left lung mass.", "A kidney cyst."], "dev": ["A brain lesion."], "test": ["A kidney cyst."]}
    images = {"train": ["a", "b"], "dev": ["c"], "test": ["a"]}
    for split in ("train", "dev", "test"):
        rows = [{"image": image, "Type": "CT", "Location Category": "Thorax", "Description": {"Caption": caption}}
                for image, caption in zip(images[split], captions[split])]
        (root / "splits" / f"descriptions_{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    target = tmp_path / "bundle" / "data" / "MedPix-2.0"
    texts = tool.copied_corpus(root, target)
    config = load_config(MEDPIX)
    prompts = [prompt for field in config.eval.zero_shot.values() for prompt in field.values()]
    assert texts == prompts + captions["train"] + captions["dev"] + captions["test"]
    written = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert written == ["images/a.jpg", "images/b.jpg", "images/c.jpg", "splits/descriptions_dev.jsonl",
                       "splits/descriptions_test.jsonl", "splits/descriptions_train.jsonl"]
    for path in written:
        assert (target / path).read_bytes() == (root / path).read_bytes()
    for split in corpus.SPLITS:
        config.data.root = str(root)
        original = corpus.read_split(config, split)
        config.data.root = str(target)
        copy = corpus.read_split(config, split)
        assert copy["reports"] == original["reports"] and copy["labels"] == original["labels"]


def test_the_medpix_plan_pretrains_both_objectives_per_seed_and_ends_at_their_summaries(tmp_path):
    runs = tool.plan([0, 1], pathlib.Path("/d"), pathlib.Path("/t"), tmp_path, quick=False, extra=["--x=1"],
                     experiment="medpix")
    assert [run.name for run in runs] == ["amvlm_s0", "mgca_s0", "amvlm_s1", "mgca_s1"]
    for run in runs:
        objective, seed = run.name.split("_s")
        variant = "mgca," if objective == "mgca" else ""
        assert run.args[0] == f"--config=experiments/medpix.py:{variant}gpu"
        assert f"--config.seed={seed}" in run.args and "--config.data.root=/d" in run.args and run.args[-1] == "--x=1"
        assert run.after == "" and not tool.finished(run, tmp_path)
        # Later seeds start once the first seed's run of the same objective has compiled and logged a step.
        assert run.warm_after == ("" if seed == "0" else f"{objective}_s0")
        (tmp_path / run.name / "pretrain").mkdir(parents=True)
        metrics = tmp_path / run.name / "pretrain" / "metrics.jsonl"
        metrics.write_text('{"step": 0, "val/i2t_top1": 0.1}\n')
        assert not tool.trained(run, tmp_path)
        metrics.write_text('{"step": 0, "val/i2t_top1": 0.1}\n{"step": 10, "train/loss": 5.0}\n{"ste')
        assert tool.trained(run, tmp_path)
        (tmp_path / run.name / "pretrain" / "summary.json").write_text("{}")
        assert tool.finished(run, tmp_path)


def test_the_medpix_gpu_variant_is_locked_text_and_long_with_a_vit_s16_at_224():
    for objective in ("", "mgca,"):
        gpu = load_config(MEDPIX, objective + "gpu")
        runs = load_config(MEDPIX, objective + "locked_text,long")
        runs.pretrain.vit = "S/16"
        assert gpu.to_dict() == runs.to_dict()
        assert gpu.pretrain.image_size in (0, 224) and gpu.data.image_size == 224


def test_only_the_named_runs_with_what_they_read_and_a_warm_up_leader_among_them():
    runs = tool.plan([0, 1, 2, 3], pathlib.Path("/d"), pathlib.Path("/t"), pathlib.Path("/w"), quick=False, extra=[],
                     experiment="medpix")
    kept = tool.selected(runs, ["amvlm_s3", "amvlm_s2"])
    assert [(run.name, run.warm_after) for run in kept] == [("amvlm_s2", ""), ("amvlm_s3", "amvlm_s2")]
    monuseg = tool.plan([0, 1], pathlib.Path("/d"), pathlib.Path("/t"), pathlib.Path("/w"), quick=False, extra=[])
    assert [run.name for run in tool.selected(monuseg, ["amvlm25_s1", "sup100_s0"])] == ["pre_s1", "sup100_s0", "amvlm25_s1"]
    with pytest.raises(SystemExit) as stop:
        tool.selected(runs, ["amvlm_s9"])
    assert str(stop.value).startswith("error: --only=amvlm_s9: no run named amvlm_s9 in this plan (it has amvlm_s0, mgca_s0,")


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
    # A segmentation run's steps are in its own metrics.jsonl, a pre-training run's under pretrain/.
    (tmp_path / "sup25_s0" / "metrics.jsonl").write_text('{"step": 2, "epoch": 1}\n')
    (tmp_path / "mt25_s0" / "metrics.jsonl").write_text('{"step": 0}\n')
    assert [name for name, run in runs.items() if tool.trained(run, tmp_path)] == ["sup25_s0"]


def test_runs_tgz_holds_each_runs_small_outputs_and_the_end_of_its_log(tmp_path):
    import tarfile

    runs = tool.plan([1, 2], tmp_path / "d", tmp_path / "t", tmp_path, quick=False, extra=[], experiment="medpix")
    # Later seeds warm up behind the first seed given, not behind a seed 0 that is not in the plan.
    assert [(run.name, run.warm_after) for run in runs] == [("amvlm_s1", ""), ("mgca_s1", ""), ("amvlm_s2", "amvlm_s1"),
                                                            ("mgca_s2", "mgca_s1")]
    kept = ["amvlm_s1/pretrain/summary.json", "amvlm_s1/pretrain/metrics.jsonl", "amvlm_s1/pretrain/ranks/step_0.json",
            "amvlm_s1/config.json", "amvlm_s1/per_image_val.csv", "amvlm_s1/results.json", "amvlm_s1/guidance.json",
            "amvlm_s1/retrieval.json", "mgca_s1/pretrain/per_image_guidance_val.csv"]
    left = ["amvlm_s1/pretrain/checkpoints/7/state.bin", "amvlm_s1/tensorboard/events.out", "amvlm_s1/curves.png",
            "other_s1/results.json"]  # The last: a folder of no run of the plan.
    for name in kept + left:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    log = bytes(range(256)) * 100  # 25,600 bytes: the last 20,000 are kept.
    (tmp_path / "amvlm_s1.log").write_bytes(log)
    out = tmp_path / "out"
    out.mkdir()
    tool.pack(runs, tmp_path, out)
    with tarfile.open(out / "runs.tgz") as archive:
        names = archive.getnames()
        assert sorted(names) == sorted(kept + ["amvlm_s1/log_tail.txt"])
        assert archive.extractfile("amvlm_s1/log_tail.txt").read() == log[5600:]
        assert archive.extractfile("amvlm_s1/pretrain/ranks/step_0.json").read() == b"amvlm_s1/pretrain/ranks/step_0.json"
    assert sorted(path.name for path in out.iterdir()) == ["runs.tgz"]


def test_the_table_has_each_rows_seeds_their_spread_and_last_10_mean_beside_the_papers_row(tmp_path):
    import json
    runs = tool.plan([0, 1], tmp_path / "d", tmp_path / "t", tmp_path, quick=False, extra=[])
    # mt25_s1 wrote results.json and then exited with an error: not a finished run, its score not counted.
    best = {"sup100_s0": 76.0, "sup100_s1": 78.0, "mt25_s0": 70.0, "mt25_s1": 50.0}
    for run in runs:
        run.status = {"mt25_s1": "exit 1"}.get(run.name, "done" if run.name in best else "stopped at the budget")
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
    ([], "error: {bundle}: no data/ here; name the data's folder with --data"),
    (["--data={file}"], "error: --data={file}: not a folder"),
    (["--data={bundle}"], "error: {bundle}: no Train_Folder here: not monuseg's data"),
    (["--only=mt25_s5", "--data={bundle}"], "error: --only=mt25_s5: no run named mt25_s5 in this plan (it has pre_s0, "
     "pre_s1, pre_s2, sup100_s0, sup25_s0, mt25_s0, amvlm25_s0, sup50_s0, mt50_s0, amvlm50_s0, sup100_s1, sup25_s1, "
     "mt25_s1, amvlm25_s1, sup50_s1, mt50_s1, amvlm50_s1, sup100_s2, sup25_s2, mt25_s2, amvlm25_s2, sup50_s2, mt50_s2, "
     "amvlm50_s2)"),
])
def test_bad_run_flags_are_one_line_errors_before_anything_runs(tmp_path, flags, expected):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "text_encoder.tar.xz").write_bytes(b"")
    (tmp_path / "file").write_text("")
    flags = [flag.format(file=tmp_path / "file", bundle=bundle) for flag in flags]
    with pytest.raises(SystemExit) as stop:
        tool.main(["run", f"--bundle={bundle}", f"--out={tmp_path / 'out'}", *flags])
    assert str(stop.value) == expected.format(file=tmp_path / "file", bundle=bundle)
    assert not (tmp_path / "out").exists()


def test_the_medpix_table_is_the_pretraining_table_of_each_objectives_finished_seeds(tmp_path):
    runs = tool.plan([0, 1], tmp_path / "d", tmp_path / "t", tmp_path, quick=False, extra=[], experiment="medpix")
    assert tool.pretrain_table(runs, tmp_path) == "no run finished"
    top1 = {"amvlm_s0": 0.02, "amvlm_s1": 0.04, "mgca_s0": 0.01}  # mgca_s1 stopped at the budget.
    for run in runs:
        run.status = "done" if run.name in top1 else "stopped at the budget"
        if run.name in top1:
            (tmp_path / run.name / "pretrain").mkdir(parents=True)
            scores = {split: {f"{split}/t2i_top1": top1[run.name] / (2 if split == "val" else 1)}
                      for split in ("test", "val")}
            summary = {"initial_retrieval": {"test/t2i_top1": 0.01, "val/t2i_top1": 0.0},
                       "final_retrieval": {**scores["test"], **scores["val"]}}
            (tmp_path / run.name / "pretrain" / "summary.json").write_text(json.dumps(summary))
    text = tool.pretrain_table(runs, tmp_path)
    test, val = text.split("\nval:\n")
    assert "| amvlm_s0 (+1) | t2i_top1 | 1.0 ± 0.0 | 3.0 ± 1.4 | +2.0 | +1.0 | 0.295 | - |" in test
    assert "| mgca_s0 (+0) | t2i_top1 | 1.0 ± 0.0 | 1.0 ± 0.0 | +0.0 | +0.0 | - | - |" in test
    assert "| amvlm_s0 (+1) | t2i_top1 | 0.0 ± 0.0 | 1.5 ± 0.7 | +1.5 | +1.0 | 0.205 | - |" in val


@pytest.mark.parametrize("experiment, problem", [
    ("monuseg", "{data}/Train_Folder: no report sheet (Train_text.xlsx or Train_text.csv)"),
    ("medpix", "{data}/splits/descriptions_train.jsonl: corpus file not found"),
])
def test_data_that_is_not_the_experiments_is_a_one_line_error_before_any_download(tmp_path, monkeypatch, experiment,
                                                                                 problem):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("downloaded before the data's check"))
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as stop:
        tool.main(["bundle", f"--experiment={experiment}", f"--data={tmp_path / 'data'}", f"--bundle={tmp_path / 'b'}"])
    data = tmp_path / "data"
    assert str(stop.value) == f"error: --data={data}: not {experiment}'s data ({problem.format(data=data)})"
    assert not any(path.is_file() for path in (tmp_path / "b").rglob("*"))


def test_a_bundle_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "b").write_text("")
    with pytest.raises(SystemExit) as stop:  # Was a FileExistsError traceback from the folder's creation.
        tool.main(["bundle", f"--data={tmp_path / 'data'}", f"--bundle={tmp_path / 'b'}"])
    assert str(stop.value) == f"error: --bundle={tmp_path / 'b'}: is a file, not a folder"
