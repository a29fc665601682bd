"""The one training loop on a toy job: evaluator cadences, the best checkpoint, telemetry, the recorded meta."""

import dataclasses
import json
import math
import shutil
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from amvlm_jax.train import checkpoint, loop
from amvlm_jax.train.parallel import make_mesh, replicate
from amvlm_jax.train.state import TrainState, optimizer_telemetry

from conftest import interrupt_inside_a_gc_callback, tiny_synthetic_config

STEPS_PER_EPOCH, EPOCHS = 3, 4


@pytest.fixture(scope="module")
def toy_step():
    """SGD on (w - mean(x))^2: w moves towards 1 by a known amount every step."""

    def step(state, batch):
        def loss_fn(params):
            return jnp.mean((params["w"] - batch["x"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        state = state.apply_gradients(grads)
        return state, {"loss": loss, **optimizer_telemetry(grads, state.params)}

    return jax.jit(step)


def _job(config, workdir, mesh, step, calls, name="toy", epochs=EPOCHS):
    state = replicate(mesh, TrainState.create({"w": jnp.zeros(())}, {}, optax.sgd(0.25)))

    def batches(start_step):
        for index in range(start_step, 10**6):
            yield {"x": np.ones((2,), np.float32) * (1 + 0 * index)}

    def by_epoch(state):  # A validation score that peaks after the second epoch (steps 6).
        calls.append(("epoch", int(state.step)))
        return {"val/score": -abs(int(state.step) - 2 * STEPS_PER_EPOCH)}

    def by_step(state):
        calls.append(("step", int(state.step)))
        return {"val/w": float(state.params["w"])}

    return loop.Job(
        name=name, workdir=workdir, mesh=mesh, config=config, state=state, train_step=step, batches=batches,
        steps_per_epoch=STEPS_PER_EPOCH, epochs=epochs,
        evaluators=[loop.Evaluator(by_epoch, every_epochs=2, at_start=True), loop.Evaluator(by_step, every_epochs=0,
                                                                                             every_steps=4)],
        best_metric="val/score", log_every_steps=1, learning_rate=lambda step: 0.25,
    )


def test_loop_cadences_best_checkpoint_telemetry_and_meta(tmp_path, toy_step, capsys):
    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    calls = []
    capsys.readouterr()
    state, meta = loop.run(_job(config, tmp_path, mesh, toy_step, calls))
    # Epoch 3 is not evaluated; the best stays epoch 2's. Epoch losses: mean of 0.25^n over steps n = 7..9, 10..12.
    lines = [line.split(" [")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert lines[2:] == ["epoch 3: loss 0.0001 (best val/score 0.00 @ 2)",
                         "epoch 4: loss 0.0000 val/score -6.00 val/w 1.00 (best val/score 0.00 @ 2)"]
    # At start (step 0), every 2 epochs (steps 6) and the last epoch (12); the step evaluator every 4 steps
    # and at the last epoch.
    assert calls == [("epoch", 0), ("step", 4), ("epoch", 6), ("step", 8), ("step", 12), ("epoch", 12), ("step", 12)]
    assert int(state.step) == STEPS_PER_EPOCH * EPOCHS
    # w after n SGD steps on (w - 1)^2 with rate 0.25: 1 - 0.5^n.
    np.testing.assert_allclose(float(state.params["w"]), 1 - 0.5 ** 12, rtol=1e-6)
    assert meta["job"] == "toy" and meta["best"] == 0 and meta["best_epoch"] == 2 and meta["epoch"] == EPOCHS
    assert meta["config"]["unet"]["base_width"] == config.unet.base_width
    assert meta["initial_eval"] == {"val/score": -6}
    assert checkpoint.read_meta(tmp_path / "checkpoints" / "best")["best_epoch"] == 2
    best_step = [int(p.name) for p in (tmp_path / "checkpoints" / "best").iterdir() if p.name.isdigit()]
    assert best_step == [2 * STEPS_PER_EPOCH]

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for r in steps:
        assert r["train/steps_per_second"] > 0 and r["train/lr"] == 0.25
        # |grad| = 2 |w - 1| before the step; |w| after it.
        np.testing.assert_allclose(r["train/grad_norm"], 2 * 0.5 ** (r["step"] - 1), rtol=1e-5)
        np.testing.assert_allclose(r["train/param_norm"], 1 - 0.5 ** r["step"], rtol=1e-5)
    epochs = [r for r in records if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(epochs[1]["train/epoch_loss"], np.mean([0.25 ** n for n in range(3)]), rtol=1e-5)
    assert (tmp_path / "curves.png").is_file()

    # Run again: nothing left to do. Another job in the same workdir is refused in one line.
    again, _ = loop.run(_job(config, tmp_path, mesh, toy_step, calls))
    assert int(again.step) == 12
    with pytest.raises(checkpoint.CheckpointError, match="a checkpoint of a 'toy' run, not 'other'"):
        loop.run(_job(config, tmp_path, mesh, toy_step, calls, name="other"))
    # Other data or seed: refused, naming the fields; the data moved or read with more workers: resumed.
    other_data = tiny_synthetic_config(**{"data.synthetic.num_train": 20, "seed": 3})
    with pytest.raises(checkpoint.CheckpointError, match=r"written for other data \(config.data.synthetic.num_train=16 "
                       r"-> 20, config.seed=0 -> 3\)"):
        loop.run(_job(other_data, tmp_path, mesh, toy_step, calls))
    moved = tiny_synthetic_config(**{"data.root": str(tmp_path / "elsewhere"), "data.worker_count": 2})
    capsys.readouterr()
    assert int(loop.run(_job(moved, tmp_path, mesh, toy_step, calls))[0].step) == 12
    assert "fields changed" not in capsys.readouterr().out
    # A field that changes what the rest of the run trains (a loss weight, the rate) is accepted, and said.
    reweighted = tiny_synthetic_config(**{"pretrain.weights.css": 0.0, "train.lr": 0.5, "mesh.data": 1})
    loop.run(_job(reweighted, tmp_path, mesh, toy_step, calls))
    assert (f"the rest of the run trains with fields changed since {tmp_path}/checkpoints/latest was written: "
            "config.pretrain.weights.css=0.5 -> 0.0, config.train.lr=0.001 -> 0.5\n") in capsys.readouterr().out
    # Moved files that hold other rows (another number of steps per epoch) would shift every epoch: refused.
    with pytest.raises(checkpoint.CheckpointError, match=f"written with {STEPS_PER_EPOCH} steps per epoch, this run's "
                       f"training data, batch size and devices give {STEPS_PER_EPOCH - 1};"):
        loop.run(dataclasses.replace(_job(moved, tmp_path, mesh, toy_step, calls), steps_per_epoch=STEPS_PER_EPOCH - 1))
    unused = tiny_synthetic_config(**{"data.labeled_fraction": 0.5})
    # A changed data field is named, also where it changes the number of steps per epoch.
    with pytest.raises(checkpoint.CheckpointError, match="data.labeled_fraction=1.0 -> 0.5"):
        loop.run(dataclasses.replace(_job(unused, tmp_path, mesh, toy_step, calls), steps_per_epoch=STEPS_PER_EPOCH + 1))
    job = _job(unused, tmp_path, mesh, toy_step, calls)
    with pytest.raises(checkpoint.CheckpointError, match="data.labeled_fraction=1.0 -> 0.5"):
        loop.run(job)
    assert int(loop.run(dataclasses.replace(job, unused_fields=("data.labeled_fraction",)))[0].step) == 12


def test_a_workdir_moved_with_its_pretraining_resumes_without_naming_it_a_change(tmp_path, toy_step, capsys):
    # A mean teacher records its encoders' folder, <workdir>/pretrain, absolute: after a move of the whole workdir
    # the resume named it as a changed field, though the run trains on as it was.
    mesh = make_mesh(tiny_synthetic_config(), jax.devices()[:1])

    def run(workdir, pretrained, epochs):
        config = tiny_synthetic_config(**{"ssl.pretrained": str(pretrained)})
        loop.run(_job(config, workdir, mesh, toy_step, [], epochs=epochs))
        return capsys.readouterr().out

    run(tmp_path / "old", tmp_path / "old" / "pretrain", 1)
    shutil.move(tmp_path / "old", tmp_path / "new")
    assert "resuming from" in (out := run(tmp_path / "new", tmp_path / "new" / "pretrain", 2))
    assert "fields changed" not in out
    # Other encoders are a change, and said.
    assert (f"config.ssl.pretrained='{tmp_path}/new/pretrain' -> '{tmp_path}/other'"
            in run(tmp_path / "new", tmp_path / "other", 3))
    # Fields of a section the job does not read (pre-training: the U-Net's train.*) are not named.
    config = tiny_synthetic_config(**{"ssl.pretrained": str(tmp_path / "other"), "train.lr": 0.5})
    loop.run(dataclasses.replace(_job(config, tmp_path / "new", mesh, toy_step, [], epochs=4), unused_fields=("train",)))
    assert "resuming from" in (out := capsys.readouterr().out) and "fields changed" not in out


def test_a_job_with_several_rates_logs_each(tmp_path, toy_step):
    # Pre-training with pretrain.image_lr: the image encoder's rate is logged beside pretrain.lr's.
    config = tiny_synthetic_config()
    job = dataclasses.replace(_job(config, tmp_path, make_mesh(config, jax.devices()[:1]), toy_step, [], epochs=1),
                              evaluators=[], learning_rate=lambda step: {"lr": 0.25, "image_lr": 0.5 + step})
    loop.run(job)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["train/lr"], r["train/image_lr"]) for r in records if "train/loss" in r] == [(0.25, 0.5), (0.25, 1.5),
                                                                                          (0.25, 2.5)]


def _events(path):
    """The Event protos of a TensorBoard event file (TFRecord framing: length, its CRC, data, its CRC)."""
    from tensorboardX.proto import event_pb2

    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 8], "little")
        events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
        offset += 12 + length + 4
    return events


def _tensorboard_scalars(folder):
    """{tag: [(step, value), ...]} as TensorBoard shows the run in ``folder``: its event files read in name
    order, and a session START after the first hiding every event read before at its step or later, of
    every tag (what TensorBoard's event accumulator does with orphaned data)."""
    shown, started = {}, False
    for path in sorted(folder.iterdir()):
        for event in _events(path):
            if event.session_log.status == event.session_log.START:
                if started:
                    shown = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in shown.items()}
                started = True
            for value in event.summary.value:
                shown.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {tag: points for tag, points in shown.items() if points}


def _jsonl_scalars(workdir):
    """metrics.jsonl in the form of _tensorboard_scalars (float32 values, as event files hold them)."""
    scalars = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in record.items():
            if tag not in ("step", "time"):
                scalars.setdefault(tag, []).append((record["step"], float(np.float32(value))))
    return scalars


def test_tensorboard_shows_what_metrics_jsonl_holds_after_a_resume_that_writes_a_step_again(tmp_path):
    first = loop.MetricWriter(tmp_path, 0)
    for step in range(1, 7):
        first.write(step, {"train/loss": 1.0 / step})
    first.write(6, {"epoch": 2, "val/dice": 50.0})  # Killed after this record, before its checkpoint landed,
    first.write(7, {"train/loss": 9.0})  # and after a step past the checkpoint (step 6).
    first.close()
    second = loop.MetricWriter(tmp_path, 6, rewritten=lambda record: "epoch" in record)  # The epoch is redone.
    second.write(6, {"epoch": 2, "val/dice": 60.0})
    second.write(7, {"train/loss": 0.5})
    second.close()
    expected = _jsonl_scalars(tmp_path)
    assert expected["val/dice"] == [(6, 60.0)] and expected["train/loss"][-2:] == [(6, np.float32(1 / 6)), (7, 0.5)]
    # Before, TensorBoard hid steps from 7 on only: the redone evaluation showed twice at step 6.
    assert _tensorboard_scalars(tmp_path / "tensorboard") == expected


def test_a_record_reaches_the_event_file_within_seconds_while_the_run_goes_on(tmp_path):
    # TensorBoard reads the event file as it grows; the writer's thread flushed it every 120 s, so a run's newest
    # points showed up to 2 minutes late (metrics.jsonl had them at once).
    def shown():
        try:
            return _tensorboard_scalars(tmp_path / "tensorboard")
        except Exception:  # A record read while the thread writes it.
            return {}

    writer = loop.MetricWriter(tmp_path, 0)
    try:
        writer.write(1, {"train/loss": 0.5})
        started = time.monotonic()
        while time.monotonic() - started < 30 and "train/loss" not in shown():
            time.sleep(0.1)
        waited = time.monotonic() - started
        assert _tensorboard_scalars(tmp_path / "tensorboard") == {"train/loss": [(1, 0.5)]}
        assert waited < 10, waited
    finally:
        writer.close()


def test_a_resumed_run_drops_the_records_it_writes_again_and_a_line_cut_short(tmp_path, toy_step, monkeypatch):
    from tensorboardX import event_file_writer

    # Every event file is opened within the same second, as when a run is resumed at once.
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.7e9))
    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    loop.run(_job(config, tmp_path, mesh, toy_step, [], epochs=2))  # Checkpointed at step 6.
    metrics = tmp_path / "metrics.jsonl"
    # Logged after the checkpoint by a run killed mid-write: two records and a cut-short line.
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": 7, "time": 0.0, "train/loss": -1.0}) + "\n")
        f.write(json.dumps({"step": 8, "time": 0.0, "train/loss": -1.0}) + "\n")
        f.write('{"step": 9, "time": 0.0, "train/lo')
    loop.run(_job(config, tmp_path, mesh, toy_step, [], epochs=EPOCHS))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in losses] == list(range(1, 13)) and all(r["train/loss"] >= 0 for r in losses)
    assert [r["epoch"] for r in records if "epoch" in r] == [0, 1, 2, 3, 4]
    # The first run's event file is kept (even when the resumed run opens its own within the same second),
    # and TensorBoard is told to hide its steps from 6 on, then shown the records kept at step 6 again.
    first, second = sorted((tmp_path / "tensorboard").iterdir(), key=lambda p: p.name.endswith(".from-step-6"))
    assert first.name.endswith(".from-step-0") and max(e.step for e in _events(first)) == 2 * STEPS_PER_EPOCH
    starts = [e.step for e in _events(second) if e.session_log.status == e.session_log.START]
    assert starts == [2 * STEPS_PER_EPOCH]
    assert _tensorboard_scalars(tmp_path / "tensorboard") == _jsonl_scalars(tmp_path)
    # A whole last record without its newline (a kill between the two) gets one, or the next would merge.
    metrics.write_text(metrics.read_text().rstrip("\n"))
    writer = loop.MetricWriter(tmp_path, 12)
    writer.write(13, {"x": 1.0})
    writer.close()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()][-2:] == [12, 13]
    # A record holding bytes that are no UTF-8 (a damaged disk) is dropped, and said so: kept, it would stop
    # the curves drawn at the end of the run and every later reader of the file.
    metrics.write_bytes(metrics.read_bytes().replace(b'"step": 13', b'"step": 13, "\xff": 0', 1))
    loop.MetricWriter(tmp_path, 13).close()
    assert [json.loads(line)["step"] for line in metrics.read_text(encoding="utf-8").splitlines()][-1] == 12
    # A run that starts over (no checkpoint) starts its record over.
    shutil.rmtree(tmp_path / "checkpoints")
    loop.run(_job(config, tmp_path, mesh, toy_step, [], epochs=1))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
    assert [r["epoch"] for r in records if "epoch" in r] == [0, 1]


def test_curves_draw_one_panel_per_split_without_the_constant_counts(tmp_path):
    import warnings

    from amvlm_jax import visualize

    scores = {f"{split}/{metric}": 0.1 for split in ("train", "val", "test")
              for metric in ("i2t_top1", "i2t_top5", "zero_shot/Type/accuracy", "probe/Type/accuracy")}
    rows = [{"epoch": epoch, "train/epoch_loss": 1.0 / (epoch + 1), **{k: v * epoch for k, v in scores.items()},
             "val/probe/Type/rows": 200.0, "val/probe/Type/majority": 0.5} for epoch in range(4)]
    panels = visualize.curve_panels(rows)
    assert sorted(panels) == ["test", "train", "val"]
    assert sorted(panels["val"]) == sorted(panels["train"]) == ["i2t_top1", "i2t_top5", "probe/Type/accuracy",
                                                                "zero_shot/Type/accuracy"]  # No 'epoch_loss'.
    assert panels["test"]["i2t_top5"] == [(epoch, 0.1 * epoch) for epoch in range(4)]
    # Step rows (no epoch) are no points of the curves; without a training epoch there are no curves.
    step_row = json.dumps({"step": 3, "train/loss": 0.5}) + "\n"
    eval_only = {k: v for k, v in rows[0].items() if k != "train/epoch_loss"}
    (tmp_path / "metrics.jsonl").write_text(step_row + json.dumps(eval_only) + "\n")
    assert visualize.save_curves(tmp_path) is None and not (tmp_path / "curves.png").exists()
    (tmp_path / "metrics.jsonl").write_text(step_row + "".join(json.dumps(row) + "\n" for row in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # A legend that does not fit used to warn at every run's end.
        path = visualize.save_curves(tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pictures_draw_multiclass_ids_in_their_class_colours_and_binary_masks_in_the_panels(tmp_path):
    from amvlm_jax import visualize

    image = np.full((2, 3, 3), 100, np.uint8)
    ids = np.array([[0, 1, 2], [3, 3, 0]], np.int32)
    tinted, value, _ = visualize.tint(image, ids, "prediction")
    colours = visualize.class_colours(4) / 255.0
    for y, x in ((0, 1), (0, 2), (1, 0)):
        np.testing.assert_allclose(tinted[y, x], 0.55 * 100 / 255 + 0.45 * colours[ids[y, x]], rtol=1e-6)
    np.testing.assert_allclose(tinted[0, 0], 100 / 255, rtol=1e-6)
    assert len({tuple(tinted[0, 1]), tuple(tinted[0, 2]), tuple(tinted[1, 0])}) == 3
    # A 0/1 mask and a probability: the panel's colour, by the value (a 0/1 class-id panel is a binary one).
    for panel in (np.array([[0, 1, 1], [0, 0, 0]], np.uint8), np.array([[0.0, 1.0, 0.5], [0, 0, 0]], np.float32)):
        tinted, value, edge = visualize.tint(image, panel, "truth")
        np.testing.assert_allclose(edge, visualize.OVERLAY_COLORS["truth"])
        np.testing.assert_allclose(tinted[0, 1], 0.55 * 100 / 255 + 0.45 * np.array(visualize.OVERLAY_COLORS["truth"]),
                                   rtol=1e-6)
    # In a multi-class task an image holding only class 1 still draws it in class 1's colour, not the panel's.
    only_one = np.array([[0, 1, 1], [0, 0, 0]], np.uint8)
    tinted, _, _ = visualize.tint(image, only_one, "truth", num_classes=4)
    np.testing.assert_allclose(tinted[0, 1], 0.55 * 100 / 255 + 0.45 * colours[1], rtol=1e-6)
    assert visualize.save_overlays(tmp_path / "p.png", image[None], {"truth": ids[None].astype(np.uint8),
                                                                     "prediction": ids[None]}, num_classes=4).is_file()


def test_catching_interrupts_leaves_an_ignored_sigint_ignored_and_keeps_a_dropped_ctrl_c():
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # As in a background job.
    try:
        with loop.catching_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with loop.catching_interrupts():
            handler = signal.getsignal(signal.SIGINT)
            assert handler is not signal.default_int_handler
            with loop.catching_interrupts():  # Nested (main, then the loop): the outer handler stays.
                assert signal.getsignal(signal.SIGINT) is handler
            loop.stop_if_interrupted()  # No Ctrl-C yet: nothing raised.
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
            # The KeyboardInterrupt above is what Python may drop; the flag remembers it.
            with pytest.raises(KeyboardInterrupt):
                loop.stop_if_interrupted()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        loop.stop_if_interrupted()  # Cleared on exit.
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_tied_score_keeps_the_earlier_best_checkpoint(tmp_path, toy_step):
    """The best is saved when best_metric improves: an equal score later (a Dice that stays 0 while the
    U-Net predicts nothing, or one that stays at a plateau) leaves the first epoch that reached it."""
    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    job = dataclasses.replace(_job(config, tmp_path, mesh, toy_step, [], epochs=2),
                              evaluators=[loop.Evaluator(lambda state: {"val/score": 0.5}, every_epochs=1)])
    _, meta = loop.run(job)
    assert meta["best"] == 0.5 and meta["best_epoch"] == 1
    assert [p.name for p in (tmp_path / "checkpoints" / "best").iterdir() if p.name.isdigit()] == [str(STEPS_PER_EPOCH)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # The dropped KeyboardInterrupt.
def test_a_ctrl_c_dropped_during_evaluation_stops_it_at_the_next_batch():
    import signal

    from amvlm_jax.data.folders import SplitArrays
    from amvlm_jax.train import evaluate, parallel

    calls = []

    def eval_step(params, batch_stats, batch):
        calls.append(len(calls))
        if len(calls) == 2:
            interrupt_inside_a_gc_callback()
        rows = batch["image"].shape[0]
        return jnp.ones((rows, 1)), jnp.ones((rows, 1)), jnp.ones((rows, 1), bool)

    split = SplitArrays([f"image_{i}" for i in range(8)], np.zeros((8, 4, 4, 3), np.uint8), np.zeros((8, 4, 4), np.uint8),
                        [""] * 8)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), parallel.MESH_AXES)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # A pytest-xdist worker ignores SIGINT.
    try:
        with loop.catching_interrupts(), pytest.raises(KeyboardInterrupt):
            evaluate.evaluate_split(eval_step, None, None, split, mesh, batch_size=2)
    finally:
        signal.signal(signal.SIGINT, before)
    assert calls == [0, 1]  # Batch 2 ran to its end (the interrupt was lost in it); batch 3 never started.
    dice, _, _ = evaluate.evaluate_split(eval_step, None, None, split, mesh, batch_size=2)  # Outside: as before.
    assert dice.shape == (8, 1)


@pytest.mark.parametrize("where", ["evaluation", "end_of_epoch"])
def test_a_run_stopped_between_an_epochs_last_step_and_its_checkpoint_finishes_that_epoch_on_resume(
        tmp_path, toy_step, where):
    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    reference, refreshes, stops = [], [], []
    armed = []  # Not in the reference run.
    job = _job(config, tmp_path / "reference", mesh, toy_step, reference)

    def refresh(state):
        refreshes.append(int(state.step))
        if where == "end_of_epoch" and int(state.step) == EPOCHS * STEPS_PER_EPOCH and armed and not stops:
            stops.append(int(state.step))
            raise KeyboardInterrupt  # In the last epoch's end-of-epoch work.
        return state

    uninterrupted, _ = loop.run(dataclasses.replace(job, end_of_epoch=refresh))
    expected = (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    refreshes.clear()
    armed.append(True)
    calls = []
    job = _job(config, tmp_path / "run", mesh, toy_step, calls)
    by_epoch = job.evaluators[0].run

    def stopping_evaluation(state):  # Ctrl-C in the evaluation after epoch 2, which is the best epoch.
        if where == "evaluation" and int(state.step) == 2 * STEPS_PER_EPOCH and not stops:
            stops.append(int(state.step))
            raise KeyboardInterrupt
        return by_epoch(state)

    job.evaluators[0].run = stopping_evaluation
    job = dataclasses.replace(job, end_of_epoch=refresh)
    stopped_at = 2 * STEPS_PER_EPOCH if where == "evaluation" else EPOCHS * STEPS_PER_EPOCH
    with pytest.raises(KeyboardInterrupt, match=f"saved .*latest/{stopped_at}"):
        loop.run(job)
    state, meta = loop.run(job)
    # The stopped epoch is finished: its end-of-epoch work runs once more only if it was the part cut short.
    epoch_ends = [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    assert refreshes == epoch_ends + ([stopped_at] if where == "end_of_epoch" else [])
    assert [c for c in calls if c[0] == "epoch"] == [("epoch", 0), ("epoch", 6), ("epoch", 12)]
    np.testing.assert_array_equal(state.params["w"], uninterrupted.params["w"])
    assert meta["epoch"] == EPOCHS and meta["best_epoch"] == 2 and "unfinished_epoch" not in meta
    best_step = [int(p.name) for p in (tmp_path / "run" / "checkpoints" / "best").iterdir() if p.name.isdigit()]
    assert best_step == [2 * STEPS_PER_EPOCH]
    # The same records as a run that was never stopped, the epoch's training means included.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reference_records = [json.loads(line) for line in expected]
    assert [r["step"] for r in records] == [r["step"] for r in reference_records]
    for ours, theirs in zip(records, reference_records):
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            if key not in ("time", "epoch_seconds") and "steps_per_second" not in key:
                np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, err_msg=key)


def test_a_ctrl_c_inside_interrupts_deferred_lands_at_the_blocks_end():
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # A pytest-xdist worker ignores SIGINT.
    done = []
    try:
        with loop.catching_interrupts(), pytest.raises(KeyboardInterrupt):
            with loop.interrupts_deferred():
                signal.raise_signal(signal.SIGINT)
                done.append("after the Ctrl-C")
            done.append("after the block")
    finally:
        signal.signal(signal.SIGINT, before)
    assert done == ["after the Ctrl-C"]
    # A second Ctrl-C inside the block stops at once.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with loop.catching_interrupts(), pytest.raises(KeyboardInterrupt):
            with loop.interrupts_deferred():
                signal.raise_signal(signal.SIGINT)
                done.append("after the first")
                signal.raise_signal(signal.SIGINT)
                done.append("after the second")
    finally:
        signal.signal(signal.SIGINT, before)
    assert done == ["after the Ctrl-C", "after the first"]


def _records(workdir):
    """metrics.jsonl without what varies between runs of the same steps (times, rates)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "epoch_seconds", "train/steps_per_second")}
            for r in records]


def test_ctrl_c_between_a_step_and_its_record_and_in_a_step_evaluation_loses_no_record(tmp_path, toy_step):
    import signal

    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    loop.run(_job(config, tmp_path / "reference", mesh, toy_step, []))
    calls, stops = [], []
    job = _job(config, tmp_path / "run", mesh, toy_step, calls)

    def learning_rate(step):  # Called after the step's state is kept and before its record is written.
        if step + 1 == 5 and 5 not in stops:
            stops.append(5)
            signal.raise_signal(signal.SIGINT)
        return 0.25

    by_step = job.evaluators[1].run

    def stopping_by_step(state):
        if int(state.step) == 8 and 8 not in stops:
            stops.append(8)
            raise KeyboardInterrupt
        return by_step(state)

    job.evaluators[1].run = stopping_by_step
    job = dataclasses.replace(job, learning_rate=learning_rate)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # A pytest-xdist worker ignores SIGINT.
    try:
        with pytest.raises(KeyboardInterrupt, match="saved .*latest/5"):
            loop.run(job)
        with pytest.raises(KeyboardInterrupt, match="saved .*latest/8"):
            loop.run(job)
        assert checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "latest")["unfinished_step_evaluation"] == 8
        loop.run(job)
    finally:
        signal.signal(signal.SIGINT, before)
    assert _records(tmp_path / "run") == _records(tmp_path / "reference")
    assert [c for c in calls if c[0] == "step"] == [("step", 4), ("step", 8), ("step", 12), ("step", 12)]


def test_an_epoch_finished_by_a_resumed_run_applies_end_of_epoch_once_however_often_it_restarts(tmp_path, toy_step):
    import signal

    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    refreshes, events, halved = [], [], {}

    def halve(state):  # Not idempotent: applied twice or never, the final weight differs.
        refreshes.append(int(state.step))
        halved.setdefault(int(state.step), state.params["w"] * 0.5)
        return state.replace(params={"w": state.params["w"] * 0.5})

    def learning_rate(step):
        if step + 1 == 2 * STEPS_PER_EPOCH and "stop" in events:  # The epoch's last step, before halve.
            events.remove("stop")
            signal.raise_signal(signal.SIGINT)
        if step + 1 == 2 * STEPS_PER_EPOCH + 2 and "crash" in events:  # A kill after the epoch was finished.
            events.remove("crash")
            raise RuntimeError("killed")
        return 0.25

    def job(name):
        return dataclasses.replace(_job(config, tmp_path / name, mesh, toy_step, []), end_of_epoch=halve,
                                   learning_rate=learning_rate)

    reference, _ = loop.run(job("reference"))
    refreshes.clear()
    events += ["stop", "crash"]
    state_w = lambda: {"w": jax.ShapeDtypeStruct((), jnp.float32)}  # noqa: E731
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # A pytest-xdist worker ignores SIGINT.
    try:
        with pytest.raises(KeyboardInterrupt, match=f"saved .*latest/{2 * STEPS_PER_EPOCH}"):
            loop.run(job("run"))
        # The stopped run halved before saving: its checkpoint holds the state that epoch 2 is evaluated with.
        assert checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "latest")["unfinished_epoch"]["refreshed"]
        with pytest.raises(RuntimeError, match="killed"):
            loop.run(job("run"))  # Finishes epoch 2 (evaluation, record, no second halve), then dies.
        meta = checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "latest")
        assert meta["epoch"] == 2 and "end_of_epoch_after_restore" not in meta and "unfinished_epoch" not in meta
        # What an evaluation or prediction reads from that latest checkpoint: the halved weight, not the one before.
        saved, _, _ = checkpoint.restore_variables(tmp_path / "run" / "checkpoints" / "latest", {"params": state_w()})
        np.testing.assert_array_equal(saved["params"]["w"], halved[2 * STEPS_PER_EPOCH])
        state, meta = loop.run(job("run"))
    finally:
        signal.signal(signal.SIGINT, before)
    assert refreshes == [3, 6, 9, 12]  # Epoch 2's once, by the stopped run.
    np.testing.assert_array_equal(state.params["w"], reference.params["w"])
    assert _records(tmp_path / "run") == _records(tmp_path / "reference")
    assert meta["best_epoch"] == 2


def test_a_stop_with_a_step_evaluation_due_at_the_epochs_end_saves_before_end_of_epoch_and_flags_it(tmp_path,
                                                                                                    toy_step):
    # The step evaluation due at that step sees the state before end_of_epoch, so the stopped run saves that
    # state; the resumed run finishes the epoch and flags the checkpoint, and a later restore applies it.
    import signal

    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    last = STEPS_PER_EPOCH * EPOCHS  # The step evaluator (every 4 steps) is due at the last epoch's end too.
    refreshes, stops = [], []

    def halve(state):  # Not idempotent: applied twice or never, the final weight differs.
        refreshes.append(int(state.step))
        return state.replace(params={"w": state.params["w"] * 0.5})

    def learning_rate(step):
        if step + 1 == last and stops:
            stops.clear()
            signal.raise_signal(signal.SIGINT)
        return 0.25

    def job(name):
        return dataclasses.replace(_job(config, tmp_path / name, mesh, toy_step, []), end_of_epoch=halve,
                                   learning_rate=learning_rate)

    reference, _ = loop.run(job("reference"))
    stops.append("stop")
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # A pytest-xdist worker ignores SIGINT.
    try:
        with pytest.raises(KeyboardInterrupt, match=f"saved .*latest/{last}"):
            loop.run(job("run"))
        assert checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "latest")["unfinished_step_evaluation"] == last
        loop.run(job("run"))  # Evaluates step 12, finishes the epoch (halve), flags the checkpoint saved before.
        assert checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "latest")["end_of_epoch_after_restore"]
        refreshes.clear()
        state, _ = loop.run(job("run"))  # Nothing left: the restore applies the last epoch's end once.
    finally:
        signal.signal(signal.SIGINT, before)
    assert refreshes == [last]
    np.testing.assert_array_equal(state.params["w"], reference.params["w"])
    assert _records(tmp_path / "run") == _records(tmp_path / "reference")


def test_ctrl_c_after_an_epochs_means_are_taken_keeps_them_for_the_resumed_run(tmp_path, toy_step, monkeypatch):
    import signal

    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    loop.run(_job(config, tmp_path / "reference", mesh, toy_step, []))
    real_check, stops = loop.check_finite, []

    def check_finite(loss, step, workdir):  # The epoch mean's check, outside every deferred block.
        if step == 2 * STEPS_PER_EPOCH and not loop._deferring.is_set() and not stops:
            stops.append(step)
            signal.raise_signal(signal.SIGINT)
        real_check(loss, step, workdir)

    monkeypatch.setattr(loop, "check_finite", check_finite)
    job = _job(config, tmp_path / "run", mesh, toy_step, [])
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # A pytest-xdist worker ignores SIGINT.
    try:
        with pytest.raises(KeyboardInterrupt, match=f"saved .*latest/{2 * STEPS_PER_EPOCH}"):
            loop.run(job)
        loop.run(job)
    finally:
        signal.signal(signal.SIGINT, before)
    assert _records(tmp_path / "run") == _records(tmp_path / "reference")  # Epoch 2's training means included.


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # The dropped KeyboardInterrupt.
def test_the_gc_callback_interrupt_lands_while_another_thread_is_collecting():
    """The helper the Ctrl-C tests use: gc.collect() does nothing while another thread collects (a
    finalizer that sleeps holds that collection open here), which once let a Ctrl-C test train on
    without its Ctrl-C."""
    import gc
    import signal
    import threading
    import time

    class SlowToFinalize:
        def __del__(self):
            time.sleep(0.3)

    def collect_garbage_slowly():
        cycle = SlowToFinalize()
        cycle.itself = cycle
        del cycle
        gc.collect()

    handled_in = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: handled_in.append(threading.current_thread()))
    collector = threading.Thread(target=collect_garbage_slowly)
    try:
        collector.start()
        time.sleep(0.1)
        interrupt_inside_a_gc_callback()
    finally:
        collector.join()
        signal.signal(signal.SIGINT, before)
    assert handled_in == [threading.main_thread()]


def test_sigterm_saves_like_ctrl_c_and_the_resumed_run_writes_the_uninterrupted_records(tmp_path, toy_step):
    """A scheduler's stop or a preemption notice (SIGTERM) during a step: the step and its record land,
    the state is saved, and the same run resumes to what an uninterrupted run writes. Before, SIGTERM
    ended the process where it stood, and the run resumed from its last epoch's checkpoint."""
    import signal

    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    whole, _ = loop.run(_job(config, tmp_path / "reference", mesh, toy_step, []))
    job = _job(config, tmp_path / "run", mesh, toy_step, [])

    def step_terminated_at_4(state, batch):
        if int(state.step) == 4 and not (tmp_path / "run" / "checkpoints" / "latest" / "5").exists():
            signal.raise_signal(signal.SIGTERM)
        return toy_step(state, batch)

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt, match="saved .*latest/5"):
            loop.run(dataclasses.replace(job, train_step=step_terminated_at_4))
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # The loop's handler is gone.
        resumed, _ = loop.run(job)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert float(resumed.params["w"]) == float(whole.params["w"])
    assert _records(tmp_path / "run") == _records(tmp_path / "reference")


def test_a_best_epoch_between_two_due_checkpoints_is_saved_as_the_best_only(tmp_path, toy_step, monkeypatch):
    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    job = _job(config, tmp_path, mesh, toy_step, [])
    peak = 3 * STEPS_PER_EPOCH  # The score peaks after epoch 3, between the checkpoints of epochs 2 and 4.
    job.evaluators = [loop.Evaluator(lambda state: {"val/score": -abs(int(state.step) - peak)})]
    saves = []
    save = checkpoint.RunCheckpoints.save

    def recording_save(self, step, state, meta, is_best, latest_meta=None, latest=True):
        saves.append((step, is_best, latest))
        return save(self, step, state, meta, is_best, latest_meta, latest)

    monkeypatch.setattr(checkpoint.RunCheckpoints, "save", recording_save)
    state, meta = loop.run(dataclasses.replace(job, checkpoint_every_epochs=2))
    assert saves == [(3, True, False), (6, True, True), (9, True, False), (12, False, True)]
    assert meta["best_epoch"] == 3 and checkpoint.read_meta(tmp_path / "checkpoints" / "best")["epoch"] == 3
    assert checkpoint.read_meta(tmp_path / "checkpoints" / "latest")["epoch"] == EPOCHS


def test_a_best_checkpoint_left_without_a_latest_one_is_replaced_by_the_next_runs_own(tmp_path, toy_step):
    """A run killed after its first best save but before its first latest save landed (or whose latest step was
    deleted) left checkpoints/best/6; the next run in the workdir, here on other data, starts at step 0 and its
    best is step 6 too. Orbax skips a save at or below a step it holds: the other run's best stayed, evaluated as
    this run's."""
    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    loop.run(_job(config, tmp_path, mesh, toy_step, []))
    shutil.rmtree(tmp_path / "checkpoints" / "latest")

    def threes(start_step):
        for _ in range(start_step, 10**6):
            yield {"x": np.full((2,), 3.0, np.float32)}

    loop.run(dataclasses.replace(_job(config, tmp_path, mesh, toy_step, []), batches=threes))
    best, meta, used = checkpoint.restore_variables(tmp_path / "checkpoints" / "best", {"params": {"w": jnp.zeros(())}})
    assert used.name == str(2 * STEPS_PER_EPOCH) and meta["best_epoch"] == 2
    # w after n SGD steps on (w - 3)^2 with rate 0.25: 3 (1 - 0.5^n).
    np.testing.assert_allclose(float(best["params"]["w"]), 3 * (1 - 0.5 ** 6), rtol=1e-6)


def test_a_run_resumed_with_another_batch_size_is_refused_even_when_its_steps_per_epoch_are_the_same(tmp_path,
                                                                                                       toy_step):
    """The stream is indexed by step: with another global batch, step s holds other examples (20 images give 3
    steps per epoch with a batch of 8 and of 9, 200 pairs 7 with any batch from 29 to 33)."""
    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    loop.run(dataclasses.replace(_job(config, tmp_path, mesh, toy_step, [], epochs=1), batch_size=8))
    with pytest.raises(checkpoint.CheckpointError, match="written with a global batch of 8, this run's is 9"):
        loop.run(dataclasses.replace(_job(config, tmp_path, mesh, toy_step, []), batch_size=9))
    state, meta = loop.run(dataclasses.replace(_job(config, tmp_path, mesh, toy_step, []), batch_size=8))
    assert int(state.step) == STEPS_PER_EPOCH * EPOCHS and meta["batch_size"] == 8


def test_the_progress_bar_of_an_epoch_resumed_mid_way_counts_from_the_steps_it_had_done(tmp_path, toy_step,
                                                                                         monkeypatch):
    """Stopped after step 5 (of 3-step epochs), the resumed epoch 2 shows 2/3, not 0/1."""
    import signal

    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    job = _job(config, tmp_path, mesh, toy_step, [])

    def stopping_at_5(step):
        if step + 1 == 5 and not (tmp_path / "checkpoints" / "latest" / "5").exists():
            signal.raise_signal(signal.SIGINT)
        return 0.25

    bars, real = [], loop.tqdm
    monkeypatch.setattr(loop, "tqdm", lambda *args, **kwargs: bars.append(real(*args, **kwargs)) or bars[-1])
    # A step takes 1 s (on a clock that moves only then): 1 step per second, also over the resumed epoch's first
    # step, counted from the step it resumed at (5), not from its epoch's first (3).
    clock, batches = _Clock(1000.0), job.batches

    def ticking(start_step):
        for batch in batches(start_step):
            clock.now += 1.0
            yield batch

    monkeypatch.setattr(loop, "time", clock)
    job.batches = ticking
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # A pytest-xdist worker ignores SIGINT.
    try:
        with pytest.raises(KeyboardInterrupt, match="saved .*latest/5"):
            loop.run(dataclasses.replace(job, learning_rate=stopping_at_5))
        # Stopped before any evaluation after the start's: that is the last one the checkpoint records.
        assert checkpoint.read_meta(tmp_path / "checkpoints" / "latest")["last_eval"] == {"val/score": -6}
        bars.clear()
        loop.run(job)
    finally:
        signal.signal(signal.SIGINT, before)
    resumed = bars[0]
    assert resumed.desc.startswith("toy epoch 2/") and (resumed.n, resumed.total) == (STEPS_PER_EPOCH, STEPS_PER_EPOCH)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/steps_per_second"]) for r in records if "train/loss" in r] == [
        (step, 1.0) for step in range(1, STEPS_PER_EPOCH * EPOCHS + 1)]


def _refuse_constant(name):
    raise ValueError(f"{name} is no JSON")


def test_records_with_nan_are_strict_json_and_read_back_as_nan_also_from_older_files(tmp_path):
    from conftest import repo_module

    from amvlm_jax.train.logging import MetricWriter, json_text, null_as_nan

    # A diverged loss, an undefined score, an infinity: each line parses strictly, the numbers as null.
    writer = MetricWriter(tmp_path / "run", 0)
    writer.write(3, {"epoch": 1, "train/epoch_loss": float("nan"), "val/dice": float("inf"), "val/miou": 0.5})
    writer.close()
    line = (tmp_path / "run" / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=_refuse_constant)
    assert record["train/epoch_loss"] is None and record["val/dice"] is None and record["val/miou"] == 0.5
    nested = {"val": {"dice": float("nan"), "classes": [float("-inf"), np.float64(1.5)]}, "test": None}
    assert json.loads(json_text(nested), parse_constant=_refuse_constant) == {
        "val": {"dice": None, "classes": [None, 1.5]}, "test": None}
    # Readers: the file written now and one written before (NaN itself) give the same rows.
    older = tmp_path / "older"
    older.mkdir()
    (older / "metrics.jsonl").write_text(json.dumps({**record, "train/epoch_loss": float("nan"), "val/dice": float("nan")})
                                         + "\n")
    curve = repo_module("tools/curve.py")
    new_rows, old_rows = curve.epoch_rows(tmp_path / "run"), curve.epoch_rows(older)
    assert math.isnan(new_rows[0]["train/epoch_loss"]) and math.isnan(new_rows[0]["val/dice"])
    assert repr(new_rows) == repr(old_rows)  # NaN == NaN fails; their reprs agree.
    # results.json of a split with an undefined score: the ablation table reads NaN, as from an older file.
    ablation = repo_module("tools/ablation.py")
    results = {"val": {"dice": float("nan"), "miou": 2.0, "images": 3}, "test": None}
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "results.json").write_text(json_text(results))
    (older / "results.json").write_text(json.dumps(results))
    assert repr(ablation.read_results(str(tmp_path / "new"))) == repr(ablation.read_results(str(older)))
    assert math.isnan(ablation.read_results(str(tmp_path / "new"))["val"]["dice"])
    assert null_as_nan([None, {"a": None}, 1]).__repr__() == "[nan, {'a': nan}, 1]"


def test_a_nan_best_score_gives_way_to_the_next_epochs_and_checkpoint_meta_is_strict_json(tmp_path, toy_step):
    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    job = _job(config, tmp_path / "run", mesh, toy_step, [], epochs=2)
    # Undefined (NaN) after epoch 1, a score after epoch 2: the second is the best, in this run and a resumed one.
    job.evaluators = [loop.Evaluator(lambda state: {"val/score": float("nan") if int(state.step) == STEPS_PER_EPOCH
                                                    else 1.0})]
    job.epochs = 1
    loop.run(job)
    text = (tmp_path / "run" / "checkpoints" / "latest" / str(STEPS_PER_EPOCH) / "meta" / "metadata").read_text()
    meta = json.loads(text, parse_constant=_refuse_constant)
    assert meta["best"] is None and meta["last_eval"] == {"val/score": None}
    job.epochs = 2
    _, meta = loop.run(job)
    assert meta["best_epoch"] == 2 and meta["best"] == 1.0
    _, meta = loop.run(dataclasses.replace(job, workdir=tmp_path / "whole"))  # Not stopped: the NaN held in memory.
    assert meta["best_epoch"] == 2 and meta["best"] == 1.0


class _Clock:
    """A wall clock that moves only when told: time.time() for the loop and the metric writer."""

    def __init__(self, now):
        self.now = now

    def time(self):
        return self.now


def test_what_a_run_logs_steps_per_second_seconds_records_messages_and_progress_by_hand(tmp_path, toy_step,
                                                                                         monkeypatch, capsys):
    """Every step takes 2 s and every evaluation 1 s on a clock that moves only then; steps logged every 2nd
    step of 3-step epochs (steps 2, 4, 6). Each number below is worked out from those times and from SGD on
    (w - 1)^2 at rate 0.25 (w = 1 - 0.5^n after n steps, the step's loss (1 - w)^2 before it)."""
    from amvlm_jax.train import logging as metric_logging
    from tensorboardX import event_file_writer

    clock = _Clock(1000.0)
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(metric_logging, "time", clock)
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.7e9))  # Its file's name.
    bars, disabled, real = [], [], loop.tqdm

    def recording_tqdm(*args, **kwargs):
        disabled.append(kwargs["disable"])
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(loop, "tqdm", recording_tqdm)
    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])
    job = _job(config, tmp_path, mesh, toy_step, [], epochs=2)
    # 40 x 50 weights that get no gradient: counted among the trained parameters, no change to either norm.
    job.state = replicate(mesh, TrainState.create({"w": jnp.zeros(()), "unused": jnp.zeros((40, 50))}, {},
                                                  optax.sgd(0.25)))

    def timed_step(state, batch):
        clock.now += 2.0
        return toy_step(state, batch)

    def score(state):  # 100 w.
        clock.now += 1.0
        return {"val/score": 100 * float(state.params["w"])}

    job = dataclasses.replace(job, train_step=timed_step, log_every_steps=2, learning_rate=lambda step: 0.25,
                              evaluators=[loop.Evaluator(score, at_start=True)])
    capsys.readouterr()
    _, meta = loop.run(job)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Clock: 1000, at-start evaluation to 1001, steps 1-3 to 1007, evaluation to 1008, steps 4-6 to 1014, 1015.
    # Steps per second over the steps since the last logged one, or since the epoch's start (1001, 1008).
    assert [(r["step"], r["time"], r["train/steps_per_second"]) for r in records if "train/loss" in r] == [
        (2, 1005.0, 2 / 4), (4, 1010.0, 1 / 2), (6, 1014.0, 2 / 4)]
    # Epoch seconds: three steps and the evaluation; meta sums them.
    assert [(r["step"], r["time"], r["epoch"], r.get("epoch_seconds")) for r in records if "epoch" in r] == [
        (0, 1001.0, 0, None), (3, 1008.0, 1, 7.0), (6, 1015.0, 2, 7.0)]
    # Epoch means of the steps' losses: (1 + 0.5^2 + 0.25^2) / 3 and (0.125^2 + 0.0625^2 + 0.03125^2) / 3.
    assert meta["seconds"] == 14.0
    np.testing.assert_allclose([meta["first_epoch"]["loss"], meta["last_epoch"]["loss"]],
                               [0.4375, (0.125 ** 2 + 0.0625 ** 2 + 0.03125 ** 2) / 3], rtol=1e-6)
    np.testing.assert_allclose([r["train/epoch_loss"] for r in records if r.get("epoch")],
                               [meta["first_epoch"]["loss"], meta["last_epoch"]["loss"]])
    assert meta["last_eval"] == {"val/score": 100 * (1 - 0.5 ** 6)} and meta["initial_eval"] == {"val/score": 0.0}
    # TensorBoard's points carry the records' times.
    events = [e for path in (tmp_path / "tensorboard").iterdir() for e in _events(path) if e.summary.value]
    assert sorted({(e.step, e.wall_time) for e in events}) == sorted({(r["step"], r["time"]) for r in records})
    # The terminal: the parameter count, the untrained score, each epoch's loss, score, best and seconds.
    assert capsys.readouterr().out.splitlines() == [
        "toy: 2,001 trained parameters",
        "before training: val/score 0.00",
        "epoch 1: loss 0.4375 val/score 87.50 (best val/score 87.50 @ 1) [7.0s]",
        "epoch 2: loss 0.0068 val/score 98.44 (best val/score 98.44 @ 2) [7.0s]",
    ]
    # The progress bars: one per epoch, the loss of the last logged step (step 6: 0.03125^2) with 4 decimals.
    assert [(bar.desc, bar.n, bar.total) for bar in bars] == [("toy epoch 1/2", 3, 3), ("toy epoch 2/2", 3, 3)]
    assert bars[1].postfix == "loss=0.0010" and disabled == [False, False]


def test_a_non_finite_loss_between_logged_steps_stops_at_its_epochs_end_naming_the_checkpoint_kept(tmp_path, toy_step):
    """A NaN in step 5's batch makes every later loss NaN. Logged every 10th step, no step of the 3-step epochs
    is checked: the run stops at the end of step 5's epoch (step 6), on the epoch's mean loss, before that
    epoch's checkpoint: the latest one stays at step 3. (A logged step stops at once: test_robustness.)"""
    config = tiny_synthetic_config()
    mesh = make_mesh(config, jax.devices()[:1])

    def nan_at_step_5(start_step):
        for index in range(start_step, 10**6):  # index: the step taken with this batch, less one.
            yield {"x": np.full((2,), np.nan if index == 4 else 1.0, np.float32)}

    job = dataclasses.replace(_job(config, tmp_path, mesh, toy_step, [], epochs=3), batches=nan_at_step_5,
                              log_every_steps=10)
    with pytest.raises(loop.TrainingError) as error:
        loop.run(job)
    assert str(error.value) == (f"loss is nan at step 6; stopped without saving, {tmp_path}/checkpoints/latest keeps "
                                "the last good state (lower the learning rate or check the data)")
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit()) == ["3"]


def test_only_process_0_prints_draws_progress_and_writes_metrics(tmp_path, toy_step, monkeypatch, capsys):
    """Every process of a multi-process run runs the loop; process 1 here must print nothing, show no progress
    bar, leave metrics.jsonl (on a shared disk: process 0's, not to be cut short) and tensorboard/ alone, and
    draw no curves."""
    from amvlm_jax.train import logging as metric_logging

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": 0.0, "train/loss": 1.0}) + "\n"
                                                    for s in (1, 2)))
    before = (tmp_path / "metrics.jsonl").read_text()
    with monkeypatch.context() as patch:  # Not around the loop: Orbax asks jax which process it is, too.
        patch.setattr(jax, "process_index", lambda: 1)
        metric_logging.info("a message")
        writer = metric_logging.MetricWriter(tmp_path, 1)  # Process 0's would drop the record of step 2.
        writer.write(2, {"train/loss": 0.5})
        writer.close()
    assert capsys.readouterr().out == "" and (tmp_path / "metrics.jsonl").read_text() == before
    assert not (tmp_path / "tensorboard").exists()

    bars, real = [], loop.tqdm
    monkeypatch.setattr(loop, "tqdm", lambda *args, **kwargs: bars.append(kwargs["disable"]) or real(*args, **kwargs))
    as_process_1 = {name: getattr(jax, name) for name in dir(jax) if not name.startswith("__")}
    monkeypatch.setattr(loop, "jax", types.SimpleNamespace(**as_process_1 | {"process_index": lambda: 1}))
    config = tiny_synthetic_config()
    loop.run(_job(config, tmp_path / "run", make_mesh(config, jax.devices()[:1]), toy_step, [], epochs=1))
    assert bars == [True] and not (tmp_path / "run" / "curves.png").exists()


def test_a_resumed_metric_writer_says_what_it_dropped_and_shows_the_kept_records_with_their_times(
        tmp_path, monkeypatch, capsys):
    from amvlm_jax.train import logging as metric_logging

    clock = _Clock(500.0)
    monkeypatch.setattr(metric_logging, "time", clock)
    first = loop.MetricWriter(tmp_path, 0)
    for step, record in ((1, {"train/loss": 1.0}), (2, {"epoch": 1, "val/dice": float("nan"), "val/miou": 0.25}),
                         (3, {"train/loss": 0.5})):
        clock.now += 10.0
        first.write(step, record)
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "ti')  # Cut short by a kill.
    capsys.readouterr()
    second = loop.MetricWriter(tmp_path, 2)  # Resumed from the checkpoint of step 2 (its epoch finished).
    assert capsys.readouterr().out == (f"{tmp_path}/metrics.jsonl: dropped 1 records that this run writes again (its "
                                       "checkpoint is at step 2), and 1 lines that are no record with a step (cut short "
                                       "or damaged)\n")
    clock.now = 600.0
    second.write(3, {"train/loss": 0.25})
    second.close()
    # Step 2's record is on TensorBoard again, at its own time, with its null read back as the NaN it was.
    path, = (tmp_path / "tensorboard").glob("*.from-step-2")
    shown = {value.tag: (event.step, event.wall_time, value.simple_value) for event in _events(path)
             for value in event.summary.value}
    assert shown.keys() == {"epoch", "val/dice", "val/miou", "train/loss"}
    assert shown["epoch"] == (2, 520.0, 1.0) and shown["val/miou"] == (2, 520.0, 0.25)
    assert shown["val/dice"][:2] == (2, 520.0) and math.isnan(shown["val/dice"][2])
    assert shown["train/loss"] == (3, 600.0, 0.25)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "time": 510.0, "train/loss": 1.0}, {"step": 2, "time": 520.0, "epoch": 1, "val/dice": None,
                                                         "val/miou": 0.25},
        {"step": 3, "time": 600.0, "train/loss": 0.25}]


def test_a_job_without_a_best_metric_saves_its_last_epoch_as_the_best_and_no_earlier_one(tmp_path, toy_step,
                                                                                         monkeypatch):
    config = tiny_synthetic_config()
    job = dataclasses.replace(_job(config, tmp_path, make_mesh(config, jax.devices()[:1]), toy_step, [], epochs=2),
                              best_metric=None)
    saves, save = [], checkpoint.RunCheckpoints.save

    def recording_save(self, step, state, meta, is_best, latest_meta=None, latest=True):
        saves.append((step, is_best, latest))
        return save(self, step, state, meta, is_best, latest_meta, latest)

    monkeypatch.setattr(checkpoint.RunCheckpoints, "save", recording_save)
    _, meta = loop.run(job)
    assert saves == [(STEPS_PER_EPOCH, False, True), (2 * STEPS_PER_EPOCH, True, True)]
    assert meta["best"] is None and meta["best_epoch"] == 0


def test_steps_per_second_leave_out_the_evaluations_between_steps(tmp_path, toy_step, monkeypatch):
    """Steps take 2 s and an evaluation after every step 1 s: logged every 2nd step, 2 steps in 4 s. Counted
    in, the evaluation after step 1 made it 2 steps in 5 s, below the rate of the steps across an epoch's end
    (whose evaluation is left out)."""
    clock = _Clock(1000.0)
    monkeypatch.setattr(loop, "time", clock)

    def timed_step(state, batch):
        clock.now += 2.0
        return toy_step(state, batch)

    def evaluation(state):
        clock.now += 1.0
        return {"val/w": float(state.params["w"])}

    config = tiny_synthetic_config()
    job = dataclasses.replace(_job(config, tmp_path, make_mesh(config, jax.devices()[:1]), toy_step, [], epochs=1),
                              train_step=timed_step, log_every_steps=2, best_metric=None,
                              evaluators=[loop.Evaluator(evaluation, every_epochs=0, every_steps=1)])
    loop.run(job)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/steps_per_second"]) for r in records if "train/loss" in r] == [(2, 0.5)]
    assert [r["step"] for r in records if "val/w" in r] == [1, 2, 3, 3]  # Every step, and the (last) epoch's.


def test_epoch_lines_show_scores_to_two_decimals_and_scored_rows_as_counts():
    values = {"val/dice": 61.2345, "val/probe/Type/accuracy": 0.775, "val/probe/Type/rows": 197.0}
    assert loop.format_metrics(values) == "val/dice 61.23 val/probe/Type/accuracy 0.78 val/probe/Type/rows 197"
