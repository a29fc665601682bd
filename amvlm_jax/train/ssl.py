"""Text-guided mean-teacher semi-supervised segmentation (SPEC sections 5 and 6).

One jitted step takes equal labeled (x_l, y_l) and unlabeled (x_u, report_u)
batches and
  1. builds the text mask of each unlabeled image from its own report with
     the frozen pre-trained encoders and the text-mask decoder, and takes one
     step of the decoder (and its logit scale) on L_tg with its own Adam;
  2. fuses the teacher's prediction with the text mask in logit space;
  3. takes one student step on Dice+BCE / Dice+CE over concat(x_l, x_u)
     against concat(y_l, fused pseudo-labels);
  4. moves the teacher (parameters and BatchNorm statistics) towards the
     student with alpha_t = min(1 - 1/(t + 1), 0.99).

Unlabeled images are not geometrically augmented: a report names places
("upper left"), which a rotation or flip would move.
"""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from amvlm_jax.data import datasets, folders, pipeline, splits
from amvlm_jax.losses.segmentation import mask_targets, segmentation_loss
from amvlm_jax.losses.text_guided import (
    INITIAL_LOG_SCALE,
    ema_alpha,
    ema_update_teacher,
    fuse_multiclass,
    fuse_pseudo_labels,
    text_guided_loss,
)
from amvlm_jax.models.text_mask import TextMaskDecoder, text_masks
from amvlm_jax.config import ConfigError
from amvlm_jax.data.tokenize import ReportTokenizer
from amvlm_jax.train import checkpoint, evaluate, loop, supervised
from amvlm_jax.train.parallel import make_mesh, replicate
from amvlm_jax.train.state import TrainState


def text_guidance_enabled(config) -> bool:
    """Whether the job needs the pre-trained encoders (text masks or L_tg)."""
    return config.ssl.w_text != 0.0 or config.ssl.train_decoder


def load_split_pair(config, root: pathlib.Path):
    """(labeled split with masks, unlabeled split without) of the training folder."""
    count = len(folders.list_split(root, "train", require_masks=False))
    labeled = splits.labeled_indices(count, config.data.labeled_fraction, config.data.split_seed)
    unlabeled = splits.unlabeled_indices(count, config.data.labeled_fraction, config.data.split_seed)
    if len(unlabeled) == 0:
        raise folders.DataError(
            f"{root}: data.labeled_fraction={config.data.labeled_fraction} leaves no unlabeled training image"
        )
    everything = folders.load_split(
        root, "train", image_size=config.data.image_size, num_classes=config.data.num_classes,
        mask_indices=labeled, threads=config.data.read_threads,
    )
    unlabeled_split = everything.subset(unlabeled)
    unlabeled_split.masks = None  # Never used for training: only the evaluation of pseudo-labels reads them.
    return everything.subset(labeled), unlabeled_split


class TextGuidance:
    """The frozen pre-trained encoders and heads, and the text-mask decoder's definition."""

    def __init__(self, config, workdir: pathlib.Path, mesh):
        from amvlm_jax.train import pretrain

        self.model = pretrain.build_model(config, pretrain.text_encoder_config(config))
        self.tokenizer = ReportTokenizer(pretrain.text_encoder_dir(config), config.pretrain.max_length)
        self.image_size = pretrain.pretrain_image_size(config)
        self.decoder = TextMaskDecoder(dtype=jnp.dtype(config.dtype))
        source = pathlib.Path(config.ssl.pretrained or workdir / "pretrain")
        if not source.exists():
            raise ConfigError(
                f"{source}: no pre-trained encoders for text guidance; run mode 'pretrain' (or 'all') first, "
                "set config.ssl.pretrained, or set config.ssl.w_text=0 and config.ssl.train_decoder=False"
            )
        replicated = NamedSharding(mesh, PartitionSpec())
        abstract = jax.eval_shape(lambda: pretrain.create_state(config, self.model, self.image_size))
        target = {"params": abstract.params, "batch_stats": abstract.batch_stats}
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), target)
        self.variables, meta, used = checkpoint.restore_variables(source, target)
        print(f"text guidance from {used} (pre-trained {meta.get('epoch')} epochs)")

    def init_decoder(self, rng):
        grid = self.image_size // 16
        dummy = jnp.zeros((1, grid, grid, self.model.embed_dim), jnp.float32)
        return self.decoder.init(rng, dummy)["params"]

    def encode(self, variables, images, tokens):
        """Frozen features: patch map (B, h, w, D) and report embeddings t (B, D)."""
        if images.shape[1] != self.image_size:
            images = jax.image.resize(images, (images.shape[0], self.image_size, self.image_size, 3), "bilinear")
        image = self.model.apply(variables, images, False, method=self.model.encode_image)
        text = self.model.apply(variables, tokens, False, method=self.model.encode_text)
        grid = self.image_size // 16
        patch_map = image["V"].reshape(images.shape[0], grid, grid, -1)
        return jax.lax.stop_gradient(patch_map), jax.lax.stop_gradient(text["t"])


def make_ssl_step(config, model, guidance: TextGuidance | None, decoder_tx):
    """jitted (state, frozen variables, batch) -> (state, metrics)."""
    num_classes = config.data.num_classes
    w_text = float(config.ssl.w_text)
    train_decoder = bool(config.ssl.train_decoder) and guidance is not None

    def teacher_probabilities(teacher, images):
        logits = model.apply(teacher, images, train=False)
        return jax.nn.sigmoid(logits[..., 0]) if num_classes == 1 else jax.nn.softmax(logits, axis=-1)

    def ssl_step(state: TrainState, frozen, batch):
        x_l = batch["image"].astype(jnp.float32) / 255.0
        x_u = batch["unlabeled_image"].astype(jnp.float32) / 255.0
        step_metrics = {}
        extra = state.extra
        p_teacher = teacher_probabilities(state.ema, x_u)
        if guidance is not None:
            tokens = {k[len("report_"):]: v for k, v in batch.items() if k.startswith("report_")}
            patch_map, reports = guidance.encode(frozen, x_u, tokens)

            def decoder_loss(trained):
                dense = guidance.decoder.apply({"params": trained["decoder"]}, patch_map)
                masks = text_masks(dense, reports, x_u, x_u.shape[1])
                return text_guided_loss(dense, masks["soft"], reports, trained["log_scale"]), masks["p_text"]

            trained = {"decoder": extra["decoder"], "log_scale": extra["log_scale"]}
            if train_decoder:
                (tg_loss, p_text), grads = jax.value_and_grad(decoder_loss, has_aux=True)(trained)
                updates, decoder_opt = decoder_tx.update(grads, extra["opt_state"], trained)
                trained = optax.apply_updates(trained, updates)
                extra = {**trained, "opt_state": decoder_opt}
                step_metrics["tg_loss"] = tg_loss
            else:
                _, p_text = decoder_loss(trained)
            p_text = jax.lax.stop_gradient(p_text)
            if num_classes == 1:
                pseudo = fuse_pseudo_labels(p_teacher, p_text, w_text)
            else:
                pseudo = fuse_multiclass(p_teacher, p_text, w_text)
            step_metrics["text_mask_mean"] = jnp.mean(p_text)
        else:
            pseudo = p_teacher
        pseudo = jax.lax.stop_gradient(pseudo)

        targets = jnp.concatenate([mask_targets(batch["mask"], num_classes), pseudo], axis=0)
        images = jnp.concatenate([x_l, x_u], axis=0)

        def student_loss(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
            )
            return segmentation_loss(logits, targets), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(student_loss, has_aux=True)(state.params)
        state = state.apply_gradients(grads, batch_stats=batch_stats, extra=extra)
        alpha = ema_alpha(state.step - 1)  # t counts the student updates before this one.
        teacher = ema_update_teacher({"params": state.params, "batch_stats": state.batch_stats}, state.ema, alpha)
        state = state.replace(ema=teacher)
        step_metrics |= {"loss": loss, "pseudo_label_mean": jnp.mean(pseudo if num_classes == 1 else 1 - pseudo[..., 0])}
        return state, step_metrics

    return jax.jit(ssl_step, donate_argnums=0)


def create_state(config, model, guidance: TextGuidance | None, steps_per_epoch: int):
    """Student state with the teacher in `ema` and the decoder (+ its Adam state) in `extra`."""
    student = supervised.create_state(config, model, steps_per_epoch)
    teacher = {"params": student.params, "batch_stats": student.batch_stats}
    extra = None
    decoder_tx = optax.adam(config.ssl.decoder_lr)
    if guidance is not None:
        trained = {"decoder": guidance.init_decoder(jax.random.PRNGKey(config.seed + 1)),
                   "log_scale": jnp.asarray(INITIAL_LOG_SCALE, jnp.float32)}
        extra = {**trained, "opt_state": decoder_tx.init(trained)}
    return student.replace(ema=jax.tree.map(jnp.copy, teacher), extra=extra), decoder_tx


def train(config, workdir: str | pathlib.Path) -> dict:
    """Mean-teacher SSMIS with text guidance; resumes from <workdir>; evaluates the best student."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(config)
    root = datasets.data_root(config, workdir)
    labeled_split, unlabeled_split = load_split_pair(config, root)
    val_split = datasets.load_eval_split(config, root, "val")
    batch_size = config.train.batch_size
    steps_per_epoch = max(1, math.ceil(max(len(labeled_split), len(unlabeled_split)) / batch_size))
    guidance = TextGuidance(config, workdir, mesh) if text_guidance_enabled(config) else None
    print(
        f"SSMIS: {len(labeled_split)} labeled + {len(unlabeled_split)} unlabeled images, "
        f"{steps_per_epoch} steps per epoch, text guidance {'on (w_text=%g)' % config.ssl.w_text if guidance else 'off'}"
    )
    unlabeled_tokens = guidance.tokenizer(unlabeled_split.reports) if guidance else None

    model = supervised.build_unet(config)
    state, decoder_tx = create_state(config, model, guidance, steps_per_epoch)
    state = replicate(mesh, state)

    def make_batches(start_step):
        labeled_batches = pipeline.training_batches(
            labeled_split, batch_size, seed=config.seed, start_step=start_step, worker_count=config.data.worker_count
        )
        unlabeled_batches = pipeline.training_batches(
            unlabeled_split, batch_size, seed=config.seed + 7919, start_step=start_step, with_mask=False, do_augment=False
        )
        for labeled, unlabeled in zip(labeled_batches, unlabeled_batches):
            batch = {"image": labeled["image"], "mask": labeled["mask"], "unlabeled_image": unlabeled["image"]}
            if unlabeled_tokens is not None:
                batch |= {f"report_{k}": v[unlabeled["index"]] for k, v in unlabeled_tokens.items()}
            yield batch

    loop.fit(
        config, workdir, mesh, state, make_ssl_step(config, model, guidance, decoder_tx), make_batches,
        steps_per_epoch, val_split, evaluate.make_eval_step(model, config.data.num_classes),
        extra_step_args=(guidance.variables if guidance else None,), predict_step=evaluate.make_predict_step(model),
    )
    return supervised.evaluate_checkpoint(config, workdir, str(workdir / "checkpoints" / "best"), mesh=mesh, root=root)
