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
     student with alpha_t = min(1 - 1/(t + 1), config.ssl.ema_max_alpha),
     0.99 by default (SPEC 6).

Unlabeled images are not geometrically augmented unless config.ssl.augment_unlabeled (SPEC 1 augments
them): a report names places ("upper left"), which a rotation or flip would move.
"""

from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amvlm_jax import metrics
from amvlm_jax.data import datasets, folders, pipeline
from amvlm_jax.losses.segmentation import mask_targets, segmentation_loss
from amvlm_jax.losses.text_guided import (
    INITIAL_LOG_SCALE,
    clipped_logit,
    ema_alpha,
    unlabeled_weight,
    fuse_multiclass,
    fuse_pseudo_labels,
    text_guided_loss,
)
from amvlm_jax.ops import ema_update
from amvlm_jax.models.text_mask import TextMaskDecoder, WordAttentionMaskHead, head_text_masks, text_masks
from amvlm_jax.config import ConfigError, with_recorded
from amvlm_jax.data.tokenize import ReportTokenizer
from amvlm_jax.train import build, checkpoint, evaluate, loop, supervised
from amvlm_jax.train.logging import csv_text, info, json_text, write_atomically
from amvlm_jax.train.parallel import StepKeepingShardings, abstract_replicated, gather_to_host, make_mesh, replicate
from amvlm_jax.train.state import MeanTeacherState, optimizer_telemetry


def text_guidance_enabled(config) -> bool:
    """Whether the job needs the pre-trained encoders (text masks, L_tg or the text head)."""
    return config.ssl.w_text != 0.0 or config.ssl.train_decoder or bool(config.ssl.text_head)


def load_split_pair(config, root: pathlib.Path):
    """(labeled split with masks, unlabeled split without) of the training folder."""
    labeled, unlabeled = datasets.load_train_parts(config, root)
    if len(unlabeled) == 0:
        raise folders.DataError(
            f"{root}: data.labeled_fraction={config.data.labeled_fraction} leaves no unlabeled training image"
        )
    return labeled, unlabeled


class TextGuidance:
    """The frozen pre-trained encoders and heads, and the text mask generator's definition: the decoder
    of SPEC 5 or, with config.ssl.text_head 'words' or 'report', the word-attention head (``head`` is then set)."""

    def __init__(self, config, workdir: pathlib.Path, mesh, guided=None):
        """Restores the encoders from config.ssl.pretrained, else <workdir>/pretrain, built as the
        pre-training run's recorded config describes them (its ``pretrain`` fields, not this command's).
        guided: a mean-teacher checkpoint (any path ``checkpoint.resolve_step`` takes) whose training these
        encoders guided, or None: the pre-training step recorded in its meta, else the newest
        (``guiding_step``). ``step``: the pre-training step restored."""
        source = pretrained_source(config, workdir)
        if not source.exists():
            if config.mode in ("evaluate", "predict") or guided is not None:  # Resuming: other advice would restart.
                raise ConfigError(f"{source}: the pre-trained encoders of the checkpoint's text guidance are not "
                                  "there (moved?); pass their folder as --config.ssl.pretrained=PATH")
            raise ConfigError(
                f"{source}: no pre-trained encoders for text guidance; run mode 'pretrain' (or 'all') first, "
                "set config.ssl.pretrained, or set config.ssl.w_text=0 and config.ssl.train_decoder=False"
            )
        config, model, self.variables, meta, used = restore_pretrained(config, guiding_step(source, guided), mesh)
        self._define(config, model)
        self.step, self.run_id = int(used.name), meta.get("run_id")
        info(f"text guidance from {used} (pre-trained {meta.get('epoch')} epochs)")

    @classmethod
    def from_variables(cls, config, model, variables: dict) -> "TextGuidance":
        """Guidance from encoders held in memory ({'params', 'batch_stats'} of ``model``), no checkpoint."""
        guidance = cls.__new__(cls)
        guidance._define(config, model)
        guidance.variables, guidance.step, guidance.run_id = variables, None, None
        return guidance

    def _define(self, config, model) -> None:
        self.model = model
        self.tokenizer = ReportTokenizer(build.text_encoder_dir(config), config.pretrain.max_length)
        self.image_size = build.pretrain_image_size(config)
        self.temperature = config.pretrain.temperature
        self.decoder = TextMaskDecoder(dtype=jnp.dtype(config.dtype))
        self.head = (WordAttentionMaskHead(shows_patches=config.ssl.text_head == "words", dtype=jnp.dtype(config.dtype))
                     if config.ssl.text_head else None)
        self.withhold_reports = bool(config.ssl.withhold_reports)
        # What text_mask_outputs does to every p_text before the fusion (config.ssl's controls and options).
        self.constant = float(config.ssl.constant_text_mask)
        self.logit_offset = float(config.ssl.text_logit_offset)
        self.veto_only = bool(config.ssl.text_veto_only)
        self.text_clip = float(config.ssl.text_clip)

    def init_decoder(self, rng):
        grid = self.image_size // 16
        dummy = jnp.zeros((1, grid, grid, self.model.embed_dim), jnp.float32)
        return self.decoder.init(rng, dummy)["params"]

    def init_generator(self, rng) -> dict:
        """The trained part of the text mask generator: {'head'} or {'decoder', 'log_scale'}."""
        if self.head is None:
            return {"decoder": self.init_decoder(rng), "log_scale": jnp.asarray(INITIAL_LOG_SCALE, jnp.float32)}
        grid, length = self.image_size // 16, self.tokenizer.max_length - 1
        dims = self.model.embed_dim
        return {"head": self.head.init(rng, jnp.zeros((1, grid, grid, dims)), jnp.zeros((1, length, dims)),
                                       jnp.ones((1, length)))["params"]}

    def head_inputs(self, variables, images, tokens):
        """Frozen inputs of the word-attention head for images (B, H, W, 3) in [0, 1] and their reports:
        patch map (B, h, w, D), word embeddings T (B, W, D) (zeros when config.ssl.withhold_reports) and
        the word mask (B, W)."""
        text = self.model.apply(variables, tokens, False, method=self.model.encode_text)
        words = jnp.zeros_like(text["T"]) if self.withhold_reports else text["T"]
        return self.patch_map(variables, images), jax.lax.stop_gradient(words), text["word_mask"]

    def head_logits(self, head_params, variables, images, tokens):
        """The word-attention head's logits (B, h, w)."""
        return self.head.apply({"params": head_params}, *self.head_inputs(variables, images, tokens))

    def patch_map(self, variables, images):
        """Frozen patch embeddings V of images (B, H, W, 3) in [0, 1] as a map (B, h, w, D)."""
        image = self.model.apply(variables, encoder_input(images, self.image_size), False,
                                 method=self.model.encode_image)
        grid = self.image_size // 16
        return jax.lax.stop_gradient(image["V"].reshape(images.shape[0], grid, grid, -1))

    def encode(self, variables, images, tokens):
        """Frozen features: patch map (B, h, w, D) and report embeddings t (B, D)."""
        text = self.model.apply(variables, tokens, False, method=self.model.encode_text)
        return self.patch_map(variables, images), jax.lax.stop_gradient(text["t"])


def encoder_input(images, size: int):
    """Images (B, H, W, 3) in [0, 1] at the encoders' pre-training size (B, size, size, 3).

    Pre-training resized the files bicubically with antialiasing (``folders.load_image``); an antialiased
    cubic here keeps the frozen encoders' input within a grey level of that (a bilinear one blurred it,
    17 % less contrast between neighbouring pixels at 224 -> 96), and the clip matches its 8-bit range.
    """
    if images.shape[1] == size:
        return images
    return jnp.clip(jax.image.resize(images, (images.shape[0], size, size, 3), "cubic"), 0.0, 1.0)


def pretrained_source(config, workdir) -> pathlib.Path:
    """The pre-training run whose encoders guide: config.ssl.pretrained, else <workdir>/pretrain."""
    return pathlib.Path(config.ssl.pretrained or pathlib.Path(workdir) / "pretrain")


# A mean-teacher checkpoint's meta: the pre-training step whose encoders guided it, and that run's run_id.
GUIDANCE_STEP, GUIDANCE_RUN = "guidance_step", "guidance_run"


def guiding_step(source: pathlib.Path, guided) -> pathlib.Path:
    """Where the encoders that guide are: ``source`` itself (its newest step: best, else latest), or the step
    folder recorded in the meta of the mean-teacher checkpoint ``guided`` (None: none yet) when pre-training
    went on since, so that a resumed or evaluated mean teacher keeps the encoders it was trained with. That
    step gone, or ``source`` another pre-training run than the recorded one (its run_id), is a one-line
    CheckpointError."""
    guided_meta = checkpoint.read_meta(guided) if guided is not None else {}
    recorded, run = guided_meta.get(GUIDANCE_STEP), guided_meta.get(GUIDANCE_RUN)
    if recorded is None:
        return source
    newest = checkpoint.resolve_step(source)
    holds = checkpoint.read_meta(newest).get("run_id")
    if run and holds and run != holds:  # Runs written before run ids were drawn are not compared.
        raise checkpoint.CheckpointError(
            f"{guided}: a mean teacher guided by the encoders of pre-training run {run} (step {recorded}), and "
            f"{source} holds run {holds}: another pre-training run, or one started over; name the run that guided "
            "it (config.ssl.pretrained), or train the mean teacher again in another workdir to guide it with these")
    if int(recorded) == int(newest.name):
        return source
    kept = newest.parent / str(recorded)
    if not kept.is_dir():
        if int(newest.name) < int(recorded):  # Not the run that guided it, or one started over.
            raise checkpoint.CheckpointError(
                f"{guided}: a mean teacher guided by the encoders of pre-training step {recorded}, which {source} "
                f"does not hold (its newest step is {newest.name}: another pre-training run?); name the run that "
                "guided it (config.ssl.pretrained), or train the mean teacher again in another workdir to guide it "
                "with these")
        raise checkpoint.CheckpointError(
            f"{guided}: a mean teacher guided by the encoders of pre-training step {recorded}, which {source} no "
            f"longer holds (pre-training went on to step {newest.name}); train the mean teacher again in another "
            "workdir to guide it with these")
    info(f"{source} holds step {newest.name}; {guided} was trained with step {recorded}'s encoders, which guide it")
    return kept


def restore_pretrained(config, source: pathlib.Path, mesh):
    """(``config`` with the pre-training run's recorded ``pretrain`` fields, the model they describe, its
    {'params', 'batch_stats'} from the checkpoint at ``source`` replicated on ``mesh``, the checkpoint's
    meta, the step folder used)."""
    from amvlm_jax.train import pretrain

    config = encoder_config(config, checkpoint.read_meta(source).get("config"))
    model = build.build_model(config, build.text_encoder_config(config))
    variables, meta, used = pretrain.restore_encoders(config, model, source, mesh)
    return config, model, variables, meta, used


def encoder_config(config, recorded: dict | None):
    """``config`` with the ``pretrain`` fields of the pre-training run's recorded config (None: a checkpoint
    written before configs were recorded; the command's fields are used)."""
    if not recorded:
        return config
    config = with_recorded(config, recorded, sections=("pretrain",))
    if not config.pretrain.image_size:  # 0 meant that run's data.image_size.
        config.pretrain.image_size = recorded["data"]["image_size"]
    return config


def report_tokens(batch: dict) -> dict:
    """The ReportTokenizer arrays carried in a batch under 'report_<key>'."""
    return {k.removeprefix("report_"): v for k, v in batch.items() if k.startswith("report_")}


def teacher_probabilities(model, teacher, images, num_classes: int, norm: str):
    """The teacher's foreground probability (B, H, W) or class probabilities (B, H, W, C).

    norm 'batch': BatchNorm normalises with the statistics of `images` (the
    global batch), the stored statistics are left alone; 'ema': with the
    teacher's EMA running statistics (SPEC 6 as written). The EMA of running
    statistics keeps the early, orders-of-magnitude larger variances of the
    student (BatchNorm starts at variance 1) for hundreds of steps: measured
    on the synthetic data after 380 updates, an 'ema' teacher predicted
    0.17-0.25 on every pixel while the same averaged weights with batch
    statistics gave 0.93 on lesions and 0.18 on background.
    """
    if norm == "batch":
        logits, _ = model.apply(teacher, images, train=True, mutable=["batch_stats"])
    else:
        logits = model.apply(teacher, images, train=False)
    return jax.nn.sigmoid(logits[..., 0]) if num_classes == 1 else jax.nn.softmax(logits, axis=-1)


def fuse(p_teacher, p_text, w_text: float, num_classes: int, guidance: TextGuidance):
    """Pseudo-labels from the teacher's probabilities and the text masks (SPEC 6), without gradient;
    p_text clipped at guidance.text_clip (config.ssl.text_clip)."""
    if num_classes == 1:
        return fuse_pseudo_labels(p_teacher, p_text, w_text, text_eps=guidance.text_clip)
    return fuse_multiclass(p_teacher, p_text, w_text, text_eps=guidance.text_clip)


def text_mask_outputs(guidance: TextGuidance, trained: dict, frozen, images, tokens) -> tuple:
    """(L_tg, text-mask dict) of images (B, H, W, 3) in [0, 1] with their reports.

    trained: {'decoder': params, 'log_scale': l} (the dict of ``text_masks``;
    the gradient of L_tg reaches only these) or, with the word-attention
    head, {'head': params} (the dict of ``head_text_masks``; L_tg is None).
    Then, in this order: guidance.logit_offset (config.ssl.text_logit_offset)
    is added to p_text's logit; guidance.veto_only (config.ssl.text_veto_only)
    caps p_text at 0.5, so that the fusion can only lower the teacher's
    logit; guidance.constant > 0 (config.ssl.constant_text_mask: a control
    that keeps the fusion's mean shift and removes all location information)
    replaces every p_text by that value. L_tg is unchanged by all three.
    """
    if guidance.head is not None:
        tg_loss, masks = None, head_text_masks(guidance.head_logits(trained["head"], frozen, images, tokens), images.shape[1])
    else:
        patch_map, reports = guidance.encode(frozen, images, tokens)
        dense = guidance.decoder.apply({"params": trained["decoder"]}, patch_map)
        masks = text_masks(dense, reports, images, images.shape[1])
        tg_loss = text_guided_loss(dense, masks["soft"], reports, trained["log_scale"])
    if guidance.logit_offset:
        masks["p_text"] = jax.nn.sigmoid(clipped_logit(masks["p_text"], 1e-6) + guidance.logit_offset)
    if guidance.veto_only:
        masks["p_text"] = jnp.minimum(masks["p_text"], 0.5)
    if guidance.constant > 0.0:
        masks["p_text"] = jnp.full_like(masks["p_text"], guidance.constant)
    return tg_loss, masks


def generator_params(guidance: TextGuidance | None, generator) -> dict | None:
    """The text mask generator's trained variables in a state's ``generator`` (without optimiser state)."""
    if guidance is None:
        return None
    return {k: generator[k] for k in (("head",) if guidance.head is not None else ("decoder", "log_scale"))}


def restore_generator(guidance: TextGuidance, path, mesh) -> dict:
    """The text mask generator's trained variables ({'decoder', 'log_scale'} or {'head'}) from a mean-teacher
    checkpoint at ``path`` (as restore_variables resolves it), replicated on ``mesh``."""
    if "generator" not in checkpoint.saved_entries(path):
        raise checkpoint.CheckpointError(f"{path}: holds no text mask generator (a vision-only or supervised run?)")
    template = jax.eval_shape(lambda: {"generator": generator_params(guidance, guidance.init_generator(jax.random.PRNGKey(0)))})
    restored, meta, used = checkpoint.restore_variables(path, abstract_replicated(mesh, template))
    info(f"text mask generator from {used} (epoch {meta.get('epoch')})")
    return restored["generator"]


def fit_text_head(config, guidance: TextGuidance, labeled_split, mesh, initial: dict) -> dict:
    """Fits the word-attention head, from its ``initial`` params, on the labelled images' masks with
    their own reports; its params.

    The images are not augmented (a report names places). The frozen
    encoders' features are computed once; ``fit_mask_head`` does the rest
    (config.ssl.text_head_steps Adam steps at ssl.text_head_lr, batches of
    train.batch_size images drawn by a generator seeded by config.seed).
    """
    if labeled_split.masks is None or len(labeled_split) == 0:
        raise ConfigError(f"config.ssl.text_head='{config.ssl.text_head}' needs labelled training images")
    tokens = guidance.tokenizer(labeled_split.reports)
    features = jax.jit(lambda variables, images, batch_tokens: guidance.head_inputs(
        variables, images.astype(jnp.float32) / 255.0, batch_tokens))
    chunk = max(1, config.train.eval_batch_size)
    parts = [features(guidance.variables, *replicate(
        mesh, (labeled_split.images[a:a + chunk], {k: v[a:a + chunk] for k, v in tokens.items()})))
        for a in range(0, len(labeled_split), chunk)]
    inputs = tuple(jnp.concatenate(p) for p in zip(*parts))
    targets = (labeled_split.masks > 0).astype(np.float32)
    params, loss = fit_mask_head(guidance.head, initial, inputs, targets,
                                 config.ssl.text_head_steps, config.ssl.text_head_lr, config.train.batch_size,
                                 config.seed, mesh)
    info(f"text head fitted on {len(labeled_split)} labelled images"
         f"{' with the reports withheld' if guidance.withhold_reports else ''}: "
         f"{config.ssl.text_head_steps} steps, last batch loss {loss:.4f}")
    return params


def fit_mask_head(head, params, inputs: tuple, targets, steps: int, lr: float, batch_size: int, seed: int, mesh=None):
    """(params, last loss) after ``steps`` Adam steps of ``head`` on Dice + weighted BCE (the U-Net's loss)
    of its logits, resized to the targets' size, against ``targets`` (N, H, W) in {0, 1}.

    inputs: the head's arguments for all N images, (patch map (N, h, w, D), words (N, W, E), word mask
    (N, W)). Each step takes min(batch_size, N) distinct images drawn by a generator seeded by seed.
    """
    from tqdm import tqdm

    tx = optax.adam(lr)
    inputs = tuple(jnp.asarray(x) for x in inputs)
    targets = jnp.asarray(targets) if mesh is None else replicate(mesh, np.asarray(targets))
    count, image_size = targets.shape[0], targets.shape[1:]

    @jax.jit
    def step(params, opt_state, rows):
        def loss_fn(p):
            logits = head.apply({"params": p}, *(x[rows] for x in inputs))
            return segmentation_loss(head_text_masks(logits, image_size)["logits"][..., None], targets[rows])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    draw = np.random.default_rng([seed, 2])
    batch = min(batch_size, count)
    progress = tqdm(range(steps), desc="fitting the text head", leave=False, disable=jax.process_index() != 0)
    loss = jnp.zeros(())
    for index in progress:
        rows = draw.choice(count, batch, replace=False)
        params, opt_state, loss = step(params, opt_state, rows if mesh is None else replicate(mesh, rows))
        if (index + 1) % 100 == 0:
            progress.set_postfix(loss=f"{float(loss):.4f}")
    return params, float(loss)


def make_ssl_step(config, model, guidance: TextGuidance | None, decoder_tx, steps_per_epoch: int = 1):
    """jitted (state, frozen variables of the encoders, batch) -> (state, metrics).

    The student loss is SPEC 6's loss over the concatenated labeled and
    unlabeled halves; with config.ssl.unlabeled_weight != 1 or
    config.ssl.rampup_epochs > 0 it is loss(labeled) + w(t) loss(unlabeled)
    instead (BatchNorm still sees the whole batch).
    """
    num_classes = config.data.num_classes
    w_text = float(config.ssl.w_text)
    u_weight, rampup_steps = float(config.ssl.unlabeled_weight), round(config.ssl.rampup_epochs * steps_per_epoch)
    split_loss = u_weight != 1.0 or rampup_steps > 0
    train_decoder = bool(config.ssl.train_decoder) and guidance is not None and guidance.head is None
    max_alpha = float(config.ssl.ema_max_alpha)

    def ssl_step(state: MeanTeacherState, frozen, batch):
        x_l = batch["image"].astype(jnp.float32) / 255.0
        x_u = batch["unlabeled_image"].astype(jnp.float32) / 255.0
        step_metrics = {}
        generator = state.generator
        p_teacher = teacher_probabilities(model, state.teacher, x_u, num_classes, config.ssl.teacher_norm)
        if guidance is not None:
            tokens = report_tokens(batch)

            def decoder_loss(trained):
                tg_loss, masks = text_mask_outputs(guidance, trained, frozen, x_u, tokens)
                return tg_loss, masks["p_text"]

            trained = generator_params(guidance, generator)
            if train_decoder:
                (tg_loss, p_text), grads = jax.value_and_grad(decoder_loss, has_aux=True)(trained)
                updates, decoder_opt = decoder_tx.update(grads, generator["opt_state"], trained)
                trained = optax.apply_updates(trained, updates)
                generator = {**trained, "opt_state": decoder_opt}
                step_metrics["tg_loss"] = tg_loss
            else:
                _, p_text = decoder_loss(trained)
            pseudo = fuse(p_teacher, jax.lax.stop_gradient(p_text), w_text, num_classes, guidance)
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
            if split_loss:
                n = x_l.shape[0]
                weight = unlabeled_weight(state.step, u_weight, rampup_steps)
                loss = segmentation_loss(logits[:n], targets[:n]) + weight * segmentation_loss(logits[n:], targets[n:])
            else:
                loss = segmentation_loss(logits, targets)
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(student_loss, has_aux=True)(state.params)
        state = state.apply_gradients(grads, batch_stats=batch_stats, generator=generator)
        step_metrics |= optimizer_telemetry(grads, state.params)
        alpha = ema_alpha(state.step - 1, max_alpha)  # t counts the student updates before this one.
        teacher = ema_update({"params": state.params, "batch_stats": state.batch_stats}, state.teacher, alpha)
        state = state.replace(teacher=teacher)
        step_metrics |= {"loss": loss, "pseudo_label_mean": jnp.mean(pseudo if num_classes == 1 else 1 - pseudo[..., 0])}
        return state, step_metrics

    return StepKeepingShardings(ssl_step)


def make_picture_panels(config, model, guidance: TextGuidance | None, mesh, split) -> callable:
    """(state, rows) -> {'prediction', 'pseudo-label'[, 'text mask']}: (N, H, W) maps of split rows.

    prediction: the student's foreground probability (labels when
    multi-class); pseudo-label: the fused pseudo-label's foreground
    probability (its most probable class when multi-class; the teacher's
    alone without guidance); text mask: p_text from each image's own report.
    """
    num_classes, w_text = config.data.num_classes, float(config.ssl.w_text)
    predict_step = evaluate.make_predict_step(model)
    arrays = {"image": split.images}
    if guidance is not None:
        arrays |= {f"report_{k}": v for k, v in guidance.tokenizer(split.reports).items()}

    @jax.jit
    def guided(teacher, trained, frozen, batch):
        images = batch["image"].astype(jnp.float32) / 255.0
        pseudo = teacher_probabilities(model, teacher, images, num_classes, config.ssl.teacher_norm)
        p_text = jnp.zeros(images.shape[:3], jnp.float32)
        if guidance is not None:
            _, masks = text_mask_outputs(guidance, trained, frozen, images, report_tokens(batch))
            p_text = masks["p_text"]
            pseudo = fuse(pseudo, p_text, w_text, num_classes, guidance)
        return (pseudo if num_classes == 1 else jnp.argmax(pseudo, axis=-1).astype(jnp.int32)), p_text

    def panels(state, rows):
        batch = evaluate.rows_batch(mesh, arrays, rows)
        trained = generator_params(guidance, state.generator)
        frozen = None if guidance is None else guidance.variables
        predicted = predict_step(state.params, state.batch_stats, batch["image"])
        pseudo, p_text = guided(state.teacher, trained, frozen, batch)
        predicted, pseudo, p_text = (np.asarray(a)[: len(rows)] for a in gather_to_host((predicted, pseudo, p_text)))
        out = {"prediction": predicted, "pseudo-label": pseudo}
        if guidance is not None:
            out["text mask"] = p_text
        return out

    return panels


GUIDANCE_MAPS = ("text_mask", "teacher", "pseudo_label", "student")
AUROC_BINS = 4096  # bins of 0.03 in the logit (metrics.foreground_histograms)


def make_guidance_eval_step(config, model, guidance: TextGuidance | None):
    """jitted (teacher, student, trained decoder, frozen, batch) -> {map: (dice (B,), iou (B,), pos hist, neg hist)}.

    The maps (GUIDANCE_MAPS; without guidance only 'teacher' and 'student')
    are scored against batch['mask']: teacher, student and pseudo-labels as
    predictions (0.5 / argmax), the text mask as a binary foreground map at
    0.5. The student predicts with the teacher's BatchNorm mode
    (config.ssl.teacher_norm), so the two differ only in their weights: how
    far the EMA lags behind the model it averages. The
    histograms of the foreground probability over positive and negative
    pixels give a threshold-free pixel AUROC (rows with valid = 0 excluded).
    """
    num_classes = config.data.num_classes
    w_text = float(config.ssl.w_text)

    @jax.jit
    def guidance_eval_step(teacher, student, trained, frozen, batch):
        images = batch["image"].astype(jnp.float32) / 255.0
        truth = batch["mask"].astype(jnp.int32)
        p_teacher = teacher_probabilities(model, teacher, images, num_classes, config.ssl.teacher_norm)
        maps = {"teacher": p_teacher, "student": teacher_probabilities(model, student, images, num_classes, config.ssl.teacher_norm)}
        if guidance is not None:
            _, masks = text_mask_outputs(guidance, trained, frozen, images, report_tokens(batch))
            maps["text_mask"] = masks["p_text"]
            maps["pseudo_label"] = fuse(p_teacher, masks["p_text"], w_text, num_classes, guidance)
        out = {}
        for name, probability in maps.items():
            if probability.ndim == 4:  # Class probabilities: argmax labels, foreground = 1 - background.
                labels, foreground, classes = jnp.argmax(probability, -1), 1.0 - probability[..., 0], num_classes
            else:
                labels, foreground, classes = (probability > 0.5).astype(jnp.int32), probability, 1
            reference = truth if classes > 1 else (truth > 0).astype(jnp.int32)
            dice, iou = metrics.dice_iou_per_image(labels, reference, classes)
            out[name] = (dice, iou, *metrics.foreground_histograms(foreground, truth > 0, batch["valid"], AUROC_BINS))
        return out

    return guidance_eval_step


def evaluate_guidance(config, workdir, checkpoint_path: str = "", mesh=None, root=None) -> dict:
    """How good are the pseudo-labels? Scores the text masks, the teacher, the fused pseudo-labels and the student.

    Restores the teacher, the student and the text-mask decoder of a
    mean-teacher checkpoint (default: the workdir's best) and scores them on the
    unlabeled training images, against their held-back masks (read here,
    never in training), and on the validation split. With ssl.teacher_norm 'batch' the images go in
    batches of the run's train.batch_size, as the teacher labelled them. Writes
    <workdir>/guidance.json ({split: {map: {dice, miou, auroc}, images}},
    percent) and per_image_guidance_<split>.csv; returns the dict.
    """
    workdir = pathlib.Path(workdir)
    source = checkpoint_path or workdir / "checkpoints" / "best"
    mesh = mesh or make_mesh(config)
    root = root or datasets.data_root(config, workdir)
    # A vision-only run saved no decoder: it is scored without text masks.
    guidance = TextGuidance(config, workdir, mesh, source) if "generator" in checkpoint.saved_entries(source) else None
    model = supervised.build_unet(config)
    template = jax.eval_shape(lambda: create_state(config, model, guidance, steps_per_epoch=1)[0])
    target = {"teacher": template.teacher, "params": template.params, "batch_stats": template.batch_stats}
    if guidance is not None:
        target["generator"] = generator_params(guidance, template.generator)
    restored, meta, used = checkpoint.restore_variables(source, abstract_replicated(mesh, target))
    info(f"scoring the pseudo-labels of {used} (epoch {meta.get('epoch')})")
    trained = restored.get("generator")
    frozen = guidance.variables if guidance is not None else None
    student = {"params": restored["params"], "batch_stats": restored["batch_stats"]}
    step = make_guidance_eval_step(config, model, guidance)

    named = {}
    _, unlabeled = datasets.load_train_parts(config, root, unlabeled_masks=True)
    if len(unlabeled) and unlabeled.masks is not None:
        named["unlabeled"] = unlabeled
    elif len(unlabeled):
        info("the unlabelled training images are not all masked: their pseudo-labels are not scored")
    val = datasets.load_eval_split(config, root, "val")
    if val is not None:
        named["val"] = val
    results = {}
    batch_size, pad_multiple = config.train.eval_batch_size, 0
    if config.ssl.teacher_norm == "batch":
        # The teacher labelled train.batch_size images at a time, with their batch statistics: scored so, not
        # at train.eval_batch_size (a memory setting) and with no copied padding rows in the statistics.
        batch_size = (meta.get("config") or {}).get("train", {}).get("batch_size", config.train.batch_size)
        pad_multiple = mesh.size
    batch_size = -(-batch_size // mesh.size) * mesh.size
    for split_name, split in named.items():
        tokens = guidance.tokenizer(split.reports) if guidance is not None else {}
        per_map = {}
        for batch, real in pipeline.evaluation_batches(split, batch_size, pad_multiple):
            loop.stop_if_interrupted()
            batch["valid"] = np.arange(len(batch["index"])) < real
            batch |= {f"report_{k}": v[batch["index"]] for k, v in tokens.items()}
            outputs = gather_to_host(step(restored["teacher"], student, trained, frozen, pipeline.replicated_to_global(mesh, batch)))
            for name, (dice, iou, positive, negative) in outputs.items():
                entry = per_map.setdefault(name, {"dice": [], "iou": [], "positive": 0.0, "negative": 0.0})
                entry["dice"].append(np.asarray(dice)[:real])
                entry["iou"].append(np.asarray(iou)[:real])
                entry["positive"] = entry["positive"] + np.asarray(positive)
                entry["negative"] = entry["negative"] + np.asarray(negative)
        summary = {"images": len(split)}
        columns = {}
        for name in GUIDANCE_MAPS:
            if name not in per_map:
                continue
            entry = per_map[name]
            dice, iou = np.concatenate(entry["dice"]), np.concatenate(entry["iou"])
            summary[name] = metrics.summarize(dice, iou) | {"auroc": 100.0 * metrics.auroc_from_histograms(entry["positive"], entry["negative"])}
            summary[name].pop("images")
            columns[name] = dice
        results[split_name] = summary
        if jax.process_index() == 0:
            rows = [["file"] + [f"{name}_dice" for name in columns]]
            rows += [[file_name] + [f"{100 * columns[name][row]:.4f}" for name in columns]
                     for row, file_name in enumerate(split.names)]
            write_atomically(workdir / f"per_image_guidance_{split_name}.csv", csv_text(rows))
    if jax.process_index() == 0:
        write_atomically(workdir / "guidance.json", json_text(results, indent=2) + "\n")
    info(format_guidance_table(results, veto_only=guidance is not None and guidance.veto_only))
    return results


def format_guidance_table(results: dict, veto_only: bool = False) -> str:
    """Dice / mIoU / pixel AUROC (percent) of each map on each split; with veto_only, a line that says why the
    text masks' Dice is 0."""
    lines = [f"{'split':<10}{'map':<14}{'Dice':>8}{'mIoU':>8}{'AUROC':>8}"]
    for split, summary in results.items():
        for name in GUIDANCE_MAPS:
            if name in summary:
                values = summary[name]
                lines.append(f"{split:<10}{name:<14}{values['dice']:>8.2f}{values['miou']:>8.2f}{values['auroc']:>8.2f}")
    if veto_only:
        lines.append("(text masks capped at 0.5, config.ssl.text_veto_only: none marks a pixel at 0.5, so their Dice "
                     "and mIoU are 0; their AUROC says how well they rank lesion pixels)")
    return "\n".join(lines)


def create_state(config, model, guidance: TextGuidance | None, steps_per_epoch: int):
    """(MeanTeacherState at step 0, the decoder's optimiser): the teacher starts as a copy of the student."""
    variables = supervised.init_variables(config, model)
    generator = None
    decoder_tx = optax.adam(config.ssl.decoder_lr or config.train.lr)
    if guidance is not None:
        generator = guidance.init_generator(jax.random.PRNGKey(config.seed + 1))  # The head: fitted by fit_text_head.
        if guidance.head is None:  # The decoder trains on L_tg with its own Adam.
            generator["opt_state"] = decoder_tx.init(generator)
    state = MeanTeacherState.create(variables["params"], variables["batch_stats"], supervised.student_optimizer(
        config, steps_per_epoch), teacher=jax.tree.map(jnp.copy, variables), generator=generator)
    return state, decoder_tx


def initial_state(config, model, guidance: TextGuidance | None, mesh, steps_per_epoch: int, labeled_split=None,
                  resuming: bool = False):
    """(The job's state replicated on ``mesh``, the decoder's optimiser). With a text head
    (config.ssl.text_head) a fresh run fits it on ``labeled_split`` first; a resumed one restores it."""
    state, decoder_tx = create_state(config, model, guidance, steps_per_epoch)
    if guidance is not None and guidance.head is not None and not resuming:
        head = fit_text_head(config, guidance, labeled_split, mesh, state.generator["head"])
        state = state.replace(generator={"head": head})
    return replicate(mesh, state), decoder_tx


def student_images(config, labeled_split, unlabeled_split) -> np.ndarray:
    """(N, H, W, 3) uint8 images for the student's BatchNorm statistics.

    Up to config.train.precise_bn_images, half labeled and half unlabeled,
    interleaved one to one so that every batch mixes both like a training
    step; the rest of the longer split fills up the end.
    """
    half = config.train.precise_bn_images // 2
    labeled, unlabeled = labeled_split.images[:half], unlabeled_split.images[:half]
    pairs = min(len(labeled), len(unlabeled))
    mixed = np.stack([labeled[:pairs], unlabeled[:pairs]], axis=1).reshape((-1,) + labeled.shape[1:])
    return np.concatenate([mixed, labeled[pairs:], unlabeled[pairs:]])


def training_batches(config, labeled_split, unlabeled_split, unlabeled_tokens: dict | None, start_step: int):
    """The endless stream of SSMIS batches from ``start_step`` on: config.train.batch_size labeled images
    (augmented, SPEC 1) with their masks, and as many unlabeled images (augmented only with
    config.ssl.augment_unlabeled) with their reports' token arrays (``report_*``) when ``unlabeled_tokens``."""
    batch_size = config.train.batch_size
    labeled_batches = pipeline.training_batches(
        labeled_split, batch_size, seed=config.seed, start_step=start_step, worker_count=config.data.worker_count
    )
    unlabeled_batches = pipeline.training_batches(
        unlabeled_split, batch_size, seed=config.seed + 7919, start_step=start_step, with_mask=False,
        augmentation="spec" if config.ssl.augment_unlabeled else "none",
        worker_count=config.data.worker_count if config.ssl.augment_unlabeled else 0,  # Else nothing to compute.
    )
    for labeled, unlabeled in zip(labeled_batches, unlabeled_batches):
        batch = {"image": labeled["image"], "mask": labeled["mask"], "unlabeled_image": unlabeled["image"]}
        if unlabeled_tokens is not None:
            batch |= {f"report_{k}": v[unlabeled["index"]] for k, v in unlabeled_tokens.items()}
        yield batch


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
    latest = workdir / "checkpoints" / "latest"
    resuming = checkpoint.has_step(latest)
    guidance = TextGuidance(config, workdir, mesh, latest if resuming else None) if text_guidance_enabled(config) else None
    info(
        f"SSMIS: {len(labeled_split)} labeled + {len(unlabeled_split)} unlabeled images, "
        f"{steps_per_epoch} steps per epoch, text guidance {'on (w_text=%g)' % config.ssl.w_text if guidance else 'off'}"
    )
    unlabeled_tokens = guidance.tokenizer(unlabeled_split.reports) if guidance else None

    model = supervised.build_unet(config)
    state, decoder_tx = initial_state(config, model, guidance, mesh, steps_per_epoch, labeled_split, resuming=resuming)
    batches = functools.partial(training_batches, config, labeled_split, unlabeled_split, unlabeled_tokens)
    ssl_step = make_ssl_step(config, model, guidance, decoder_tx, steps_per_epoch)
    frozen = guidance.variables if guidance is not None else None
    job = supervised.segmentation_job(
        "ssl", config, workdir, mesh, model, state,
        lambda state, batch: ssl_step(state, frozen, batch), batches, steps_per_epoch, val_split,
        make_picture_panels(config, model, guidance, mesh, val_split) if val_split is not None else None,
        student_images(config, labeled_split, unlabeled_split), 2 * batch_size,
    )
    if guidance is not None:
        job.meta = {GUIDANCE_STEP: guidance.step} | ({GUIDANCE_RUN: guidance.run_id} if guidance.run_id else {})
    loop.run(job)
    best = str(workdir / "checkpoints" / "best")
    results = supervised.evaluate_checkpoint(config, workdir, best, mesh=mesh, root=root)
    if config.eval.guidance:
        evaluate_guidance(config, workdir, best, mesh=mesh, root=root)
    return results
