"""Entry point: `python -m amvlm_jax.main --config=experiments/<name>.py[:variant] [--workdir=DIR]`.

`--config.a.b=value` overrides any config field; an unknown field is an
error. No --config means experiments/synthetic.py; --workdir defaults to
runs/<experiment>[_<variant>]. config.mode picks the job.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "experiments" / "synthetic.py"

config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Experiment file, optionally ':variant'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder for checkpoints, logs and results (default runs/<experiment>).")


def default_workdir(config_argument: str) -> pathlib.Path:
    path, _, variant = config_argument.partition(":")
    name = pathlib.Path(path).stem + (f"_{variant.replace(',', '_')}" if variant else "")
    return pathlib.Path("runs") / name


def run(config, workdir: str | pathlib.Path) -> dict:
    """Runs the job that config.mode names; returns its results dict."""
    from amvlm_jax.config import validate

    validate(config)
    if config.mode == "supervised":
        from amvlm_jax.train import supervised

        return supervised.train(config, workdir)
    if config.mode == "evaluate":
        from amvlm_jax.train import supervised

        return supervised.evaluate_checkpoint(config, workdir, config.eval.checkpoint)
    raise AssertionError(config.mode)  # validate() admits only known modes.


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from amvlm_jax.config import ConfigError
    from amvlm_jax.data.folders import DataError
    from amvlm_jax.train.checkpoint import CheckpointError

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    logging.info("workdir %s\n%s", workdir, config)
    try:
        run(config, workdir)
    except (ConfigError, DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
