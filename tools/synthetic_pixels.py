"""Which blobs does a trained U-Net mark? Fractions of lesion, distractor and other pixels predicted as lesion.

    python tools/synthetic_pixels.py --config=experiments/synthetic.py --workdir=runs/syn_text [--split=test]

For a synthetic-data run: restores the workdir's best checkpoint (or
--config.eval.checkpoint) as `evaluate` does (with the fields it recorded), predicts the split at 0.5 and
counts, over all its images, the share of lesion pixels, of distractor
pixels (the look-alike blobs the report does not name, from the generator)
and of all other pixels marked as lesion. A student that learns the
distractors marks many distractor pixels; text that tells lesions from
distractors should bring that share down. Prints one line and writes
<workdir>/synthetic_pixels_<split>.json.
"""

from __future__ import annotations

import pathlib
import sys

from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from amvlm_jax.train.logging import json_text, write_atomically  # noqa: E402 (after the path above)


def marked_fractions(predicted, lesion, distractor) -> dict:
    """Shares of lesion / distractor / other pixels where ``predicted`` (N, H, W) bool is set."""
    import numpy as np

    predicted, lesion, distractor = (np.asarray(a, bool) for a in (predicted, lesion, distractor))
    other = ~lesion & ~distractor
    return {name: float(predicted[where].mean()) if where.any() else float("nan")
            for name, where in (("lesion", lesion), ("distractor", distractor), ("other", other))}


def check_split(split_name: str) -> None:
    """A one-line error for a --split no data has, before any checkpoint is read."""
    from amvlm_jax.config import ConfigError
    from amvlm_jax.data.folders import SPLIT_FOLDERS

    if split_name not in SPLIT_FOLDERS:
        raise ConfigError(f"--split={split_name}: not a split; one of {', '.join(SPLIT_FOLDERS)}")


def run_config(config, workdir: pathlib.Path):
    """``config`` with the fields the checkpoint recorded (as mode 'evaluate' reads them); one-line errors for
    a pre-training checkpoint (no U-Net) and a run on other data than the synthetic (no distractors)."""
    from amvlm_jax.config import ConfigError
    from amvlm_jax.main import checkpoint_config

    config, job = checkpoint_config(config, workdir)
    source = config.eval.checkpoint or workdir
    if job == "pretrain":
        raise ConfigError(f"{source}: a pre-training checkpoint has no U-Net to predict with")
    if config.data.name != "synthetic":
        raise ConfigError(f"{source}: a run on data.name='{config.data.name}'; tools/synthetic_pixels.py needs "
                          "the synthetic data (distractors come from its generator)")
    return config


def main(config):
    import jax
    import numpy as np

    from amvlm_jax.config import ConfigError
    from amvlm_jax.data import datasets, synthetic
    from amvlm_jax.train import checkpoint, evaluate, supervised
    from amvlm_jax.train.parallel import abstract_replicated, gather_to_host, make_mesh

    workdir = pathlib.Path(flags.FLAGS.workdir)
    split_name = flags.FLAGS.split
    check_split(split_name)
    config = run_config(config, workdir)
    root = datasets.data_root(config, workdir)
    mesh = make_mesh(config)
    model = supervised.build_unet(config)
    variables = abstract_replicated(mesh, jax.eval_shape(lambda: supervised.init_variables(config, model)))
    variables, meta, used = checkpoint.restore_variables(config.eval.checkpoint or workdir, variables)
    split = datasets.load_eval_split(config, root, split_name)
    if split is None:
        raise ConfigError(f"{root}: no {split_name} split")
    predict = evaluate.make_predict_step(model)
    predicted = []
    for start in range(0, len(split), config.train.eval_batch_size):
        rows = np.arange(start, min(start + config.train.eval_batch_size, len(split)))
        batch = evaluate.rows_batch(mesh, {"image": split.images}, rows)
        probability = np.asarray(gather_to_host(predict(variables["params"], variables["batch_stats"], batch["image"])))
        predicted.append(probability[: len(rows)] > 0.5)
    size = config.data.image_size
    distractor = np.stack([synthetic.render_sample(config.data.synthetic.seed, split_name, synthetic.file_index(n), size)
                           .distractor_mask > 0 for n in split.names])
    fractions = marked_fractions(np.concatenate(predicted), split.masks > 0, distractor)
    result = {"checkpoint": str(used), "epoch": meta.get("epoch"), "split": split_name, "images": len(split), **fractions}
    write_atomically(workdir / f"synthetic_pixels_{split_name}.json", json_text(result, indent=2) + "\n")
    print(f"{split_name}: marked as lesion: lesion px {fractions['lesion']:.3f}, distractor px "
          f"{fractions['distractor']:.3f}, other px {fractions['other']:.4f} ({used})")


def define_flags():
    flags.DEFINE_string("workdir", None, "Run folder (its best checkpoint unless --config.eval.checkpoint).", required=True)
    flags.DEFINE_string("split", "test", "Split to predict.")


if __name__ == "__main__":
    from amvlm_jax.main import start as start_command

    start_command(main, define_flags)
