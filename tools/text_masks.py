"""How well do the pre-trained encoders locate what a report says? Text masks after pre-training or SSMIS.

    python tools/text_masks.py --config=experiments/synthetic.py --workdir=runs/synthetic [--splits=val,train]
    python tools/text_masks.py --config=experiments/synthetic.py --workdir=runs/synthetic --generator=runs/synthetic

Builds the text masks of SPEC section 5 from the pre-trained encoders
(<workdir>/pretrain or --config.ssl.pretrained), on the data the scored run
recorded (the mean-teacher run's with --generator, else the pre-training
run's; --config.data.root reads other LViT folders), with the text-mask decoder
at its initialisation (an exact upsampling: the masks show what V . t alone
says, before any L_tg training) or, with --generator, the text mask
generator a mean-teacher run trained (its checkpoint: a step folder, a
manager folder or a workdir, whose best is read): the decoder it trained
with L_tg, or the word-attention head it fitted (ssl.text_head), after the
run's mask options (e.g. ssl.text_veto_only), all as its config recorded them. It scores them against the masks of each
split: Dice of the mask at 0.5, pixel AUROC of p_text, and the mean p_text
on lesion and on background pixels. For the synthetic data it adds pixel
AUROCs of lesion pixels against all others and against distractor pixels
for the text mask, for V . t, for the CSS word-to-patch attention averaged
over a report's words and for the mask that is 1 on the cells the report
names (the reference for a mask that reads only the report), and the share
of each location word's attention (upper, lower, left, center, right) on
the third of the image it names (chance 0.33). For the synthetic data it
also reports, per kind of grid cell (holding a named lesion, a distractor,
or nothing), the image's similarity to its own report V . t averaged over
the cell's patches and the mean text mask p_text over the cell's pixels: a
text mask can only veto a distractor if its p_text is well below that of
lesion cells. A pre-training that grounds the report ranks the cells
lesion > empty, distractor. It splits every patch-report similarity by
whether the report names the patch's cell: does a lesion patch attract the
reports naming its cell (presence), or an empty patch repel them
(absence)? The tool also fits linear probes on the training split (ridge
regression, scored by AUROC on each split): do the report embeddings t say
which cells the report names, and do the patch embeddings V say whether
their cell holds a lesion or any blob? Each modality can encode its side
while V . t still ranks nothing.
Prints a table and writes <workdir>/text_masks.json (with --generator: text_masks_trained.json).
"""

from __future__ import annotations

import pathlib
import sys

from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from amvlm_jax.train.logging import json_text, write_atomically  # noqa: E402 (after the path above)


def patch_cells(grid: int, image_size: int):
    """(grid * grid,) row-major index (3 * row + col) of the grid cell holding each patch's centre."""
    import numpy as np

    from amvlm_jax.data import synthetic

    centres = (np.arange(grid) + 0.5) * image_size / grid
    cell_of = np.searchsorted(synthetic._cell_edges(image_size), centres, side="right") - 1
    return (cell_of[:, None] * synthetic.GRID_SIZE + cell_of[None, :]).ravel()


def synthetic_cells(names, split: str, seed: int, image_size: int):
    """(lesion, distractor): (N, 9) 0/1 arrays of the cells the generator drew for each file name, row-major."""
    import numpy as np

    from amvlm_jax.data import synthetic

    cells = synthetic.GRID_SIZE**2
    lesion, distractor = np.zeros((len(names), cells)), np.zeros((len(names), cells))
    for b, name in enumerate(names):
        sample = synthetic.render_sample(seed, split, synthetic.file_index(name), image_size)
        for target, drawn in ((lesion, sample.lesion_cells), (distractor, sample.distractor_cells)):
            for row, col in drawn:
                target[b, row * synthetic.GRID_SIZE + col] = 1.0
    return lesion, distractor


def ridge_predictions(features, targets, queries, strength: float = 1.0):
    """Ridge regression with an unpenalised intercept fitted on (features (N, F), targets (N, K)); (M, K) predictions."""
    import numpy as np

    mean_x, mean_y = features.mean(0), targets.mean(0)
    centred = features - mean_x
    weights = np.linalg.solve(centred.T @ centred + strength * np.eye(features.shape[1]), centred.T @ (targets - mean_y))
    return (queries - mean_x) @ weights + mean_y


def rank_auroc(scores, labels) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    import numpy as np
    from scipy.stats import rankdata

    labels = np.asarray(labels, bool).ravel()
    ranks = rankdata(np.asarray(scores, np.float64).ravel())
    positives, negatives = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def linear_probes(train: dict, evaluated: dict, image_size: int) -> dict:
    """AUROC (percent) on `evaluated` of ridge probes fitted on `train`.

    Both dicts hold 'maps' (N, h, w, D) patch embeddings V, 'reports' (N, D)
    report embeddings t, and 'lesion' / 'distractor' (N, 9) cell indicators.
    report_names_cells: t -> the 9 named-cell indicators, scored over every
    (image, cell); patch_in_lesion_cell / patch_in_blob_cell: one patch's V
    -> whether its cell holds a lesion / a lesion or a distractor.
    """
    import numpy as np

    cells = patch_cells(train["maps"].shape[1], image_size)

    def patches(data):
        return data["maps"].reshape(-1, data["maps"].shape[-1])

    result = {"report_names_cells": rank_auroc(
        ridge_predictions(train["reports"], train["lesion"], evaluated["reports"]), evaluated["lesion"])}
    for name, kinds in (("patch_in_lesion_cell", ("lesion",)), ("patch_in_blob_cell", ("lesion", "distractor"))):
        def labels(data):
            return np.clip(sum(data[kind] for kind in kinds), 0, 1)[:, cells].reshape(-1, 1)

        result[name] = rank_auroc(ridge_predictions(patches(train), labels(train), patches(evaluated)), labels(evaluated))
    return {k: 100.0 * v for k, v in result.items()}


def cell_similarities(patch_maps, reports, lesion_cells, distractor_cells, image_size: int) -> dict:
    """Mean own-report similarity V[b] . t[b] over the patches of lesion, distractor and empty grid cells.

    patch_maps (N, h, w, D) and reports (N, D) are the encoders' outputs;
    lesion_cells / distractor_cells (N, 9) come from ``synthetic_cells``.
    """
    import numpy as np

    own = np.einsum("bhwd,bd->bhw", patch_maps, reports).reshape(len(patch_maps), -1)
    cells = patch_cells(patch_maps.shape[1], image_size)
    return group_cells(own, lesion_cells[:, cells], distractor_cells[:, cells])


def naming_contrast(patch_maps, reports, lesion_cells, distractor_cells, image_size: int) -> dict:
    """Presence or absence? Patch-to-report similarity split by whether the report names the patch's cell.

    For every (image, report, patch): V[image, patch] . t[report]. Grouped
    by what the patch's cell holds in its image (lesion, distractor, empty)
    and whether the report names that cell: {kind: {'naming': mean,
    'not_naming': mean}}. Encoders that align presence give lesion patches
    naming > not_naming; encoders that align absence give empty patches
    naming < not_naming. Shapes as in ``cell_similarities``.
    """
    import numpy as np

    cells = patch_cells(patch_maps.shape[1], image_size)
    similarity = np.einsum("bpd,jd->bjp", patch_maps.reshape(len(patch_maps), -1, patch_maps.shape[-1]), reports)
    kinds = cell_kinds(lesion_cells[:, cells], distractor_cells[:, cells])  # (N, P): what each patch's cell holds.
    names = (lesion_cells[:, cells] > 0).astype(np.float64)  # (N, P): report j names patch p's cell (it names the lesions).
    result = {}
    for kind, holds in kinds.items():
        holds = holds.astype(np.float64)[:, None, :]  # (image, 1, P)
        entry = {}
        for name, weight in (("naming", holds * names[None]), ("not_naming", holds * (1.0 - names[None]))):
            if weight.sum() > 0:
                entry[name] = float(np.sum(weight * similarity) / np.sum(weight))
        result[kind] = entry
    return result


def cell_means(p_text, image_size: int):
    """(N, 9) mean of p_text (N, H, W) over the pixels of each grid cell, row-major."""
    import numpy as np

    from amvlm_jax.data import synthetic

    # A pixel is a one-pixel patch: its cell is the one holding its centre.
    one_hot = np.eye(synthetic.GRID_SIZE**2)[patch_cells(image_size, image_size)]  # (H * W, 9)
    return np.asarray(p_text, np.float64).reshape(len(p_text), -1) @ one_hot / one_hot.sum(0)


def cell_kinds(lesion_cells, distractor_cells) -> dict:
    """{'lesion', 'distractor' (and no lesion), 'empty'}: boolean masks of the indicators' shape."""
    lesion, distractor = lesion_cells > 0, distractor_cells > 0
    return {"lesion": lesion, "distractor": distractor & ~lesion, "empty": ~lesion & ~distractor}


def group_cells(values, lesion_cells, distractor_cells) -> dict:
    """Mean of per-cell values (N, 9) over lesion, distractor (not lesion) and empty cells."""
    import numpy as np

    groups = {kind: values[holds] for kind, holds in cell_kinds(lesion_cells, distractor_cells).items()}
    return {kind: float(np.mean(v)) for kind, v in groups.items() if v.size}


def word_texts(tokenizer, tokens: dict) -> list[list[str]]:
    """Text of each real word slot (its first word piece), per report."""
    import numpy as np

    texts = []
    for ids, index, mask in zip(tokens["input_ids"], tokens["word_index"], tokens["word_mask"]):
        words = []
        for slot in range(int(mask.sum())):
            first = int(np.argmax(index == slot))
            words.append(tokenizer._tokenizer.id_to_token(int(ids[first])))
        texts.append(words)
    return texts


def patch_to_pixels(patch_maps, image_size: int):
    """(N, h, w) per-patch values -> (N, S, S), each pixel taking the value of the patch holding it."""
    import numpy as np

    rows = np.arange(image_size) * patch_maps.shape[1] // image_size
    cols = np.arange(image_size) * patch_maps.shape[2] // image_size
    return np.asarray(patch_maps)[:, rows][:, :, cols]


def pixel_aurocs(scores, lesion, distractor) -> dict:
    """Pixel AUROC (percent) of scores (N, S, S) for lesion pixels against all others and against distractor pixels."""
    import numpy as np

    lesion, distractor = np.asarray(lesion, bool), np.asarray(distractor, bool)
    pair = lesion | distractor
    return {"lesion_vs_all": 100.0 * rank_auroc(scores, lesion),
            "lesion_vs_distractor": 100.0 * rank_auroc(np.asarray(scores)[pair], lesion[pair])}


LOCATION_BANDS = {"upper": (0, None), "lower": (2, None), "left": (None, 0), "center": (None, 1), "right": (None, 2)}


def word_attention_readouts(patch_maps, words, word_mask, texts, lesion, distractor, temperature: float,
                            image_size: int) -> dict:
    """What the CSS word-to-patch attention softmax_p(T_w . V_p / tau) (SPEC 3.2) points at.

    ``mean_attention``: pixel AUROCs of the attention averaged over each
    report's real words. ``location_share``: for each location word of the
    synthetic reports (upper, lower, left, center, right), the mean share of
    its attention on the third of the image it names: the grid cells holding
    the patches' centres, as ``patch_cells`` assigns them (chance about 1/3), and
    ``location_share_mean`` over all their occurrences.
    patch_maps (N, h, w, D), words (N, W, D), word_mask (N, W), texts from ``word_texts``.
    """
    import numpy as np
    from scipy.special import softmax

    count, height, width, dims = patch_maps.shape
    logits = np.einsum("bwd,bpd->bwp", words, patch_maps.reshape(count, -1, dims)) / temperature
    attention = softmax(logits, axis=-1)  # (N, W, P)
    mean = (attention * word_mask[..., None]).sum(1) / np.maximum(word_mask.sum(1, keepdims=True), 1)
    result = {"mean_attention": pixel_aurocs(patch_to_pixels(mean.reshape(count, height, width), image_size),
                                             lesion, distractor)}
    # The grid row and column of each patch's cell: the cells that the report's location words name.
    thirds_rows, thirds_cols = np.divmod(patch_cells(height, image_size).reshape(height, width), 3)
    shares = {}
    for b, report in enumerate(texts):
        for slot, text in enumerate(report):
            if text not in LOCATION_BANDS:
                continue
            row, col = LOCATION_BANDS[text]
            inside = np.ones((height, width), bool)
            if row is not None:
                inside &= thirds_rows == row
            if col is not None:
                inside &= thirds_cols == col
            shares.setdefault(text, []).append(float(attention[b, slot][inside.ravel()].sum()))
    result["location_share"] = {word: float(np.mean(v)) for word, v in shares.items()}
    every = [x for v in shares.values() for x in v]
    result["location_share_mean"] = float(np.mean(every)) if every else float("nan")
    return result


def score_split(config, guidance, split, split_name: str, batch_size: int = 25, generator=None) -> tuple[dict, dict]:
    """(scores of the text masks, features) of one split.

    generator: the text mask generator's trained variables (``ssl.restore_generator``);
    None = the decoder at its initialisation (what V . t alone says).
    features: 'maps' V (N, h, w, D), 'reports' t (N, D), 'words' T (N, W, D),
    'word_mask' (N, W) and, for synthetic data, 'lesion' / 'distractor' (N, 9)
    cell indicators and 'p_text_cells' (N, 9) the mean text mask of each grid cell.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from amvlm_jax import metrics
    from amvlm_jax.train.ssl import text_mask_outputs

    if generator is None:  # The decoder's (run_config drops a text head, which only a fitted run has).
        generator = guidance.init_generator(jax.random.PRNGKey(0))
    tokens = guidance.tokenizer(split.reports)

    @jax.jit
    def masks_of(images, batch_tokens, truth):
        x = images.astype(jnp.float32) / 255.0
        patch_map, reports = guidance.encode(guidance.variables, x, batch_tokens)
        text = guidance.model.apply(guidance.variables, batch_tokens, False, method=guidance.model.encode_text)
        p_text = text_mask_outputs(guidance, generator, guidance.variables, x, batch_tokens)[1]["p_text"]
        dice, _ = metrics.dice_iou_per_image((p_text > 0.5).astype(jnp.int32), truth.astype(jnp.int32), 1)
        return dice, patch_map, reports, p_text, text["T"], text["word_mask"]

    dices, maps, embeddings, text_cells, p_texts, words, word_masks = [], [], [], [], [], [], []
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        padded = np.resize(rows, batch_size)
        out = jax.device_get(masks_of(split.images[padded], {k: v[padded] for k, v in tokens.items()},
                                      split.masks[padded] > 0))
        for collected, value in zip((dices, maps, embeddings, p_texts, words, word_masks), out):
            collected.append(value[: len(rows)])
        text_cells.append(cell_means(p_texts[-1], config.data.image_size))
    p_text, truth = np.concatenate(p_texts), split.masks > 0
    result = {
        "images": len(split),
        "dice": 100.0 * float(np.mean(np.concatenate(dices))),
        "auroc": 100.0 * rank_auroc(p_text, truth),
        "p_text_lesion": float(p_text[truth].mean()) if truth.any() else float("nan"),
        "p_text_background": float(p_text[~truth].mean()) if (~truth).any() else float("nan"),
    }
    features = {"maps": np.concatenate(maps), "reports": np.concatenate(embeddings), "words": np.concatenate(words),
                "word_mask": np.concatenate(word_masks)}
    if config.data.name == "synthetic":
        from amvlm_jax.data import synthetic

        size = config.data.image_size
        distractor = np.stack([synthetic.render_sample(config.data.synthetic.seed, split_name, synthetic.file_index(name), size)
                               .distractor_mask > 0 for name in split.names])
        lesion = truth
        features["lesion"], features["distractor"] = synthetic_cells(split.names, split_name, config.data.synthetic.seed, size)
        own = np.einsum("bhwd,bd->bhw", features["maps"], features["reports"])
        result["pixel_auroc"] = {
            "text_mask": pixel_aurocs(p_text, lesion, distractor),
            "v_dot_t": pixel_aurocs(patch_to_pixels(own, size), lesion, distractor),
        }
        # The reference a mask that knows only the report can reach: 1 on the cells it names, 0 elsewhere.
        named = features["lesion"][:, patch_cells(size, size)].reshape(lesion.shape)
        result["pixel_auroc"]["named_cells"] = pixel_aurocs(named, lesion, distractor)
        result["word_attention"] = word_attention_readouts(
            features["maps"], features["words"], features["word_mask"], word_texts(guidance.tokenizer, tokens),
            lesion, distractor, guidance.temperature, size)
        result["own_similarity_by_cell"] = cell_similarities(
            features["maps"], features["reports"], features["lesion"], features["distractor"], config.data.image_size)
        result["similarity_by_naming"] = naming_contrast(
            features["maps"], features["reports"], features["lesion"], features["distractor"], config.data.image_size)
        features["p_text_cells"] = np.concatenate(text_cells)
        result["p_text_by_cell"] = group_cells(features["p_text_cells"], features["lesion"], features["distractor"])
    return result, features


def check_flags(splits: str, workdir: pathlib.Path) -> list[str]:
    """The splits that --splits names, and --workdir made ready for the output: one-line errors before
    any scoring."""
    from amvlm_jax.config import ConfigError
    from amvlm_jax.data.folders import SPLIT_FOLDERS

    requested = [s.strip() for s in splits.split(",") if s.strip()]
    if not requested:
        raise ConfigError(f"--splits={splits}: names no split; give some of {', '.join(SPLIT_FOLDERS)}")
    if unknown := [s for s in requested if s not in SPLIT_FOLDERS]:
        raise ConfigError(f"--splits={splits}: no split '{unknown[0]}'; one of {', '.join(SPLIT_FOLDERS)}")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # A file in the way, no permission, a read-only disk.
        raise ConfigError(f"--workdir={workdir}: cannot write the results there: {e.strerror or e}") from None
    return requested


def run_config(config, workdir: pathlib.Path, generator: str):
    """``config`` as the scored run recorded it: with a generator (a mean-teacher checkpoint), that run's
    ``ssl`` fields (its mask options and encoders) and data; else the pre-training run's data, and the
    decoder's masks whatever the command's ssl.text_head. The command's data.root reads other data. One-line
    error for a corpus, which has no masks."""
    from amvlm_jax.config import ConfigError, with_recorded, with_recorded_data
    from amvlm_jax.data import corpus
    from amvlm_jax.train import checkpoint, ssl
    from amvlm_jax.train.logging import info
    from amvlm_jax.train.loop import config_changes, recorded_config

    source = generator or ssl.pretrained_source(config, workdir)
    recorded = checkpoint.read_meta(source).get("config") if generator or pathlib.Path(source).exists() else None
    if generator and recorded:
        restored = with_recorded(config, recorded, sections=("ssl",))  # The command's ssl.pretrained stays.
        if changed := config_changes(recorded_config(config), recorded_config(restored), ("ssl",)):
            info(f"{generator}: the mean-teacher run's recorded fields replace the command's: {changed}")
        config = restored
    other_folders = bool(config.data.root)
    config = with_recorded_data(config, recorded)
    if other_folders and corpus.is_configured(config):  # A corpus run scored on LViT folders: masks live there.
        config.data.corpus.train = config.data.corpus.val = config.data.corpus.test = ""
    if not generator and config.ssl.text_head:  # E.g. the embedded default's text_report: a head is only ever fitted.
        info(f"without --generator the masks are the text-mask decoder's at its initialisation: the command's "
             f"config.ssl.text_head='{config.ssl.text_head}' (a head that a mean-teacher run fits) is not used")
        config.ssl.text_head, config.ssl.withhold_reports = "", False
    if corpus.is_configured(config):
        raise ConfigError(f"{source}: trained on a corpus ({config.data.corpus.train}), which holds no masks to score "
                          "text masks against; pass --config.data.root= LViT folders with masks")
    return config


def check_encoders(config, workdir: pathlib.Path) -> None:
    """A one-line error, in this tool's terms, when there are no pre-trained encoders to score."""
    from amvlm_jax.config import ConfigError
    from amvlm_jax.train import ssl

    source = ssl.pretrained_source(config, workdir)
    if not source.exists():
        raise ConfigError(f"{source}: no pre-trained encoders; --workdir names a pre-training run (or 'all' run) "
                          "whose pretrain/ folder holds them, or set --config.ssl.pretrained")


def main(config):
    from amvlm_jax.data import datasets, folders
    from amvlm_jax.train.parallel import make_mesh
    from amvlm_jax.train import ssl
    from amvlm_jax.train.ssl import TextGuidance

    workdir = pathlib.Path(flags.FLAGS.workdir)
    config = run_config(config, workdir, flags.FLAGS.generator)
    check_encoders(config, workdir)  # Before check_flags makes the workdir: a mistyped one is not left behind.
    requested = check_flags(flags.FLAGS.splits, workdir)
    mesh = make_mesh(config, batch_size=25)
    # Before data_root: no encoders, no synthetic data written.
    guidance = TextGuidance(config, workdir, mesh, flags.FLAGS.generator or None)
    root = datasets.data_root(config, workdir)
    generator = ssl.restore_generator(guidance, flags.FLAGS.generator, mesh) if flags.FLAGS.generator else None
    results, features = {}, {}
    synthetic_data = config.data.name == "synthetic"
    # The probes are fitted on the training split, scored or not.
    for split_name in requested + (["train"] if synthetic_data and "train" not in requested else []):
        split = folders.load_split(root, split_name, image_size=config.data.image_size,
                                   num_classes=config.data.num_classes, threads=config.data.read_threads)
        scores, features[split_name] = score_split(config, guidance, split, split_name, generator=generator)
        if split_name in requested:
            results[split_name] = scores
    if synthetic_data:
        for split_name in requested:
            results[split_name]["linear_probes"] = linear_probes(features["train"], features[split_name], config.data.image_size)
    output = workdir / ("text_masks_trained.json" if generator is not None else "text_masks.json")
    write_atomically(output, json_text(results, indent=2) + "\n")

    def by_cell(cells):
        return " / ".join(f"{cells[k]:.3f}" for k in ("lesion", "distractor", "empty") if k in cells) if cells else ""

    print(f"{'split':<8}{'images':>8}{'Dice':>8}{'AUROC':>8}{'p lesion':>10}{'p other':>9}"
          f"  by cell (lesion / distractor / empty): V.t; p_text")
    for split_name, r in results.items():
        print(f"{split_name:<8}{r['images']:>8}{r['dice']:>8.2f}{r['auroc']:>8.2f}{r['p_text_lesion']:>10.3f}"
              f"{r['p_text_background']:>9.3f}  {by_cell(r.get('own_similarity_by_cell'))}; {by_cell(r.get('p_text_by_cell'))}")
    if synthetic_data:
        print("\npixel AUROC, lesion against all other pixels / against distractor pixels; location words' attention "
              "on the third they name (chance 0.33)")
        print(f"{'split':<8}{'text mask':>14}{'V.t':>14}{'word attention':>16}{'named cells':>14}{'location share':>16}")
        for split_name, r in results.items():
            cells = [r["pixel_auroc"]["text_mask"], r["pixel_auroc"]["v_dot_t"], r["word_attention"]["mean_attention"],
                     r["pixel_auroc"]["named_cells"]]
            print(f"{split_name:<8}" + "".join(f"{c['lesion_vs_all']:>8.1f} /{c['lesion_vs_distractor']:>5.1f}" for c in cells)
                  + f"{r['word_attention']['location_share_mean']:>14.3f}")
        print("\nV.t of a patch with every report, by what the patch's cell holds: report names the cell / does not")
        for split_name, r in results.items():
            contrast = r["similarity_by_naming"]
            print(f"{split_name:<8}" + "  ".join(
                f"{kind} {contrast[kind].get('naming', float('nan')):.3f} / {contrast[kind].get('not_naming', float('nan')):.3f}"
                for kind in ("lesion", "distractor", "empty") if kind in contrast))
        print("\nlinear probes fitted on train (ridge), AUROC: t -> named cells, V -> lesion in its cell, V -> blob in its cell")
        for split_name, r in results.items():
            probes = r["linear_probes"]
            print(f"{split_name:<8}{probes['report_names_cells']:>8.2f}{probes['patch_in_lesion_cell']:>8.2f}"
                  f"{probes['patch_in_blob_cell']:>8.2f}{'  (fitted here)' if split_name == 'train' else ''}")
    print(f"\nsaved {output}")


def define_flags():
    flags.DEFINE_string("workdir", None, "Run folder holding pretrain/ (or set --config.ssl.pretrained).", required=True)
    flags.DEFINE_string("splits", "val,train", "Comma-separated splits to score.")
    flags.DEFINE_string("generator", "", "Mean-teacher checkpoint (step folder, manager folder or workdir) whose "
                        "trained text mask generator is scored; '' = the decoder at initialisation.")


if __name__ == "__main__":
    from amvlm_jax.main import start as start_command

    start_command(main, define_flags)
