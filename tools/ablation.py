"""Runs the paper's ablation rows and prints and saves their table.

    python tools/ablation.py --config=experiments/synthetic.py:labeled25 [--workdir=runs/ablation] \
        [--rows=MT,+CSS,+ICL,+CSS+ICL,+CSS+ICL+L_tg] [--seeds=0] [--config.train.epochs=20 ...]

Rows (SPEC section 7; the variants live in amvlm_jax/experiment.py):

    MT              mean teacher without text (w_text = 0)
    +CSS            pre-training ITA + CSS + local alignment, text-guided pseudo-labels
    +ICL            pre-training ITA + ICL + local alignment, text-guided pseudo-labels
    +CSS+ICL        the full AMVLM pre-training, text-guided pseudo-labels
    +CSS+ICL+L_tg   as above, and the text-mask decoder trained on L_tg

Rows that share a pre-training objective share one pre-training run
(<workdir>/pretrain_<terms>, seeded by --config.seed whatever --seeds says, so
that a later command can add seeds); every row and seed has its own SSMIS workdir
(<workdir>/<row>_seed<S>). Every stage resumes: running the same command
again finishes what an interrupted run left. Synthetic data is generated
once into <workdir>/data. Writes <workdir>/ablation.md and ablation.json:
mean Dice / mIoU on val and test per row (mean over seeds) and a paired
t-test on per-image test Dice of each row against the first. The base config
must leave the rows what their names say: AMVLM's objective, the paper's
text-mask decoder (no ssl.text_head), no constant text mask; every row's config
is validated (check_base).
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tools"))

# Row name -> the experiment variant that sets it up.
ROWS = {
    "MT": "vision",
    "+CSS": "ab_css",
    "+ICL": "ab_icl",
    "+CSS+ICL": "ab_css_icl",
    "+CSS+ICL+L_tg": "ab_css_icl_tg",
}


def row_config(base, row: str, seed: int, workdir: pathlib.Path):
    """The config of one row and seed: the base config with the row's variant applied."""
    from amvlm_jax.experiment import COMMON_VARIANTS

    config = base.copy_and_resolve_references()
    COMMON_VARIANTS[ROWS[row]](config)
    config.seed = seed
    config.mode = "ssl"
    if config.data.name == "synthetic" and not config.data.root:
        config.data.root = str(workdir / "data")  # One copy of the generated data for every row.
    return config


def check_base(base, rows: list[str], seeds: list[int], workdir: pathlib.Path) -> None:
    """A ConfigError (one line), before anything is trained, for a base config whose rows would not be
    what their names say, or for a row's config that no run can use (``config.validate``, which the jobs
    themselves do not call).

    The rows switch AMVLM's CSS and ICL terms and the paper's text-mask decoder: under MGCA's objective
    the text-guided rows would share one pre-training; a text head (ssl.text_head) replaces the decoder
    that L_tg trains (and MT would still load the encoders); a constant text mask hides the encoders from
    every row.
    """
    from amvlm_jax.config import ConfigError, validate

    if base.pretrain.objective != "amvlm":
        raise ConfigError(f"config.pretrain.objective='{base.pretrain.objective}': the ablation rows switch AMVLM's "
                          "CSS and ICL terms, which it does not have (its text-guided rows would share one "
                          "pre-training); use pretrain.objective='amvlm'")
    if base.ssl.text_head:
        raise ConfigError(f"config.ssl.text_head='{base.ssl.text_head}': the ablation rows use the paper's text-mask "
                          "decoder (+CSS+ICL+L_tg trains it; a text head replaces it, so that row would be +CSS+ICL "
                          "again); use a config without a text_head variant")
    if base.ssl.constant_text_mask:
        raise ConfigError(f"config.ssl.constant_text_mask={base.ssl.constant_text_mask}: every text-guided row would "
                          "get the same constant text mask, whatever its pre-training; set it to 0")
    for row in rows:
        for seed in seeds:
            validate(row_config(base, row, seed, workdir))


def pretrain_key(config) -> str:
    """Name of the pre-training a row needs: the objective's non-zero terms."""
    weights = config.pretrain.weights
    terms = [name for name in ("ita", "css", "local", "icl") if weights[name]]
    return "pretrain_" + ("mgca" if config.pretrain.objective == "mgca" else "_".join(terms))


def run_rows(base, workdir: pathlib.Path, rows: list[str], seeds: list[int]) -> dict:
    """Pre-trains what the rows need, trains every row and seed, and returns {row: [run workdirs]}.

    Each run's config is resolved as main resolves a command's (``main.resolve``): recorded in its
    config.json, with absolute data and encoder paths, so that its checkpoints are evaluated from anywhere."""
    from amvlm_jax.main import resolve
    from amvlm_jax.train import pretrain, ssl

    runs = {}
    for row in rows:
        runs[row] = []
        for seed in seeds:
            config = row_config(base, row, seed, workdir)
            if ssl.text_guidance_enabled(config):
                # One pre-training serves every seed of the rows that share it. Seeded by config.seed, not by
                # a seed of --seeds: a later command adding seeds (--seeds=3,4) resumes it instead of meeting
                # a checkpoint written with another seed.
                pre_dir = workdir / pretrain_key(config)
                pre_config = config.copy_and_resolve_references()
                pre_config.seed, pre_config.mode = base.seed, "pretrain"
                print(f"== {row}: pre-training in {pre_dir}")
                pretrain.train(resolve(pre_config, pre_dir), pre_dir)
                config.ssl.pretrained = str(pre_dir / "pretrain")
            run_dir = workdir / f"{row}_seed{seed}"
            print(f"== {row}, seed {seed}: {run_dir}")
            ssl.train(resolve(config, run_dir), run_dir)
            runs[row].append(str(run_dir))
    return runs


def read_results(run_dir: str) -> dict:
    """<run_dir>/results.json, or a one-line stop for one that is missing, cut short or no JSON object."""
    path = pathlib.Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_bytes())  # A null score was NaN (json_text), made NaN below.
    except (OSError, ValueError) as error:  # ValueError: not JSON, or bytes that are no UTF-8.
        raise SystemExit(f"error: {path}: unreadable ({type(error).__name__}); run the ablation's command again "
                         "(a finished run evaluates again)") from None
    if not isinstance(results, dict):
        raise SystemExit(f"error: {path}: not a results object; run the ablation's command again")
    from amvlm_jax.train.logging import null_as_nan

    return {split: null_as_nan(scores) if isinstance(scores, dict) else scores for split, scores in results.items()}


def summarize(runs: dict, workdir: pathlib.Path) -> tuple[list[dict], str]:
    """Table rows (mean over seeds) with paired t-tests of test Dice against the first row.

    With several seeds, also the tests that keep images and seeds apart
    (`compare.seed_tests`: seed-averaged images, seed means)."""
    from compare import check_pairs, format_p, paired_t_test, pool, read_parts, seed_cells, seed_tests

    first = next(iter(runs))
    table = []
    for row, dirs in runs.items():
        entry = {"row": row, "seeds": len(dirs)}
        for split in ("val", "test"):
            per_run = [read_results(d).get(split) for d in dirs]
            if all(r is not None for r in per_run):
                entry[f"{split}_dice"] = sum(r["dice"] for r in per_run) / len(per_run)
                entry[f"{split}_miou"] = sum(r["miou"] for r in per_run) / len(per_run)
        split = "test" if "test_dice" in entry else "val"
        if row != first:
            base_parts, parts = read_parts(",".join(runs[first]), split), read_parts(",".join(dirs), split)
            base, pooled = pool(base_parts), pool(parts)
            check_pairs(base, pooled, first, row)
            entry["t"], entry["p"] = paired_t_test(base["dice"], pooled["dice"])
            entry["p_split"] = split
            entry |= seed_tests(base_parts, parts)
        table.append(entry)

    def cell(entry, key):
        return f"{entry[key]:.2f}" if key in entry else "-"

    seeded = any("p_images" in entry for entry in table)
    header = f"| row | val Dice | val mIoU | test Dice | test mIoU | p vs {first} |"
    lines = [header + (" p, seed-averaged images | p, seed means |" if seeded else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if seeded else "")]
    for entry in table:
        p = "(baseline)" if "p" not in entry else format_p(entry["p"])
        line = (f"| {entry['row']} | {cell(entry, 'val_dice')} | {cell(entry, 'val_miou')} | "
                f"{cell(entry, 'test_dice')} | {cell(entry, 'test_miou')} | {p} |")
        lines.append(line + (seed_cells(entry) if seeded else ""))
    seeds = table[0]["seeds"]
    lines.append(f"\nmean over {seeds} seed(s); paired t-test on per-image Dice "
                 f"({table[-1].get('p_split', 'test')}, seeds pooled); * = p < 0.05")
    text = "\n".join(lines)
    from amvlm_jax.train.logging import json_text, write_atomically

    write_atomically(workdir / "ablation.md", text + "\n")
    write_atomically(workdir / "ablation.json", json_text({"rows": table, "runs": runs}, indent=2) + "\n")
    return table, text


def parse_selection(rows_flag: str, seeds_flag: str) -> tuple[list[str], list[int]]:
    """(rows, seeds) from --rows and --seeds; a one-line exit for names or seeds no run can use."""
    rows = [r.strip() for r in rows_flag.split(",") if r.strip()]
    if not rows:
        sys.exit(f"error: --rows={rows_flag}: names no row; known: {', '.join(ROWS)}")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"error: unknown ablation row(s) {', '.join(unknown)}; known: {', '.join(ROWS)}")
    try:
        seeds = [int(s) for s in seeds_flag.split(",")]
    except ValueError:
        seeds = None
    # A repeated seed would pool the same run twice into the paired test.
    if seeds is None or min(seeds) < 0 or len(set(seeds)) < len(seeds):
        sys.exit(f"error: --seeds={seeds_flag}: takes distinct non-negative integers, comma-separated (e.g. 0,1,2)")
    return rows, seeds


def workdir_flag(text: str) -> pathlib.Path:
    """The --workdir folder; a one-line ConfigError for an empty value (--workdir=$UNSET), which named the
    current folder and trained the whole table there."""
    from amvlm_jax.config import ConfigError

    if not text.strip():
        raise ConfigError("--workdir is empty: name the ablation's folder, or leave --workdir out for runs/ablation")
    return pathlib.Path(text).expanduser()


def main(config):
    rows, seeds = parse_selection(flags.FLAGS.rows, flags.FLAGS.seeds)
    workdir = workdir_flag(flags.FLAGS.workdir)
    check_base(config, rows, seeds, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = run_rows(config, workdir, rows, seeds)
    _, text = summarize(runs, workdir)
    print(text)
    print(f"\nsaved {workdir / 'ablation.md'} and {workdir / 'ablation.json'}")


def define_flags():
    flags.DEFINE_string("workdir", "runs/ablation", "Folder of the ablation's runs and table.")
    flags.DEFINE_string("rows", ",".join(ROWS), "Comma-separated rows to run, the first being the baseline.")
    flags.DEFINE_string("seeds", "0", "Comma-separated SSMIS seeds per row.")


if __name__ == "__main__":
    from amvlm_jax.main import start as start_command

    start_command(main, define_flags)
