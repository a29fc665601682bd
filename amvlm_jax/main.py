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



def check_command_line(argv: list[str]) -> str | None:
    """The one-line problem with --config or its overrides, or None.

    Runs before absl parses the flags, whose own errors for a missing file,
    an unknown variant or an unknown key are multi-line tracebacks.
    """
    import importlib.util

    argument = str(DEFAULT_CONFIG)
    overrides = []
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            argument = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            argument = argv[i + 1]
        elif arg.startswith("--config."):
            overrides.append(arg[2:].split("=", 1)[0])
    path, _, variant = argument.partition(":")
    if not pathlib.Path(path).is_file():
        return f"{path}: no such experiment file (--config=experiments/<name>.py[:variant])"
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config(variant) if variant else module.get_config()
    except Exception as e:  # The user's experiment file: report, don't trace.
        return f"{path}: {type(e).__name__}: {e}"
    for override in overrides:
        node, parts = config, override.split(".")[1:]
        for depth, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
                where = ".".join(["config"] + parts[:depth]) or "config"
                return f"unknown config key '--{override}': {where} has no '{part}' (known: {known})"
            node = node[part]
    return None


def define_flags() -> None:
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
        from amvlm_jax.train import checkpoint, ssl, supervised

        results = supervised.evaluate_checkpoint(config, workdir, config.eval.checkpoint)
        source = config.eval.checkpoint or pathlib.Path(workdir)
        if config.eval.guidance and "ema" in checkpoint.saved_entries(source):  # A mean-teacher checkpoint.
            ssl.evaluate_guidance(config, workdir, config.eval.checkpoint or str(source))
        return results
    if config.mode == "pretrain":
        from amvlm_jax.train import pretrain

        return pretrain.train(config, workdir)
    if config.mode == "ssl":
        from amvlm_jax.train import ssl

        return ssl.train(config, workdir)
    if config.mode == "all":
        from amvlm_jax.train import pretrain, ssl

        pretrain.train(config, workdir)
        return ssl.train(config, workdir)
    raise AssertionError(config.mode)  # validate() admits only known modes.


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from amvlm_jax.config import ConfigError
    from amvlm_jax.data.folders import DataError
    from amvlm_jax.train.checkpoint import CheckpointError
    from amvlm_jax.train.loop import TrainingError

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # Orbax logs every file it writes, and warns on every read-only restore.
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    logging.info("workdir %s\n%s", workdir, config)
    try:
        from amvlm_jax.train.parallel import initialize_distributed

        initialize_distributed(config)  # Before anything touches the devices.
        run(config, workdir)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        sys.exit(f"{e}" if str(e) else "interrupted")


if __name__ == "__main__":
    problem = check_command_line(sys.argv)
    if problem:
        sys.exit(f"error: {problem}")
    define_flags()  # After the check: config_flags parses overrides as soon as it is defined.
    app.run(main)
