"""Every path the docs name for --config.eval.checkpoint (a workdir, its checkpoints/ folder, a manager
folder, a step folder) resolves to a step folder; what the managers save and read back there, and their one-line
errors."""

import jax.numpy as jnp
import pytest

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


def test_a_manager_folder_without_a_step_is_a_one_line_error(tmp_path):
    checkpoint.RunCheckpoints(tmp_path).close()  # Both managers' folders, no step yet.
    for path in (tmp_path, tmp_path / "checkpoints" / "latest"):
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.resolve_step(path)
        assert str(info.value) == f"{tmp_path / 'checkpoints' / 'latest'}: holds no checkpoint step"


def test_a_best_only_save_leaves_the_latest_step_and_a_best_step_beside_a_latest_one_stays(tmp_path):
    """save(latest=False) writes the best checkpoint only; discard_orphaned_best deletes a best step only
    when there is no latest one."""
    saver = checkpoint.RunCheckpoints(tmp_path)
    saver.save(1, {"params": {"w": jnp.zeros((2,))}}, {"job": "supervised", "epoch": 1}, is_best=False)
    saver.save(2, {"params": {"w": jnp.ones((2,))}}, {"job": "supervised", "epoch": 2}, is_best=True, latest=False)
    saver.wait()
    assert (saver.latest.all_steps(), saver.best.all_steps()) == ([1], [2])
    assert saver.discard_orphaned_best() is None and saver.best.all_steps() == [2]
    saver.close()


def test_saved_entries_leave_out_empty_ones_and_a_misfit_statistic_does_not_fit(tmp_path):
    """A state entry saved as None (a supervised run's teacher) holds nothing; restoring batch statistics of
    other shapes is 'does not fit this model', not damaged data."""
    saver = checkpoint.RunCheckpoints(tmp_path)
    state = {"params": {"w": jnp.arange(2.0)}, "batch_stats": {"m": jnp.ones((2,))}, "teacher": None}
    saver.save(1, state, {"job": "supervised", "epoch": 1}, is_best=False)
    saver.wait()
    saver.close()
    assert checkpoint.saved_entries(tmp_path) == {"params", "batch_stats"}
    with pytest.raises(checkpoint.CheckpointError, match=r"/1: checkpoint does not fit this model \(Requested shape"):
        checkpoint.restore_variables(tmp_path, {"params": {"w": jnp.zeros((2,))}, "batch_stats": {"m": jnp.ones((3,))}})


def test_a_step_saved_again_in_its_folder_is_read_again_not_taken_from_an_earlier_read(tmp_path):
    """The shapes check reads a step's metadata once per process (checkpoint._state_metadata); a step deleted
    and saved again under the same number, with other shapes, is checked against what it holds now."""
    def save_width(width):
        saver = checkpoint.RunCheckpoints(tmp_path)
        for step in saver.latest.all_steps():
            saver.latest.delete(step)
        saver.save(1, {"params": {"w": jnp.zeros((width,))}}, {"job": "supervised", "epoch": 1}, is_best=False)
        saver.wait()
        saver.close()

    save_width(2)
    narrow = {"params": {"w": jnp.zeros((2,))}}
    assert checkpoint.restore_variables(tmp_path, narrow)[0]["params"]["w"].shape == (2,)
    assert checkpoint.saved_entries(tmp_path) == {"params"}  # The same read, kept.
    save_width(3)
    with pytest.raises(checkpoint.CheckpointError, match=r"does not fit this model .*\['w'\] \((2|3),\)"):
        checkpoint.restore_variables(tmp_path, narrow)
    assert checkpoint.restore_variables(tmp_path, {"params": {"w": jnp.zeros((3,))}})[0]["params"]["w"].shape == (3,)


def test_meta_that_is_no_json_object_is_named(tmp_path):
    _save(tmp_path, 1, is_best=False)
    step = tmp_path / "checkpoints" / "latest" / "1"
    (step / "meta" / "metadata").write_text("[1, 2]")
    with pytest.raises(checkpoint.DamagedCheckpoint) as info:
        checkpoint.read_meta(tmp_path)
    assert str(info.value) == f"{step / 'meta'}: unreadable checkpoint meta (not a JSON object)"


def test_a_failed_write_without_a_system_reason_is_raised_as_it_is_and_long_lines_are_cut():
    class Manager:
        directory = "/nowhere"

    with pytest.raises(RuntimeError, match="^not the system$"):
        with checkpoint._writing(Manager()):
            raise RuntimeError("not the system")
    with pytest.raises(checkpoint.CheckpointError, match=r"^/nowhere: cannot write a checkpoint there \(No space"):
        with checkpoint._writing(Manager()):
            raise OSError(28, "No space left on device")
    line = checkpoint.first_line("x" * 300 + "\nsecond")
    assert line == "x" * 197 + "..." and checkpoint.first_line("short\nsecond") == "short"


def test_a_path_under_home_resolves_and_a_file_is_no_checkpoint_folder(tmp_path, monkeypatch):
    _save(tmp_path / "run", 1, is_best=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert checkpoint.resolve_step("~/run") == tmp_path / "run" / "checkpoints" / "best" / "1"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match=f"^{tmp_path / 'notes.txt'}: not a checkpoint folder$"):
        checkpoint.resolve_step(tmp_path / "notes.txt")
