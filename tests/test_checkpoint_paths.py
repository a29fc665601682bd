"""Every path the docs name for --config.eval.checkpoint (a workdir, its checkpoints/ folder, a manager
folder, a step folder) resolves to a step folder."""

import jax.numpy as jnp

from amvlm_jax.train import checkpoint


def _save(workdir, step, is_best):
    saver = checkpoint.RunCheckpoints(workdir)
    state = {"params": {"w": jnp.full((2,), float(step))}}
    saver.save(step, state, {"job": "supervised", "epoch": step}, is_best=is_best)
    saver.wait()
    saver.close()


def test_a_workdir_its_checkpoints_folder_and_a_manager_folder_resolve_to_a_step(tmp_path):
    _save(tmp_path, 1, is_best=True)
    _save(tmp_path, 2, is_best=False)
    best, latest = tmp_path / "checkpoints" / "best" / "1", tmp_path / "checkpoints" / "latest" / "2"
    assert checkpoint.resolve_step(tmp_path) == best
    assert checkpoint.resolve_step(tmp_path / "checkpoints") == best  # The README: "a `checkpoints/` folder".
    assert checkpoint.resolve_step(tmp_path / "checkpoints" / "latest") == latest
    assert checkpoint.resolve_step(best) == best


def test_a_checkpoints_folder_without_a_best_step_resolves_to_its_latest(tmp_path):
    saver = checkpoint.RunCheckpoints(tmp_path)
    saver.save(3, {"params": {"w": jnp.zeros((2,))}}, {"job": "supervised", "epoch": 3}, is_best=False)
    saver.wait()
    saver.close()
    assert checkpoint.resolve_step(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "latest" / "3"


def test_a_pretraining_runs_workdir_resolves_to_its_pretrain_folder(tmp_path):
    # It said "holds no checkpoint step": the pre-training's checkpoints are in <workdir>/pretrain/checkpoints.
    _save(tmp_path / "pretrain", 4, is_best=False)
    assert checkpoint.resolve_step(tmp_path) == tmp_path / "pretrain" / "checkpoints" / "latest" / "4"
    _save(tmp_path, 5, is_best=True)  # Mode 'all': the workdir's own checkpoints (the mean teacher's) come first.
    assert checkpoint.resolve_step(tmp_path) == tmp_path / "checkpoints" / "best" / "5"
