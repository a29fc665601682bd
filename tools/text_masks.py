"""How well do the pre-trained encoders locate what a report says? Text masks straight after pre-training.

    python tools/text_masks.py --config=experiments/synthetic.py --workdir=runs/synthetic [--splits=val,train]

Builds the text masks of SPEC section 5 from the pre-trained encoders
(<workdir>/pretrain or --config.ssl.pretrained) with the text-mask decoder
at its initialisation (an exact upsampling: the masks show what V . t alone
says, before any L_tg training) and scores them against the masks of each
split: Dice of the mask at 0.5, pixel AUROC of p_text, and the mean p_text
on lesion and on background pixels. For the synthetic data it also reports
the image's similarity to its own report, V . t, averaged over the patches
of the grid cells that hold a named lesion, a distractor, or nothing: a
pre-training that grounds the report ranks them in that order. Prints a
table and writes <workdir>/text_masks.json.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def cell_similarities(patch_maps, reports, names, split: str, seed: int, image_size: int) -> dict:
    """Mean own-report similarity V[b] . t[b] over the patches of lesion, distractor and empty grid cells.

    patch_maps (N, h, w, D) and reports (N, D) are the encoders' outputs;
    the cells are those the synthetic generator drew for each file name.
    """
    import numpy as np

    from amvlm_jax.data import synthetic

    own = np.einsum("bhwd,bd->bhw", patch_maps, reports)
    grid = own.shape[1]
    # Patch (i, j) belongs to the cell holding its centre.
    centres = (np.arange(grid) + 0.5) * image_size / grid
    edges = synthetic._cell_edges(image_size)
    cell_of = np.searchsorted(edges, centres, side="right") - 1
    groups = {"lesion": [], "distractor": [], "empty": []}
    for b, name in enumerate(names):
        sample = synthetic.render_sample(seed, split, int(pathlib.Path(name).stem[len(synthetic.FILE_PREFIX):]), image_size)
        for i in range(grid):
            for j in range(grid):
                cell = (int(cell_of[i]), int(cell_of[j]))
                kind = "lesion" if cell in sample.lesion_cells else "distractor" if cell in sample.distractor_cells else "empty"
                groups[kind].append(own[b, i, j])
    return {kind: float(np.mean(values)) for kind, values in groups.items() if values}


def score_split(config, guidance, split, split_name: str, batch_size: int = 25) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from amvlm_jax import metrics
    from amvlm_jax.models.text_mask import text_masks
    from amvlm_jax.train.ssl import AUROC_BINS

    decoder = guidance.init_decoder(jax.random.PRNGKey(0))
    tokens = guidance.tokenizer(split.reports)

    @jax.jit
    def masks_of(images, batch_tokens, valid, truth):
        x = images.astype(jnp.float32) / 255.0
        patch_map, reports = guidance.encode(guidance.variables, x, batch_tokens)
        dense = guidance.decoder.apply({"params": decoder}, patch_map)
        p_text = text_masks(dense, reports, x, x.shape[1])["p_text"]
        dice, _ = metrics.dice_iou_per_image((p_text > 0.5).astype(jnp.int32), truth.astype(jnp.int32), 1)
        positive, negative = metrics.foreground_histograms(p_text, truth, valid, AUROC_BINS)
        return dice, positive, negative, patch_map, reports

    dices, maps, embeddings = [], [], []
    positive = negative = 0.0
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        padded = np.resize(rows, batch_size)
        out = jax.device_get(masks_of(split.images[padded], {k: v[padded] for k, v in tokens.items()},
                                      np.arange(batch_size) < len(rows), split.masks[padded] > 0))
        dices.append(out[0][: len(rows)])
        positive, negative = positive + out[1], negative + out[2]
        maps.append(out[3][: len(rows)])
        embeddings.append(out[4][: len(rows)])
    centres = (np.arange(AUROC_BINS) + 0.5) / AUROC_BINS
    result = {
        "images": len(split),
        "dice": 100.0 * float(np.mean(np.concatenate(dices))),
        "auroc": 100.0 * metrics.auroc_from_histograms(positive, negative),
        "p_text_lesion": float(np.sum(positive * centres) / max(np.sum(positive), 1.0)),
        "p_text_background": float(np.sum(negative * centres) / max(np.sum(negative), 1.0)),
    }
    if config.data.name == "synthetic":
        result["own_similarity_by_cell"] = cell_similarities(
            np.concatenate(maps), np.concatenate(embeddings), split.names, split_name,
            config.data.synthetic.seed, config.data.image_size)
    return result


def main(config):
    from amvlm_jax.data import datasets, folders
    from amvlm_jax.train.parallel import make_mesh
    from amvlm_jax.train.ssl import TextGuidance

    workdir = pathlib.Path(flags.FLAGS.workdir)
    root = datasets.data_root(config, workdir)
    guidance = TextGuidance(config, workdir, make_mesh(config, batch_size=25))
    results = {}
    for split_name in [s.strip() for s in flags.FLAGS.splits.split(",") if s.strip()]:
        split = folders.load_split(root, split_name, image_size=config.data.image_size,
                                   num_classes=config.data.num_classes, threads=config.data.read_threads)
        results[split_name] = score_split(config, guidance, split, split_name)
    (workdir / "text_masks.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'split':<8}{'images':>8}{'Dice':>8}{'AUROC':>8}{'p lesion':>10}{'p other':>9}  V.t by cell (lesion / distractor / empty)")
    for split_name, r in results.items():
        cells = r.get("own_similarity_by_cell")
        cell_text = " / ".join(f"{cells[k]:.3f}" for k in ("lesion", "distractor", "empty") if k in cells) if cells else ""
        print(f"{split_name:<8}{r['images']:>8}{r['dice']:>8.2f}{r['auroc']:>8.2f}{r['p_text_lesion']:>10.3f}"
              f"{r['p_text_background']:>9.3f}  {cell_text}")
    print(f"\nsaved {workdir / 'text_masks.json'}")


def define_flags():
    flags.DEFINE_string("workdir", None, "Run folder holding pretrain/ (or set --config.ssl.pretrained).", required=True)
    flags.DEFINE_string("splits", "val,train", "Comma-separated splits to score.")


if __name__ == "__main__":
    from amvlm_jax.main import start as start_command

    start_command(main, define_flags)
