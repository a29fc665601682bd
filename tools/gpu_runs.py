"""The paper-sized runs of an experiment on one GPU machine without network access, side by side.

``--experiment=monuseg`` (the default): the paper's MoNuSeg rows (authors' U-Net, width 64, 224x224, batch
16, 200 epochs; experiments/monuseg.py without the cpu variant): the supervised U-Net at all labels, 25% and
50%, and the vision-only and AMVLM-guided mean teachers at 25% and 50%, each over the seeds given; every
AMVLM run uses the encoders its seed's pre-training run learned (ViT-B/16 at 224 from scratch and the
MiniLM text encoder, 100 epochs on the 24 image-report pairs).
``--experiment=medpix``: AMVLM and MGCA pre-trained on MedPix-2.0's training split with a ViT-S/16 at 224
from scratch (experiments/medpix.py:gpu, after locked_text and long), each seed scored on dev and test
before and after (tools/pretrain_table.py). Runs go side by side, as many at a time as --parallel.

Where pip reaches a package index, build the bundle the GPU machine needs:

    python tools/gpu_runs.py bundle [--experiment=medpix] --data=DATA/MoNuSeg|DATA/MedPix-2.0 --bundle=gpu_bundle

gpu_bundle/ (keep it out of git) holds wheels/ (the packages of this project that the machine's image may
lack, at this environment's versions, for Python 3.12 on x86-64 Linux), data/ (MoNuSeg: its folders with
every image and mask already resized to 224 px by the loader's own code: read back at 224 they are the
arrays the originals give, which the bundle step checks; MedPix: its images and splits as they are) and
text_encoder.tar.xz (MiniLM with the rows of its word-embedding table that no report's or prompt's tokens
select set to zero: never read, and they make the archive small). Then, on the GPU machine, from the
repository root:

    python3 tools/gpu_runs.py run [--experiment=...] --bundle=gpu_bundle --out=DIR --work=/tmp/gpu_runs [--seeds=0,1,2] [--budget=540]

installs the wheels into the work folder, runs, and writes DIR/runs.tgz (each run's results.json or
pre-training summary, metrics.jsonl, per-image CSVs, retrieval ranks, guidance.json, config.json and the end
of its output; rewritten as runs finish, so a call cut short still returns what finished) and DIR/table.md
(MoNuSeg, per row: the best-epoch validation Dice of each seed, their mean and spread, mIoU, and the mean
validation Dice of the last 10 epochs: tools/curve.py; MedPix: tools/pretrain_table.py on test and dev).
Runs still going at --budget seconds are stopped (they save and say so). The same command again on the same
machine (the work folder still there) continues: runs that finished are kept, stopped ones resume from
their checkpoints, the rest start. On a fresh machine, ``--only=amvlm_s3,amvlm_s4`` runs just the runs a
lease left unfinished (and those they read); tools/pretrain_table.py or tools/compare.py then reads them
beside the earlier ones. A bundle larger than one call carries (MedPix: wheels and encoder 48 MiB, images
39 MiB) travels in two: ``run --prepare`` with the bundle's data/ moved out installs the wheels and the
encoder into the work folder; then ``run --data=FOLDER`` with only the data (in every call that runs: a
folder that came with an earlier call may be gone from the repository's copy by the next).
``run --quick`` is a CPU dry run of the same runs at toy sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import io
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# Imported by the project and absent from the GPU machine's image, and Orbax at the version the project's
# checkpoints are tested with (the jax, flax, optax, numpy, transformers, safetensors, PIL and absl there
# are used as they are).
BUNDLED = ("grain", "array-record", "portpicker", "ml-collections", "tensorboardX", "openpyxl", "et-xmlfile",
           "orbax-checkpoint")
SIZE = 224
# The paper's MoNuSeg rows, Dice / mIoU on the 14-image test split (this release has no test split; its U-Net
# row is printed in the 50% column), beside the table's validation numbers.
PAPER = {"sup100": "78.66 / 68.46", "mt25": "72.80 / 56.70", "amvlm25": "76.63 / 58.90", "mt50": "75.15 / 59.64",
         "amvlm50": "77.37 / 67.34"}
KEPT = ("results.json", "metrics.jsonl", "guidance.json", "config.json", "summary.json", "retrieval.json")


# ---------------------------------------------------------------------------
# bundle (here)
# ---------------------------------------------------------------------------


def bundle(experiment: str, data: pathlib.Path, out: pathlib.Path) -> None:
    """The data first (its problems are one-line errors before anything is downloaded), then the wheels and
    the encoder."""
    from amvlm_jax.config import ConfigError
    from amvlm_jax.data.folders import DataError

    out.mkdir(parents=True, exist_ok=True)
    target = out / "data" / data.name
    try:
        texts = resized_data(data, target) if experiment == "monuseg" else copied_corpus(data, target)
    except (DataError, ConfigError) as error:
        shutil.rmtree(target, ignore_errors=True)
        raise SystemExit(f"error: --data={data}: not {experiment}'s data ({error})") from None
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in BUNDLED]
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + ["--platform=manylinux2014_x86_64"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version=3.12", "--implementation=cp", *platforms, "-d", str(wheels), *pins], check=True)
    encoder_archive(texts, out / "text_encoder.tar.xz")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {total / 2**20:.1f} MiB ({len(list(wheels.iterdir()))} wheels, data, text encoder)")


def resized_data(root: pathlib.Path, target: pathlib.Path) -> list[str]:
    """Writes ``root``'s train and val folders at SIZE px under ``target`` (sheets copied) and checks that
    they load as the originals do; returns every report."""
    import numpy as np
    from PIL import Image

    from amvlm_jax.data import folders

    shutil.rmtree(target, ignore_errors=True)
    for sheet in [*root.rglob("*.xlsx"), *root.rglob("*.csv")]:
        (target / sheet.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sheet, target / sheet.relative_to(root))
    reports = []
    for split in ("train", "val"):
        for example in folders.list_split(root, split, require_masks=True):
            image, _ = folders.load_image(example.image_path, SIZE)
            mask, _ = folders.load_mask(example.mask_path, SIZE, 1)
            for array, path in ((image, example.image_path), (mask * 255, example.mask_path)):
                written = (target / path.relative_to(root)).with_suffix(".png")
                written.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array.astype(np.uint8)).save(written)
        original = folders.load_split(root, split, SIZE, progress=False)
        copy = folders.load_split(target, split, SIZE, progress=False)
        for field in ("images", "masks"):
            if not np.array_equal(getattr(original, field), getattr(copy, field)):
                raise SystemExit(f"error: {target}: the resized {split} {field} do not load as the originals do")
        if original.names != copy.names or original.reports != copy.reports:
            raise SystemExit(f"error: {target}: the {split} names or reports differ from the originals'")
        reports += list(original.reports)
    return reports


def copied_corpus(root: pathlib.Path, target: pathlib.Path) -> list[str]:
    """Copies MedPix's splits and the images they name, as they are, under ``target``; returns every report
    and zero-shot prompt (read by the corpus reader with experiments/medpix.py's fields)."""
    from amvlm_jax.data import corpus
    from amvlm_jax.experiment import load_config

    config = load_config(REPO_ROOT / "experiments" / "medpix.py")
    config.data.root = str(root)
    shutil.rmtree(target, ignore_errors=True)
    texts = [prompt for prompts in config.eval.zero_shot.values() for prompt in prompts.values()]
    for split in corpus.SPLITS:
        rows = corpus.read_split(config, split)
        texts += rows["reports"]
        for file in [root / getattr(config.data.corpus, split), *map(pathlib.Path, rows["paths"])]:
            written = target / file.resolve().relative_to(root.resolve())
            written.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, written)
    return texts


def encoder_archive(reports: list[str], path: pathlib.Path) -> None:
    """The default text encoder's folder as an xz archive, its word-embedding rows that no report's tokens
    (nor a special token) select set to zero."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from amvlm_jax.config import base_config
    from amvlm_jax.data.tokenize import ReportTokenizer
    from amvlm_jax.train import build

    source = pathlib.Path(build.text_encoder_dir(base_config()))
    # The runs' own tokenizer, at a length that cuts no report (padding included).
    used = set(np.unique(ReportTokenizer(source, 128)(reports)["input_ids"]).tolist())
    with tempfile.TemporaryDirectory() as folder:
        encoder = pathlib.Path(folder) / "text_encoder"
        shutil.copytree(source, encoder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "*.md"))
        weights = load_file(source / "model.safetensors")
        (name,) = [k for k in weights if k.endswith("word_embeddings.weight")]
        unused = np.setdiff1d(np.arange(len(weights[name])), sorted(used))
        weights[name] = weights[name].copy()
        weights[name][unused] = 0
        save_file(weights, encoder / "model.safetensors")
        with tarfile.open(path, "w:xz") as archive:
            archive.add(encoder, arcname="text_encoder")
    print(f"{path}: {len(used)} of {len(weights[name])} word rows kept, {path.stat().st_size / 2**20:.1f} MiB")


# ---------------------------------------------------------------------------
# run (there)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    name: str
    args: list[str]
    after: str = ""  # The run whose checkpoint this one reads (pre-training).
    last: str = "results.json"  # What the job writes last, under its workdir.
    # A run of the same programs that must have logged a training step first: this one then reads every program
    # from the compilation cache instead of compiling it again beside it.
    warm_after: str = ""
    process: subprocess.Popen | None = None
    log: object = None
    started: float = 0.0
    status: str = "waiting"


QUICK = ["--config.unet.base_width=4", "--config.data.image_size=32", "--config.train.batch_size=4",
         "--config.train.epochs=2", "--config.pretrain.vit=Ti/16", "--config.pretrain.vit_depth=1",
         "--config.pretrain.image_size=32", "--config.pretrain.epochs=1", "--config.pretrain.text_layers=1",
         "--config.pretrain.max_length=16", "--config.ssl.text_head_steps=2"]


def plan(seeds: list[int], data: pathlib.Path, text_encoder: pathlib.Path, work: pathlib.Path, quick: bool,
         extra: list[str], experiment: str = "monuseg") -> list[Run]:
    """Pre-training runs first, then every seed's segmentation runs, seed by seed. A later seed's run waits
    until the first seed's run of its kind has logged a step, then reads its programs from the compilation
    cache rather than compiling them beside it."""
    common = [f"--config.data.root={data}", f"--config.pretrain.text_encoder={text_encoder}",
              "--config.train.checkpoint_every_epochs=50", "--config.pretrain.checkpoint_every_epochs=25",
              "--config.train.picture_every_epochs=0", f"--config.compilation_cache={work / 'xla_cache'}",
              *(QUICK if quick else []), *extra]
    if experiment == "medpix":
        runs = [Run(f"{objective}_s{s}", [f"--config=experiments/medpix.py:{variant}gpu"], last="pretrain/summary.json")
                for s in seeds for objective, variant in (("amvlm", ""), ("mgca", "mgca,"))]
    else:
        runs = [Run(f"pre_s{s}", ["--config=experiments/monuseg.py", "--config.mode=pretrain"], last="pretrain/summary.json")
                for s in seeds]
        for s in seeds:
            runs.append(Run(f"sup100_s{s}", ["--config=experiments/monuseg.py", "--config.mode=supervised"]))
            for fraction in (25, 50):
                runs += [
                    Run(f"sup{fraction}_s{s}", [f"--config=experiments/monuseg.py:labeled{fraction}", "--config.mode=supervised"]),
                    Run(f"mt{fraction}_s{s}", [f"--config=experiments/monuseg.py:labeled{fraction},vision", "--config.mode=ssl"]),
                    Run(f"amvlm{fraction}_s{s}", [f"--config=experiments/monuseg.py:labeled{fraction}", "--config.mode=ssl",
                                                  f"--config.ssl.pretrained={work / f'pre_s{s}' / 'pretrain'}"],
                        after=f"pre_s{s}"),
                ]
    for run in runs:
        kind, seed = run.name.rsplit("_s", 1)
        run.args = [*run.args, f"--config.seed={seed}", f"--workdir={work / run.name}", *common]
        if seed != str(seeds[0]):
            run.warm_after = f"{kind}_s{seeds[0]}"
    return runs


def selected(runs: list[Run], names: list[str]) -> list[Run]:
    """The runs named (and those whose checkpoints they read), in the plan's order; a later seed whose warm-up
    leader is left out waits for the first seed of its kind that is kept instead."""
    known = {run.name: run for run in runs}
    if unknown := [name for name in names if name not in known]:
        raise SystemExit(f"error: --only={','.join(names)}: no run named {unknown[0]} in this plan "
                         f"(it has {', '.join(known)})")
    wanted = set(names) | {known[name].after for name in names if known[name].after}
    kept = [run for run in runs if run.name in wanted]
    for run in kept:
        if run.warm_after and run.warm_after not in wanted:
            kind = run.name.rsplit("_s", 1)[0]
            first = next(r for r in kept if r.name.rsplit("_s", 1)[0] == kind)
            run.warm_after = "" if first is run else first.name
    return kept


def trained(run: Run, work: pathlib.Path) -> bool:
    """Whether ``run`` has logged a training step: its programs are compiled and cached."""
    metrics = (work / run.name / run.last).parent / "metrics.jsonl"  # Beside what the job writes last.
    try:
        return any(json.loads(line).get("step", 0) > 0 for line in metrics.read_text().splitlines() if line.strip())
    except (OSError, ValueError):  # Not there yet, or a line being written.
        return False


def finished(run: Run, work: pathlib.Path) -> bool:
    """Whether an earlier call in this work folder ran ``run`` to its end (what each job writes last)."""
    return (work / run.name / run.last).is_file()


def pack(runs: list[Run], work: pathlib.Path, out: pathlib.Path) -> None:
    """out/runs.tgz: each run's small outputs and the end of its log, written whole, then renamed."""
    temporary = out / ".runs.tgz"
    with tarfile.open(temporary, "w:gz") as archive:
        for run in runs:
            folder = work / run.name
            for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
                if path.is_file() and (path.name in KEPT or path.name.startswith("per_image_") or path.parent.name == "ranks"):
                    archive.add(path, arcname=str(path.relative_to(work)))
            log = work / f"{run.name}.log"
            if log.is_file():
                tail = log.read_bytes()[-20000:]
                info = tarfile.TarInfo(f"{run.name}/log_tail.txt")
                info.size = len(tail)
                archive.addfile(info, io.BytesIO(tail))
    os.replace(temporary, out / "runs.tgz")


def pretrain_table(runs: list[Run], work: pathlib.Path) -> str:
    """Markdown: tools/pretrain_table.py on each objective's finished seeds, test and dev splits."""
    import contextlib

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import pretrain_table

    groups = {}
    for run in runs:
        if run.status == "done":
            groups.setdefault(run.name.rsplit("_s", 1)[0], []).append(str(work / run.name))
    if not groups:
        return "no run finished"
    text = io.StringIO()
    for split in ("test", "val"):
        text.write(f"\n{split}:\n")
        with contextlib.redirect_stdout(text):
            pretrain_table.main([",".join(group) for group in groups.values()] + [f"--split={split}"])
    return text.getvalue()


def table(runs: list[Run], work: pathlib.Path) -> str:
    """Markdown: per row the seeds' best-epoch val Dice (results.json), mean ± sd, mIoU, last-10 mean, the
    paper's row."""
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import curve

    lines = ["| labels | method | val Dice, seeds | mean ± sd | val mIoU mean ± sd | last-10 mean ± sd | runs done | "
             "paper, test split |", "|---|---|---|---:|---:|---:|---:|---|"]
    names = {"sup": "supervised U-Net", "mt": "MT (vision only)", "amvlm": "AMVLM-guided MT"}
    groups = {}
    for run in runs:
        kind = run.name.rsplit("_s", 1)[0]
        if not kind.startswith("pre"):
            groups.setdefault(kind, []).append(run)

    from amvlm_jax.train.logging import null_as_nan

    def spread(values):
        if not values:
            return "-"
        return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    for kind, members in groups.items():
        method, fraction = kind.rstrip("0123456789"), kind.lstrip("abcdefghijklmnopqrstuvwxyz")
        dice, miou, last = [], [], []
        for run in members:
            results = work / run.name / "results.json"
            if run.status != "done" or not results.is_file():
                continue
            val = null_as_nan(json.loads(results.read_text()).get("val") or {})  # A null score was NaN.
            dice.append(val["dice"])
            miou.append(val["miou"])
            last.append(curve.validation_summary(curve.epoch_rows(work / run.name), 10)["last_mean_dice"])
        shown = " / ".join(f"{d:.2f}" for d in dice) or "-"
        lines.append(f"| {'all' if fraction == '100' else fraction + '%'} | {names[method]} | {shown} | {spread(dice)} | "
                     f"{spread(miou)} | {spread(last)} | {len(dice)} of {len(members)} | {PAPER.get(kind, '')} |")
    return "\n".join(lines)


def imports_work(env: dict, site: pathlib.Path) -> bool:
    """Whether the jobs' imports load with the bundled packages, in seconds rather than in every run. The
    bundled Orbax is dropped for the machine's own if only it fails (it needs a recent tensorstore)."""
    check = [sys.executable, "-c", "import grain, ml_collections, tensorboardX, openpyxl, orbax.checkpoint, "
             "amvlm_jax.main, amvlm_jax.train.ssl; import jax; print('jax', jax.__version__, jax.devices())"]
    for attempt in range(2):
        done = subprocess.run(check, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            print(done.stdout.strip(), flush=True)
            return True
        bundled = list(site.glob("orbax*")) if site.is_dir() else []
        if attempt or not bundled:
            break
        print(f"the bundled Orbax does not load here ({done.stderr.strip().splitlines()[-1]}); using the machine's")
        for path in bundled:
            shutil.rmtree(path)
    print(f"error: the jobs' imports fail:\n{done.stderr[-3000:]}", flush=True)
    return False


def run_all(experiment: str, bundle_dir: pathlib.Path, data: pathlib.Path | None, out: pathlib.Path | None,
            work: pathlib.Path | None, seeds: list[int], parallel: int, budget: float, quick: bool, prepare: bool,
            extra: list[str], only: list[str] | None = None) -> int:
    started = time.monotonic()
    if data is None and not prepare:
        (data,) = [p for p in (bundle_dir / "data").iterdir() if p.is_dir()]
    expected = {"monuseg": "Train_Folder", "medpix": "splits/descriptions_train.jsonl"}[experiment]
    if data is not None and not (data / expected).exists():  # Before anything is installed or run.
        raise SystemExit(f"error: {data}: no {expected} here: not {experiment}'s data")
    if work is None:
        work = pathlib.Path(tempfile.mkdtemp(prefix="gpu_runs_"))
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    wheels = sorted((bundle_dir / "wheels").glob("*.whl"))
    # A dry run uses this environment's packages (the wheels are for Python 3.12); a later call, those installed.
    # Both are written beside their place and renamed into it, so that a call killed half-way leaves neither.
    if wheels and not quick and not site.is_dir():
        shutil.rmtree(work / "site.partial", ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(work / "site.partial"), *map(str, wheels)], check=True)
        os.replace(work / "site.partial", site)
    if not (work / "text_encoder").is_dir():
        shutil.rmtree(work / "encoder.partial", ignore_errors=True)
        with tarfile.open(bundle_dir / "text_encoder.tar.xz") as archive:
            archive.extractall(work / "encoder.partial", filter="data")
        os.replace(work / "encoder.partial" / "text_encoder", work / "text_encoder")
        (work / "encoder.partial").rmdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    if quick:
        env["JAX_PLATFORMS"] = "cpu"
    if not imports_work(env, site):
        return 2
    if prepare:
        print(f"prepared {work}: the packages and the text encoder are in place", flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(seeds, data.resolve(), work / "text_encoder", work, quick, extra, experiment)
    if only:
        runs = selected(runs, only)
    for run in runs:
        if finished(run, work):
            run.status = "done"
    done = sum(run.status == "done" for run in runs)
    print(f"{len(runs)} runs ({done} done by an earlier call), {parallel} at a time, budget {budget:.0f} s; "
          f"work folder {work}", flush=True)
    stopping = False
    while any(run.status in ("waiting", "running") for run in runs):
        for run in runs:
            if run.status == "running" and run.process.poll() is not None:
                run.status = ("done" if run.process.returncode == 0 else "stopped at the budget" if stopping
                              else f"exit {run.process.returncode}")
                run.log.close()
                print(f"{time.monotonic() - started:6.0f} s  {run.name}: {run.status} after "
                      f"{time.monotonic() - run.started:.0f} s", flush=True)
                pack(runs, work, out)
        elapsed = time.monotonic() - started
        if elapsed > budget and not stopping:
            stopping = True
            print(f"{elapsed:.0f} s: budget spent; stopping the runs still going (they save)", flush=True)
            for run in runs:
                if run.status == "running":
                    run.process.send_signal(signal.SIGTERM)
                elif run.status == "waiting":
                    run.status = "not started"
        for run in runs:
            if stopping or sum(r.status == "running" for r in runs) >= parallel:
                break
            if run.status != "waiting":
                continue
            leader = next((r for r in runs if r.name == run.warm_after), None)
            if leader is not None and leader.status in ("waiting", "running") and not trained(leader, work):
                continue
            before = next((r for r in runs if r.name == run.after), None)
            if before is not None and before.status != "done":
                if before.status not in ("waiting", "running"):
                    run.status = f"not started ({before.name}: {before.status})"
                continue
            run.log = open(work / f"{run.name}.log", "ab")  # A resumed run's log continues the stopped one's.
            run.process = subprocess.Popen([sys.executable, "-m", "amvlm_jax.main", *run.args], cwd=REPO_ROOT, env=env,
                                           stdout=run.log, stderr=subprocess.STDOUT)
            run.started, run.status = time.monotonic(), "running"
        time.sleep(1.0)
    pack(runs, work, out)
    text = pretrain_table(runs, work) if experiment == "medpix" else table(runs, work)
    statuses = "\n".join(f"- {run.name}: {run.status}" for run in runs)
    (out / "table.md").write_text(f"{text}\n\n{statuses}\n")
    print(text + "\n\n" + statuses, flush=True)
    return 0 if all(run.status == "done" for run in runs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("bundle", "run"))
    parser.add_argument("--experiment", choices=("monuseg", "medpix"), default="monuseg")
    parser.add_argument("--bundle", type=pathlib.Path, default=pathlib.Path("gpu_bundle"))
    parser.add_argument("--data", type=pathlib.Path, help="bundle: the MoNuSeg folder (LViT layout) or MedPix-2.0's; "
                        "run: the bundled data's folder where it travelled apart (default: the one under BUNDLE/data)")
    parser.add_argument("--out", type=pathlib.Path, help="run: where runs.tgz and table.md go")
    parser.add_argument("--work", type=pathlib.Path, help="run: the runs' folder (default: a new temporary one); "
                        "again on the same folder, finished runs are kept and stopped ones resume")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--parallel", type=int, default=12, help="run: processes at a time")
    parser.add_argument("--only", default="", help="run: comma-separated run names (e.g. amvlm_s3,amvlm_s4): only "
                        "those, and the runs whose checkpoints they read")
    parser.add_argument("--budget", type=float, default=540.0, help="run: seconds before the runs still going stop")
    parser.add_argument("--quick", action="store_true", help="run: toy sizes on the CPU (a dry run of this tool)")
    parser.add_argument("--prepare", action="store_true", help="run: only install the wheels and the text encoder "
                        "into --work (a first call where the data travels in a second)")
    parser.add_argument("overrides", nargs="*", help="run: more --config.a.b=value flags for every run (after --)")
    args = parser.parse_args(argv)
    if args.action == "bundle":
        if args.data is None or not args.data.is_dir():
            raise SystemExit(f"error: --data={args.data}: not a folder")
        if args.bundle.exists() and not args.bundle.is_dir():
            raise SystemExit(f"error: --bundle={args.bundle}: is a file, not a folder")
        bundle(args.experiment, args.data.resolve(), args.bundle)
        return 0
    if args.out is None and not args.prepare:
        raise SystemExit("error: run needs --out=DIR")
    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    if not seeds or not all(s.isdigit() for s in seeds):
        raise SystemExit(f"error: --seeds={args.seeds}: not a comma-separated list of seeds (0, 1, 2, ...)")
    if args.parallel < 1 or args.budget <= 0:
        raise SystemExit(f"error: --parallel={args.parallel} --budget={args.budget:g}: need at least 1 run at a time "
                         "and a budget above 0 seconds")
    work = args.work.resolve() if args.work else None
    if work is not None and work.exists() and not work.is_dir():
        raise SystemExit(f"error: --work={args.work}: not a folder")
    prepared = work is not None and (work / "text_encoder").is_dir() and ((work / "site").is_dir() or args.quick)
    if not prepared and not (args.bundle / "text_encoder.tar.xz").is_file():
        raise SystemExit(f"error: {args.bundle}: no bundle here (make it with the bundle action first)")
    if not args.prepare and args.data is None and not (args.bundle / "data").is_dir():
        raise SystemExit(f"error: {args.bundle}: no data/ here; name the data's folder with --data")
    if args.data is not None and not args.data.is_dir():
        raise SystemExit(f"error: --data={args.data}: not a folder")
    seeds = [int(s) for s in seeds]
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if only:  # Checked against the plan's names before anything runs.
        selected(plan(seeds, REPO_ROOT, REPO_ROOT, REPO_ROOT, False, [], args.experiment), only)
    return run_all(args.experiment, args.bundle.resolve(), args.data.resolve() if args.data else None,
                   args.out.resolve() if args.out else None, work, seeds, args.parallel, args.budget, args.quick,
                   args.prepare, args.overrides, only)


if __name__ == "__main__":
    sys.exit(main())
