"""Alignment-uncertainty analysis of a pre-trained AMVLM: one image against several reports, and back.

    python tools/uncertainty.py --config=experiments/synthetic.py --workdir=runs/synthetic \
        [--split=val] [--image=syn_00003.png] [--report="..."] [--count=5] [--out=DIR]

Restores the pre-trained encoders and PDT heads (<workdir>/pretrain, or
--config.ssl.pretrained), built and fed as that run recorded them (its pairs: LViT folders or a corpus;
--config.data.root reads other data), and scores image-report pairs three ways:

    global      cosine v . t of the image and report embeddings (what ITA aligns);
    tokens      the weighted mean of T_w . O_w over the report's words (each word
                against its context in the image), averaged with that of V_p . O_p
                over the image's patches (SPEC 3.2's two sides, without PDT);
    tokens+PDT  the same with the PDT constraint: 1 - (1 - T_w . O_w) c_ww and
                its patch counterpart, c (column 'c', its weighted mean over both
                sides) from the Gaussians of the PDT heads;
                c near 1 means PDT leaves the pair's similarity as it is.

and reports the PDT heads' variances (mean exp(2 logsigma)) of the report's
words and of the image's patches: how uncertain the model is about each.
A pre-training whose PDT heads did not train (pretrain.use_pdt=False, or a CSS
weight of 0: the heads keep their random initialisation) is scored without
PDT: the tokens+PDT, c and variance columns are left out ('-').
Part 1 holds one image (--image, default the split's first) against its
own report and the --count - 1 reports of the split nearest to it in
report-embedding space (semantically close, hence ambiguous, reports).
Part 2 holds that image's report (or --report) against the --count images
whose reports are nearest. Prints both tables and writes
<out>/uncertainty.json and <out>/uncertainty.png (default out:
<workdir>/uncertainty).
"""

from __future__ import annotations

import pathlib
import sys

from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from amvlm_jax.train.logging import json_text, write_atomically  # noqa: E402 (after the path above)


def load_model(config, workdir: pathlib.Path):
    """(AMVLM model, restored variables, tokenizer, image size) from the run's pre-training checkpoint, built
    as that run's recorded config describes it (its ``pretrain`` fields, not this command's)."""
    import jax

    from amvlm_jax.config import ConfigError
    from amvlm_jax.data.tokenize import ReportTokenizer
    from amvlm_jax.train import build, ssl
    from amvlm_jax.train.parallel import make_mesh

    source = ssl.pretrained_source(config, workdir)
    if not source.exists():
        raise ConfigError(f"{source}: no pre-trained model; run mode 'pretrain' or 'all' first, or set config.ssl.pretrained")
    config, model, variables, meta, used = ssl.restore_pretrained(config, source, make_mesh(config, jax.devices()[:1], 1))
    if config.pretrain.objective != "amvlm":
        raise ConfigError(f"{source}: pre-trained with objective '{config.pretrain.objective}'; the uncertainty "
                          "analysis needs the AMVLM objective's PDT heads")
    print(f"pre-trained model from {used} ({meta.get('epoch')} epochs)")
    return model, variables, ReportTokenizer(build.text_encoder_dir(config), config.pretrain.max_length), build.pretrain_image_size(config)


def make_pair_scores(model, with_pdt: bool):
    """jitted (variables, images (K, S, S, 3) float, tokens of K reports) -> per-pair scores, each (K,):
    global and tokens, and with ``with_pdt`` tokens_pdt, pdt_factor, report_variance and image_variance."""
    import jax
    import jax.numpy as jnp

    from amvlm_jax.losses.contrastive import clipped_token_weights, pdt_constraint

    def weighted_diagonal(similarity, constraint, weights):
        plain = jnp.diagonal(similarity, axis1=1, axis2=2)
        factor = jnp.diagonal(constraint, axis1=1, axis2=2)
        with_pdt = 1.0 - (1.0 - plain) * factor
        return jnp.sum(weights * plain, -1), jnp.sum(weights * with_pdt, -1), jnp.sum(weights * factor, -1)

    @jax.jit
    def scores(variables, images, tokens):
        out = model.apply(variables, images, tokens, train=False, with_pdt=with_pdt)
        word_weights = clipped_token_weights(out["word_attention"], out["word_mask"])
        patch_weights = clipped_token_weights(out["patch_attention"], jnp.ones_like(out["patch_attention"]))
        word_sim = jnp.einsum("bid,bjd->bij", out["T"], out["word_context"])
        patch_sim = jnp.einsum("bid,bjd->bij", out["V"], out["patch_context"])
        # Without PDT c = 1: the plain token similarity alone.
        word_c = pdt_constraint(out["word_pdt"]) if with_pdt else jnp.ones_like(word_sim)
        patch_c = pdt_constraint(out["patch_pdt"]) if with_pdt else jnp.ones_like(patch_sim)
        word_plain, word_pdt, word_factor = weighted_diagonal(word_sim, word_c, word_weights)
        patch_plain, patch_pdt, patch_factor = weighted_diagonal(patch_sim, patch_c, patch_weights)
        scored = {"global": jnp.sum(out["v"] * out["t"], -1), "tokens": 0.5 * (word_plain + patch_plain)}
        if not with_pdt:
            return scored
        words, patches, mask = out["word_pdt"], out["patch_pdt"], out["word_mask"]
        word_variance = jnp.exp(2.0 * words.token_logsigma).mean(-1)
        return scored | {
            "tokens_pdt": 0.5 * (word_pdt + patch_pdt),
            "pdt_factor": 0.5 * (word_factor + patch_factor),
            "report_variance": jnp.sum(word_variance * mask, -1) / jnp.maximum(mask.sum(-1), 1.0),
            "image_variance": jnp.exp(2.0 * patches.token_logsigma).mean((-2, -1)),
        }

    return scores


def nearest(embeddings, index: int, count: int, exclude_same_text=None):
    """Indices of `count` rows nearest (cosine) to row `index`, itself first; one row per distinct text."""
    import numpy as np

    order = np.argsort(-(embeddings @ embeddings[index]), kind="stable")
    chosen, seen = [index], set()
    if exclude_same_text is not None:
        seen.add(exclude_same_text[index])
    for row in order:
        if len(chosen) == count:
            break
        key = exclude_same_text[row] if exclude_same_text is not None else row
        if row != index and key not in seen:
            chosen.append(int(row))
            seen.add(key)
    return chosen


def check_flags(split_name: str, count: int) -> None:
    """One-line errors for --split and --count, before any model is built."""
    from amvlm_jax.config import ConfigError
    from amvlm_jax.data.folders import SPLIT_FOLDERS

    if split_name not in SPLIT_FOLDERS:
        raise ConfigError(f"--split={split_name}: not a split; one of {', '.join(SPLIT_FOLDERS)}")
    if count < 1:
        raise ConfigError(f"--count={count}: must be 1 or more")


def image_row(names: list[str], image_name: str, where: str) -> int:
    """Row of --image among a split's names (file stems); it may be given as a file name (syn_00003.png)."""
    from amvlm_jax.config import ConfigError
    from amvlm_jax.data.folders import file_stem

    for name in (image_name, file_stem(image_name)):
        if name in names:
            return names.index(name)
    raise ConfigError(f"--image={image_name}: not an image of {where}")


def analyse(config, workdir: pathlib.Path, split_name: str, image_name: str, report: str, count: int) -> dict:
    import jax
    import numpy as np

    from amvlm_jax.config import ConfigError, with_recorded_data
    from amvlm_jax.data import datasets
    from amvlm_jax.train import build, checkpoint, pretrain, ssl

    model, variables, tokenizer, size = load_model(config, workdir)
    recorded = checkpoint.read_meta(ssl.pretrained_source(config, workdir)).get("config")
    # PDT heads exist in every AMVLM checkpoint; only a run that used them in its CSS term trained them.
    with_pdt = build.uses_pdt(ssl.encoder_config(config, recorded))
    if not with_pdt:
        print("its PDT heads were not trained (pretrain.use_pdt=False or pretrain.weights.css=0): scored without PDT")
    config = with_recorded_data(config, recorded)
    loaded = pretrain.load_pairs(config, workdir, split_name, size)  # LViT folders or a corpus, as the run read them.
    if loaded is None:
        raise ConfigError(f"--split={split_name}: the run's data has no such split")
    split = loaded[0]
    index = 0
    if image_name:  # The data root only for the message: load_pairs resolved (and checked) it already.
        corpus_file = config.data.corpus[split_name] or config.data.corpus.train  # One file per split, or one for all.
        where = f"the {split_name} split of {corpus_file or datasets.data_root(config, workdir)}"
        index = image_row(split.names, image_name, where)
    encode_text = jax.jit(lambda v, t: model.apply(v, t, False, method=model.encode_text)["t"])
    report_embeddings = np.asarray(jax.device_get(encode_text(variables, tokenizer(split.reports))))
    scores = make_pair_scores(model, with_pdt)

    def images(rows):
        return split.images[np.asarray(rows)].astype(np.float32) / 255.0

    # Part 1: the image against its own report and the nearest other reports.
    report_rows = nearest(report_embeddings, index, count, exclude_same_text=split.reports)
    reports = [split.reports[r] for r in report_rows]
    pair_tokens = tokenizer(reports)
    image_part = jax.device_get(scores(variables, images([index] * len(reports)), pair_tokens))

    # Part 2: one report against the images whose reports are nearest to it.
    query = report or split.reports[index]
    query_tokens = tokenizer([query])
    if report:
        query_embedding = np.asarray(jax.device_get(encode_text(variables, query_tokens)))[0]
        order = np.argsort(-(report_embeddings @ query_embedding), kind="stable")
        image_rows = [int(r) for r in order[:count]]
    else:
        image_rows = nearest(report_embeddings, index, count)
    report_part = jax.device_get(scores(variables, images(image_rows),
                                        {k: np.repeat(v, len(image_rows), 0) for k, v in query_tokens.items()}))

    def rows(part, labels, own):
        return [{"label": label, "own": bool(own[i]), **{k: float(v[i]) for k, v in part.items()}} for i, label in enumerate(labels)]

    return {
        "pdt": with_pdt,
        "image": split.names[index],
        "image_vs_reports": rows(image_part, reports, [r == split.reports[index] for r in reports]),
        "report": query,
        "report_vs_images": rows(report_part, [split.names[r] for r in image_rows],
                                 [split.reports[r] == query for r in image_rows]),
    }


# Table columns: (key, heading, width, decimals); a key a row lacks (no trained PDT heads) shows '-'.
COLUMNS = (("global", "global", 8, 3), ("tokens", "tokens", 8, 3), ("tokens_pdt", "+PDT", 8, 3),
           ("pdt_factor", "c", 7, 3), ("report_variance", "var(report)", 13, 4), ("image_variance", "var(image)", 12, 4))


def format_tables(result: dict) -> str:
    header = "".join(f"{heading:>{width}}" for _, heading, width, _ in COLUMNS) + "  "

    def line(row):
        cells = "".join(f"{row[key]:>{width}.{decimals}f}" if key in row else f"{'-':>{width}}"
                        for key, _, width, decimals in COLUMNS)
        return f"{cells}  {'*' if row['own'] else ' '}{row['label']}"

    lines = [f"image {result['image']} against reports (* = its own report)", header + "report"]
    lines += [line(row) for row in result["image_vs_reports"]]
    lines += ["", f"report \"{result['report']}\" against images (* = the image of this report)", header + "image"]
    lines += [line(row) for row in result["report_vs_images"]]
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
    import numpy as np

    from amvlm_jax.visualize import _pyplot

    plt = _pyplot()
    panels = 3 if result["pdt"] else 2  # The third: the PDT heads' variances.
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    kinds = [("global", "global v.t"), ("tokens", "tokens")] + ([("tokens_pdt", "tokens + PDT")] if result["pdt"] else [])
    for axis, key, title in ((axes[0], "image_vs_reports", f"image {result['image']} vs reports"),
                             (axes[1], "report_vs_images", "report vs images")):
        rows = result[key]
        x = np.arange(len(rows))
        for offset, (kind, label) in enumerate(kinds):
            axis.bar(x + (offset - (len(kinds) - 1) / 2) * 0.27, [r[kind] for r in rows], width=0.27, label=label)
        labels = [("* " if r["own"] else "") + (r["label"] if len(r["label"]) < 28 else r["label"][:26] + "..") for r in rows]
        axis.set_xticks(x, labels, rotation=35, ha="right", fontsize=7)
        axis.set_ylabel("similarity")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7)
    if result["pdt"]:
        plot_variances(axes[2], result)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_variances(axis, result: dict) -> None:
    """The PDT heads' variances of part 1's reports and part 2's images, by rank."""
    reports, images = result["image_vs_reports"], result["report_vs_images"]
    axis.plot(range(len(reports)), [r["report_variance"] for r in reports], "o-", label="report words (part 1)")
    axis.plot(range(len(images)), [r["image_variance"] for r in images], "s-", label="image patches (part 2)")
    axis.set_xticks(range(max(len(reports), len(images))))
    axis.set_xlabel("rank (0 = own pair)")
    axis.set_ylabel("PDT variance  mean exp(2 log sigma)")
    axis.set_title("PDT uncertainty", fontsize=9)
    axis.legend(fontsize=7)


def main(config):
    FLAGS = flags.FLAGS
    workdir = pathlib.Path(FLAGS.workdir)
    out = pathlib.Path(FLAGS.out) if FLAGS.out else workdir / "uncertainty"
    check_flags(FLAGS.split, FLAGS.count)
    result = analyse(config, workdir, FLAGS.split, FLAGS.image, FLAGS.report, FLAGS.count)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "uncertainty.json", json_text(result, indent=2) + "\n")
    plot(result, out / "uncertainty.png")
    print(format_tables(result))
    print(f"\nsaved {out / 'uncertainty.json'} and {out / 'uncertainty.png'}")


def define_flags():
    flags.DEFINE_string("workdir", None, "Run folder holding pretrain/ (or set --config.ssl.pretrained).", required=True)
    flags.DEFINE_string("split", "val", "Split the images and reports come from.")
    flags.DEFINE_string("image", "", "File name of the image of part 1 (default: the split's first).")
    flags.DEFINE_string("report", "", "Report of part 2 (default: the image's own report).")
    flags.DEFINE_integer("count", 5, "Reports in part 1 and images in part 2.")
    flags.DEFINE_string("out", "", "Output folder (default <workdir>/uncertainty).")


if __name__ == "__main__":
    from amvlm_jax.main import start as start_command

    start_command(main, define_flags)
