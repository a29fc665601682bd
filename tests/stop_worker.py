"""A toy job through train/loop.py on whatever processes run this, stopped by a signal that one process gets.

As a script (one per process, started by tests/test_distributed.py):

    python tests/stop_worker.py HOST:PORT PROCESS_ID NUM_PROCESSES WORKDIR OUT.json

each process (2 CPU devices) runs the same job four epochs of three steps:
uninterrupted; then with SIGTERM to process 1 alone during step 4, and the
same run again (it resumes); then with Ctrl-C (SIGINT) to process 0 alone
during step 8 (the third epoch's last), and again. Steps are logged every
second step. OUT.json holds, per run, the final weight, the
KeyboardInterrupt's message and the step of the latest checkpoint, and
process 0's metrics.jsonl records less their times.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys

STEPS_PER_EPOCH, EPOCHS, LOCAL_ROWS = 3, 4, 2


def run(workdir: pathlib.Path, signalled: tuple[int, int, int] | None) -> dict:
    """One loop.run of the toy job; ``signalled`` = (process, step, signal): that process raises the
    signal while it takes that step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from amvlm_jax.train import checkpoint, loop, parallel
    from amvlm_jax.train.state import TrainState
    from conftest import tiny_synthetic_config

    config = tiny_synthetic_config(**{"mesh.data": -1})
    mesh = parallel.make_mesh(config, batch_size=LOCAL_ROWS * jax.process_count())

    @jax.jit
    def step(state, batch):  # SGD on (w - mean(x))^2.
        loss, grads = jax.value_and_grad(lambda params: jnp.mean((params["w"] - batch["x"]) ** 2))(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    def signalling_step(state, batch):
        if signalled and jax.process_index() == signalled[0] and int(state.step) == signalled[1]:
            signal.raise_signal(signalled[2])
        return step(state, batch)

    def batches(start_step):  # Each process's rows differ, and every step's mean is another.
        for index in range(start_step, STEPS_PER_EPOCH * EPOCHS):
            yield {"x": np.full(LOCAL_ROWS, 1 + index % 5 + 0.5 * jax.process_index(), np.float32)}

    job = loop.Job(
        name="toy", workdir=workdir, mesh=mesh, config=config,
        state=parallel.replicate(mesh, TrainState.create({"w": jnp.zeros(())}, {}, optax.sgd(0.25))),
        train_step=signalling_step, batches=batches, steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS,
        evaluators=[loop.Evaluator(lambda state: {"val/w": float(state.params["w"])}, every_epochs=1)],
        best_metric="val/w", log_every_steps=2, learning_rate=lambda step: 0.25,
    )
    result = {"message": None}
    try:
        state, _ = loop.run(job)
        result["w"] = float(state.params["w"])
    except KeyboardInterrupt as stop:
        result["message"] = str(stop)
        loop._clear_interrupt_flags()  # The signal's flag: a resumed run is a new process in practice.
    latest = checkpoint.RunCheckpoints(workdir)
    result["latest_step"] = latest.latest.latest_step()
    latest.close()
    if jax.process_index() == 0:
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        result["records"] = [{k: v for k, v in r.items() if k != "time" and "second" not in k}
                             for r in records]
    return result


def main(argv: list[str]) -> None:
    address, process_id, num_processes, workdir, out = argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Started by a pytest-xdist worker, which ignores it.
    from amvlm_jax.train import loop, parallel
    from conftest import tiny_synthetic_config

    config = tiny_synthetic_config()
    config.distributed.coordinator_address = address
    config.distributed.num_processes = num_processes
    config.distributed.process_id = process_id
    with loop.catching_interrupts():  # As main does: its handlers are installed before the processes connect.
        assert parallel.initialize_distributed(config) == num_processes
        # Set for CPU processes (parallel.initialize_distributed says why) before anything compiles.
        assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in os.environ["XLA_FLAGS"]
        import jax

        root = pathlib.Path(workdir)
        results = {
            "whole": run(root / "whole", None),
            "sigterm_cut": run(root / "sigterm", (1, 4, signal.SIGTERM)),
            "sigterm_resumed": run(root / "sigterm", None),
            "sigint_cut": run(root / "sigint", (0, 8, signal.SIGINT)),
            "sigint_resumed": run(root / "sigint", None),
        }
    pathlib.Path(out).write_text(json.dumps(results))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
