"""Three pre-training steps, then three text-guided SSMIS steps, on whatever processes run this.

As a script (one per process, started by tests/test_distributed.py):

    python tests/distributed_worker.py HOST:PORT PROCESS_ID NUM_PROCESSES OUT.npz

each process joins the run through ``parallel.initialize_distributed``, feeds
its own share of every global batch, and writes the losses, the initial
variables (under 'initial/') and the final ones (gathered from all
processes) to OUT.npz. Imported, ``run_all``
runs the same steps on the devices of a single process (the reference).

Pre-training runs on a 1 x 8 (data x fsdp) mesh, so its large leaves are split
across the processes; SSMIS on a 2 x 4 mesh. SGD throughout: Adam's first
steps are lr * sign(gradient), which turns rounding noise into full steps.
"""

from __future__ import annotations

import os
import sys

STEPS = 3


def configs():
    """(pre-training config, SSMIS config): tiny encoders, 32x32 images, batch 8, FSDP from 64 elements."""
    from conftest import tiny_pretrain_config

    # ITA + local alignment only: the CSS and ICL terms double the compile time on CPU, and
    # their multi-device equivalence is tested in test_pretrain.py.
    common = {"data.image_size": 32, "mesh.fsdp_min_size": 64, "pretrain.weights.css": 0.0,
              "pretrain.weights.icl": 0.0}
    pretrain_config = tiny_pretrain_config(**common, **{"mesh.data": 1, "mesh.fsdp": -1})
    ssl_config = tiny_pretrain_config(**common, **{"mode": "ssl", "mesh.data": 2, "mesh.fsdp": -1})
    return pretrain_config, ssl_config


def global_batches(tokens: dict, size: int, seed: int) -> list[dict]:
    """STEPS global batches (8 rows) holding every array either job reads."""
    import numpy as np

    from amvlm_jax.data import pipeline

    batches = []
    for step in range(STEPS):
        rng = np.random.default_rng([seed, step])
        images = rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)
        batch = {
            "image": images,
            "image_aug": np.stack([pipeline.augment([image], rng)[0] for image in images]),
            "mask": (images[..., 0] > 128).astype(np.uint8),
            "unlabeled_image": rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8),
            **{k: v[rng.permutation(8)] for k, v in tokens.items()},
        }
        batches.append(batch)
    return batches


def local_share(batch: dict) -> dict:
    """This process's contiguous block of rows of a global batch."""
    import jax

    count, index = jax.process_count(), jax.process_index()
    return {k: v[index * len(v) // count:(index + 1) * len(v) // count] for k, v in batch.items()}


def run_all(devices=None) -> dict:
    """Losses and final variables of STEPS pre-training then STEPS SSMIS steps, as numpy arrays by name."""
    import jax
    import jax.numpy as jnp
    import optax

    from amvlm_jax.data import pipeline
    from amvlm_jax.data.tokenize import ReportTokenizer
    from amvlm_jax.models.amvlm import TOKEN_KEYS
    from amvlm_jax.train import build, parallel, pretrain, ssl, supervised
    from amvlm_jax.train.state import MeanTeacherState

    pretrain_config, ssl_config = configs()
    size = pretrain_config.pretrain.image_size
    from conftest import SAMPLE_REPORTS

    tokens = ReportTokenizer(build.text_encoder_dir(pretrain_config), pretrain_config.pretrain.max_length)(SAMPLE_REPORTS)
    batches = global_batches(tokens, size, seed=0)
    results = {}

    # Pre-training.
    model = build.build_model(pretrain_config, build.text_encoder_config(pretrain_config))
    mesh = parallel.make_mesh(pretrain_config, devices, batch_size=8)
    # A small rate: rounding differences of the cross-process sums grow with the step size.
    # Initialised in place on the global mesh, as the job does.
    state = parallel.init_sharded(mesh, pretrain_config,
                                  lambda: pretrain.create_state(pretrain_config, model, size, tx=optax.sgd(0.002)))
    step = pretrain.make_train_step(model, pretrain_config)
    # Copied to the host now: the steps donate (delete) these arrays.
    initial = parallel.gather_to_host(_named("initial/pretrain_params", state.params))
    losses = []
    for batch in batches:
        keys = ("image", "image_aug", *TOKEN_KEYS)
        state, metrics = step(state, pipeline.to_global(mesh, local_share({k: batch[k] for k in keys})))
        losses.append(metrics["loss"])
    results["pretrain_losses"] = jnp.stack(losses)
    results |= _named("pretrain_params", state.params)
    frozen = {"params": state.params, "batch_stats": state.batch_stats}

    # Text-guided SSMIS with the encoders just trained; the guidance is built
    # in memory instead of from a checkpoint folder.
    guidance = ssl.TextGuidance.from_variables(ssl_config, model, None)  # Frozen variables come as a step argument.
    unet = supervised.build_unet(ssl_config)
    decoder_tx = optax.sgd(0.5)
    ssl_state, _ = ssl.create_state(ssl_config, unet, guidance, steps_per_epoch=STEPS)
    trained = {"decoder": ssl_state.generator["decoder"], "log_scale": ssl_state.generator["log_scale"]}
    student_tx = optax.sgd(0.1)
    ssl_state = MeanTeacherState.create(ssl_state.params, ssl_state.batch_stats, student_tx, teacher=ssl_state.teacher,
                                        generator={**trained, "opt_state": decoder_tx.init(trained)})
    ssl_mesh = parallel.make_mesh(ssl_config, devices)
    # Large leaves FSDP-sharded, the rest replicated, as pre-training places its state.
    ssl_state = jax.device_put(ssl_state, parallel.state_shardings(ssl_mesh, ssl_state,
                                                                   parallel.fsdp_min_size(ssl_config)))
    ssl_step = ssl.make_ssl_step(ssl_config, unet, guidance, decoder_tx)
    initial |= parallel.gather_to_host(_named("initial/ssl_params", ssl_state.params)
                                       | _named("initial/ssl_teacher", ssl_state.teacher)
                                       | _named("initial/ssl_decoder", ssl_state.generator["decoder"]))
    losses, tg_losses = [], []
    for batch in batches:
        ssl_batch = {"image": batch["image"], "mask": batch["mask"], "unlabeled_image": batch["unlabeled_image"]}
        ssl_batch |= {f"report_{k}": batch[k] for k in TOKEN_KEYS}
        ssl_state, metrics = ssl_step(ssl_state, frozen, pipeline.to_global(ssl_mesh, local_share(ssl_batch)))
        losses.append(metrics["loss"])
        tg_losses.append(metrics["tg_loss"])
    results["ssl_losses"] = jnp.stack(losses)
    results["ssl_tg_losses"] = jnp.stack(tg_losses)
    results |= _named("ssl_params", ssl_state.params) | _named("ssl_teacher", ssl_state.teacher)
    results |= _named("ssl_decoder", ssl_state.generator["decoder"])
    return parallel.gather_to_host(results) | initial


def _named(prefix: str, tree) -> dict:
    import jax

    return {prefix + jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def main(argv: list[str]) -> None:
    address, process_id, num_processes, out = argv[1], int(argv[2]), int(argv[3]), argv[4]
    # Each process simulates 4 CPU devices; set before jax starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np

    from amvlm_jax.train import parallel

    config, _ = configs()
    config.distributed.coordinator_address = address
    config.distributed.num_processes = num_processes
    config.distributed.process_id = process_id
    assert parallel.initialize_distributed(config) == num_processes
    import jax

    assert jax.device_count() == 4 * num_processes and jax.local_device_count() == 4
    results = run_all()
    np.savez(out, **{k: np.asarray(v) for k, v in results.items()})
    if len(argv) > 5:
        np.save(out + ".corpus.npy", read_corpus_epoch(argv[5]))
    jax.distributed.shutdown()


def read_corpus_epoch(path: str):
    """(rows, sum of pixels) of what this process reads in the first epoch of a corpus streamed from disk,
    global batch 8: the pipeline picks this process's share from jax.process_index()."""
    import pathlib

    import numpy as np

    from amvlm_jax.data import corpus, pipeline
    from conftest import corpus_config

    split = corpus.load(corpus_config(pathlib.Path(path), **{"data.corpus.in_memory_bytes": 0}), "train", 32)[0]
    assert isinstance(split.images, corpus.CorpusImages)
    batches = pipeline.training_batches(split, 8, seed=5, with_mask=False, augmentation="none")
    read = [(row, int(image.sum())) for _, batch in zip(range(len(split) // 8), batches)
            for row, image in zip(batch["index"], batch["image"])]
    return np.asarray(read, np.int64)


if __name__ == "__main__":
    main(sys.argv)
