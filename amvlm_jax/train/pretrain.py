"""Vision-language pre-training (mode 'pretrain'): AMVLM (SPEC 3) or MGCA (SPEC 4).

Reads the training image-report pairs of the LViT folders or of a corpus
file (data/corpus.py; decoded up front, or streamed from disk when large),
tokenises each batch's reports on the host, and trains the ``AMVLM`` model.
For AMVLM's ICL term the momentum encoders (an EMA of the online encoders
and their heads, kept in ``PretrainState.momentum``) see an augmented view of
each image (SPEC section 1 augmentation, made on the host) and the report.
What the encoders learned (``EncoderEvaluation``: retrieval on the training
and held-out pairs, zero-shot and linear-probe accuracy on the held-out
ones) is evaluated before training (logged as epoch 0) and after every epoch.

Outputs under <workdir>/pretrain/: checkpoints/{latest,best}/ (Orbax; a
rerun resumes from latest), metrics.jsonl, tensorboard/, summary.json, and
ranks/step_<N>.json: each retrieval query's rank at every evaluation (step 0:
before training), for paired tests over queries (tools/pretrain_table.py).
"""

from __future__ import annotations

import collections
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from amvlm_jax import weights
from amvlm_jax.config import ConfigError
from amvlm_jax.data import corpus, datasets, folders, pipeline
from amvlm_jax.data.tokenize import ReportTokenizer
from amvlm_jax.losses.prototypes import normalize_prototypes
from amvlm_jax.models.amvlm import AMVLM, TOKEN_KEYS
from amvlm_jax.ops import ema_update
from amvlm_jax import metrics
from amvlm_jax.losses import objectives
from amvlm_jax.train import build, checkpoint, loop, parallel
from amvlm_jax.train.logging import info, json_text, write_atomically
from amvlm_jax.train.state import PretrainState, optimizer_telemetry

# ---------------------------------------------------------------------------
# State and optimiser
# ---------------------------------------------------------------------------


def create_state(config, model: AMVLM, image_size: int, text_params=None, vit_params=None, tx=None,
                 steps_per_epoch: int = 1) -> PretrainState:
    """Initial state: random init, then the loaded encoder weights; ``pretrain_optimizer`` unless ``tx``.

    ``steps_per_epoch`` sets the optimiser's schedule and the prototypes'
    frozen steps (values only: the state's structure does not depend on it).

    ``momentum`` holds {'params', 'batch_stats'} of the momentum encoders
    when ICL is on, else None.
    """
    images = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    rngs = {"params": jax.random.PRNGKey(config.seed), "dropout": jax.random.PRNGKey(config.seed + 1)}
    init = jax.jit(model.init, static_argnames=("train", "with_pdt"))
    variables = init(rngs, images, build.dummy_tokens(2, config.pretrain.max_length), train=False, with_pdt=True)
    params = dict(variables["params"])
    batch_stats = dict(variables.get("batch_stats", {}))
    if text_params is not None:
        params["text_encoder"] = jax.tree.map(jnp.asarray, text_params)
    if vit_params is not None:
        params["image_encoder"] = jax.tree.map(jnp.asarray, vit_params)
    if config.pretrain.objective == "mgca":
        params["prototypes"] = normalize_prototypes(params["prototypes"])
    momentum = None
    if build.uses_momentum(config):
        # The momentum encoders start as copies of the online ones.
        momentum = jax.tree.map(jnp.array, {"params": build.encoder_subset(params), "batch_stats": build.encoder_subset(batch_stats)})
    tx = tx or pretrain_optimizer(config, params, steps_per_epoch)
    return PretrainState.create(params, batch_stats, tx, momentum=momentum)


def initial_state(config, model: AMVLM, mesh: Mesh, steps_per_epoch: int, resuming: bool = False) -> PretrainState:
    """The job's state on ``mesh``: large encoder weights (and their Adam moments and momentum copies)
    FSDP-sharded, the rest replicated. Fresh: initialised, then the pre-trained encoder weights loaded,
    computed in place (``parallel.init_sharded``).
    ``resuming``: only its shapes and shardings (the loop restores the values; nothing is initialised)."""
    size = build.pretrain_image_size(config)
    if resuming:
        abstract = jax.eval_shape(lambda: create_state(config, model, size, steps_per_epoch=steps_per_epoch))
        return parallel.abstract_sharded(mesh, abstract, config)
    _, text_params = build.build_text_encoder(config)
    vit_weights = config.pretrain.vit_weights
    if not vit_weights:  # Silently from scratch, a paper configuration would train a ViT-B at 3e-5 from noise.
        size_name = {"Ti": "tiny", "S": "small", "B": "base"}.get(config.pretrain.vit.split("/")[0], "base")
        info(f"the ViT-{config.pretrain.vit} starts from random weights: config.pretrain.vit_weights is empty (the paper's "
             f"starts from ImageNet DeiT: --config.pretrain.vit_weights=facebook/deit-{size_name}-patch16-224 or a file)")
    vit_params = weights.load_vit(vit_weights, model.image_encoder, image_size=size) if vit_weights else None
    return parallel.init_sharded(mesh, config, lambda text, vit: create_state(
        config, model, size, text, vit, steps_per_epoch=steps_per_epoch), text_params, vit_params)


IMAGE_MODULES = ("image_encoder", "image_global_head", "image_local_head")


def learning_rate(config, peak: float, steps_per_epoch: int) -> optax.ScalarOrSchedule:
    """pretrain.schedule: 'constant' (AMVLM, SPEC 3.5) or 'warmup_cosine' (MGCA's released run, SPEC 4):
    linear from pretrain.min_lr to ``peak`` over pretrain.warmup_fraction of all steps, then a cosine
    down to pretrain.min_lr at the last step."""
    pre = config.pretrain
    if pre.schedule == "constant":
        return peak
    total = max(1, pre.epochs * steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(pre.min_lr, peak, int(pre.warmup_fraction * total), total, pre.min_lr)


def own_image_lr(config) -> bool:
    """Whether pretrain.image_lr gives the image encoder and its heads a peak rate of their own."""
    return bool(config.pretrain.image_lr) and config.pretrain.image_lr != config.pretrain.lr


def logged_rates(config, steps_per_epoch: int):
    """step -> {'lr': pretrain.lr's rate at that step} (train/lr), with 'image_lr' (the image encoder's and its
    heads', train/image_lr) where ``own_image_lr``."""
    pre = config.pretrain
    rates = {"lr": learning_rate(config, pre.lr, steps_per_epoch)}
    if own_image_lr(config):
        rates["image_lr"] = learning_rate(config, pre.image_lr, steps_per_epoch)
    return lambda step: {name: float(rate(step)) if callable(rate) else rate for name, rate in rates.items()}


def frozen_until(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """``inner`` for updates after the first ``steps`` calls; before that zero updates and ``inner``'s
    state untouched, as parameters whose gradient is None in torch (no moment, no step count, no decay)."""

    def init(params):
        return {"count": jnp.zeros([], jnp.int32), "inner": inner.init(params)}

    def update(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state["inner"], params)
        frozen = state["count"] < steps
        keep = lambda old, new: jnp.where(frozen, old, new)  # noqa: E731
        return (jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates),
                {"count": state["count"] + 1, "inner": jax.tree.map(keep, state["inner"], new_inner)})

    return optax.GradientTransformation(init, update)


def pretrain_optimizer(config, params: dict, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """The pre-training optimiser.

    pretrain.optimizer: 'adam' (AMVLM, SPEC 3.5) or 'adamw' (MGCA's released run, SPEC 4: decoupled
    weight decay pretrain.weight_decay on every parameter, as torch's AdamW), at pretrain.lr on the
    pretrain.schedule; the image encoder and its heads at pretrain.image_lr when that is set (a ViT
    trained from scratch needs a larger step than a pre-trained text encoder: with one small rate the
    text side alone fits the pairs). MGCA's prototypes get no update and no optimiser state for their
    first pretrain.mgca.freeze_prototypes_epochs epochs (SPEC 4). With pretrain.train_text_encoder False
    the text encoder gets neither updates nor optimiser state.
    """
    pre = config.pretrain

    def optimizer(peak: float, freeze_steps: int = 0) -> optax.GradientTransformation:
        rate = learning_rate(config, peak, steps_per_epoch)
        if pre.optimizer == "adamw" and not freeze_steps:
            return optax.adamw(rate, b1=pre.adam_betas[0], b2=pre.adam_betas[1], weight_decay=pre.weight_decay)
        if not freeze_steps:
            return optax.adam(rate, b1=pre.adam_betas[0], b2=pre.adam_betas[1])
        direction = optax.chain(optax.scale_by_adam(*pre.adam_betas), optax.add_decayed_weights(pre.weight_decay))
        # The rate follows the global step (one schedule for all parameters, as torch's scheduler).
        return optax.chain(frozen_until(direction, freeze_steps), optax.scale_by_learning_rate(rate))

    groups = {"rest": optimizer(pre.lr)}
    labels = {name: "rest" for name in params}
    if own_image_lr(config):
        groups["image"] = optimizer(pre.image_lr)
        labels |= {name: "image" for name in params if name in IMAGE_MODULES}
    freeze_steps = int(pre.mgca.freeze_prototypes_epochs * steps_per_epoch)
    if "prototypes" in params and freeze_steps > 0:
        groups["prototypes"] = optimizer(pre.lr, freeze_steps)
        labels["prototypes"] = "prototypes"
    if not pre.train_text_encoder:
        groups["locked"] = optax.set_to_zero()
        labels["text_encoder"] = "locked"
    if len(groups) == 1:
        return groups["rest"]
    labels = {name: jax.tree.map(lambda _, label=label: label, params[name]) for name, label in labels.items()}
    return optax.multi_transform(groups, labels)


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


def _images(batch_images: jnp.ndarray) -> jnp.ndarray:
    return batch_images.astype(jnp.float32) / 255.0


def make_train_step(model: AMVLM, config):
    """jitted (state, batch) -> (state, metrics {'loss', *terms}).

    batch: image (B, S, S, 3) uint8, the ``ReportTokenizer`` arrays of the
    reports and, with ICL, image_aug (B, S, S, 3) uint8 (momentum view).
    The dropout key is fold_in(PRNGKey(seed), step), so a resumed run draws
    the same keys. After the optimiser step: MGCA prototypes are
    re-normalised (``pretrain_optimizer`` leaves them alone during the first
    freeze_prototypes_epochs epochs); momentum encoders take an EMA step.
    """
    pre = config.pretrain
    objective = objectives.objective_fn(config)
    with_pdt = build.uses_pdt(config)
    with_momentum = build.uses_momentum(config)
    is_mgca = pre.objective == "mgca"
    seed_key = jax.random.PRNGKey(config.seed)
    momentum = pre.momentum

    def train_step(state: PretrainState, batch: dict):
        images = _images(batch["image"])
        tokens = {k: batch[k] for k in TOKEN_KEYS}
        online_key, momentum_key = jax.random.split(jax.random.fold_in(seed_key, state.step))
        momentum_outputs = None
        if with_momentum:
            # Train mode (batch statistics, dropout) as the online encoders; the
            # statistics they would update are discarded: the EMA sets them.
            image_key, text_key = jax.random.split(momentum_key)
            image_view, _ = model.apply(
                state.momentum, _images(batch["image_aug"]), train=True, method=AMVLM.encode_image,
                rngs={"dropout": image_key}, mutable=["batch_stats"],
            )
            report_view, _ = model.apply(
                state.momentum, tokens, train=True, method=AMVLM.encode_text, rngs={"dropout": text_key}, mutable=["batch_stats"]
            )
            momentum_outputs = jax.lax.stop_gradient(image_view | report_view)

        def loss_fn(params):
            if not pre.train_text_encoder:  # No gradient: XLA drops the backward pass through it.
                params = params | {"text_encoder": jax.lax.stop_gradient(params["text_encoder"])}
            outputs, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, tokens, train=True, with_pdt=with_pdt,
                rngs={"dropout": online_key}, mutable=["batch_stats"],
            )
            loss, terms = objective(outputs, momentum_outputs, config)
            return loss, (terms, updates["batch_stats"])

        (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads, batch_stats=batch_stats)
        terms = terms | optimizer_telemetry(grads, new_state.params)
        if is_mgca:
            params = dict(new_state.params)
            params["prototypes"] = normalize_prototypes(params["prototypes"])
            new_state = new_state.replace(params=params)
        if with_momentum:
            online = {"params": build.encoder_subset(new_state.params), "batch_stats": build.encoder_subset(new_state.batch_stats)}
            new_state = new_state.replace(momentum=ema_update(online, state.momentum, momentum))
        return new_state, {"loss": loss, **terms}

    return parallel.StepKeepingShardings(train_step)


def make_encoders(model: AMVLM):
    """jitted, eval mode: (variables, images uint8 (B,S,S,3)) -> (v (B, D), cls (B, F)) and
    (variables, tokens) -> t (B, D)."""

    def encode_images(variables, images):
        outputs = model.apply(variables, _images(images), train=False, method=AMVLM.encode_image)
        return outputs["v"], outputs["cls"]

    def encode_texts(variables, tokens):
        return model.apply(variables, tokens, train=False, method=AMVLM.encode_text)["t"]

    return jax.jit(encode_images), jax.jit(encode_texts)


# ---------------------------------------------------------------------------
# What the encoders learned
# ---------------------------------------------------------------------------


def _batched(function, count: int, batch_size: int, mesh: Mesh, rows_batch) -> list[np.ndarray]:
    """``function`` over rows 0..count-1 in global batches padded to ``batch_size``; its outputs gathered
    to numpy and concatenated. ``rows_batch(rows)`` builds the batch of the given rows."""
    parts = []
    for start in range(0, count, batch_size):
        loop.stop_if_interrupted()
        rows = np.arange(start, min(start + batch_size, count))
        padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        outputs = parallel.gather_to_host(function(pipeline.replicated_to_global(mesh, rows_batch(padded))))
        parts.append([np.asarray(x)[: len(rows)] for x in jax.tree.leaves(outputs)])
    return [np.concatenate(column) for column in zip(*parts)]


def distinct_report_inputs(groups: np.ndarray, input_ids: np.ndarray) -> tuple[int, int]:
    """(distinct reports, distinct token sequences) of a set's retrieval pairs: groups (N,) from the report
    texts, input_ids (N, L) as tokenised. Fewer inputs than reports: some differ only after max_length."""
    return len(np.unique(groups)), len(np.unique(np.asarray(input_ids), axis=0))


def unprompted_rows(label: str, classes, values, name: str) -> str | None:
    """The line saying which labelled rows of set ``name`` zero-shot field ``label`` leaves unscored, as no
    prompt stands for their class (``classes``: the prompts' values; ``values``: the rows' labels, '' = none),
    or None when every labelled row has a prompt."""
    prompted = set(classes)
    missing = collections.Counter(v for v in values if v != "" and v not in prompted)
    if not missing:
        return None
    labelled = sum(v != "" for v in values)
    counts = ", ".join(f"'{value}' ({count})" for value, count in missing.most_common(8))
    return (f"{name}: zero-shot '{label}' scores {labelled - sum(missing.values())} of its {labelled} labelled rows: "
            f"no prompt in config.eval.zero_shot['{label}'] for {counts}{', ...' if len(missing) > 8 else ''}")


class EncoderEvaluation:
    """What pre-training learned, scored on fixed pair sets by ``__call__(variables) -> {'<set>/<metric>'}``.

    sets: {name: (SplitArrays without masks, labels {field: [value]})}, 'train' first. Each set: image-to-
    report and report-to-image retrieval on its first eval.retrieval_pairs pairs, pairs with identical
    report texts counting as each other's match (``metrics.retrieval_ranks``' groups). Each other (held-out) set:
    zero-shot accuracy for every eval.zero_shot field, and the accuracy of a linear probe for every
    eval.probe_fields field, fitted on the [CLS] features of the first eval.probe_rows training images.
    Images are decoded batch by batch when a set streams them.
    """

    def __init__(self, config, model: AMVLM, sets: dict, tokenizer: ReportTokenizer, mesh: Mesh, batch_size: int):
        self.config, self.sets, self.mesh, self.batch_size = config, sets, mesh, batch_size
        self.encode_images, self.encode_texts = make_encoders(model)
        evaluation = config.eval
        probe_rows = evaluation.probe_rows if evaluation.probe_fields else 0
        # Rows embedded of each set: the retrieval pairs, and in 'train' also the probes' training rows.
        self.counts = {name: min(len(split), max(evaluation.retrieval_pairs, probe_rows if name == "train" else 0))
                       for name, (split, _) in sets.items()}
        # The reports and prompts are fixed: tokenised once, not at every evaluation.
        self.report_tokens = {name: tokenizer(sets[name][0].reports[:count]) for name, count in self.counts.items()}
        # Retrieval groups: pairs with the same report text answer for each other.
        self.report_groups = {name: np.unique(np.asarray(sets[name][0].reports[:min(count, evaluation.retrieval_pairs)],
                                                         dtype=object).astype(str), return_inverse=True)[1]
                              for name, count in self.counts.items()}
        for name, groups in self.report_groups.items():
            reports, inputs = distinct_report_inputs(groups, self.report_tokens[name]["input_ids"][:len(groups)])
            if inputs < reports:
                info(f"{name}: its {reports} distinct reports are {inputs} distinct inputs to the text encoder at "
                     f"pretrain.max_length={tokenizer.max_length} (reports that differ only after it embed alike, "
                     "and a tie counts against the right answer)")
        self.prompts = {label: (list(prompts.keys()), tokenizer(list(prompts.values())))
                        for label, prompts in evaluation.zero_shot.items()}
        for label, (classes, _) in self.prompts.items():  # Prompts that match no row would score nothing, silently.
            for name, (_, labels) in ((n, s) for n, s in sets.items() if n != "train"):
                values = set(labels[label][:self.counts[name]]) - {""}
                if values and not values & set(classes):
                    raise ConfigError(f"config.eval.zero_shot['{label}']: none of its classes "
                                      f"({', '.join(classes)}) is a value of '{label}' in {name} "
                                      f"(values: {', '.join(sorted(values)[:8])})")
                if line := unprompted_rows(label, classes, labels[label][:self.counts[name]], name):
                    info(line)

    def _embed_texts(self, variables, tokens: dict) -> np.ndarray:
        """t (N, D) float32 of tokenised texts (the ``ReportTokenizer`` arrays, N rows)."""
        (t,) = _batched(lambda batch: self.encode_texts(variables, batch), len(tokens["input_ids"]),
                        self.batch_size, self.mesh, lambda rows: {k: v[rows] for k, v in tokens.items()})
        return t.astype(np.float32)  # bf16 runs.

    def _embed(self, variables, name: str) -> dict:
        """{'v' (count, D), 'cls' (count, F), 't' (count, D)} float32 of the set's first ``counts[name]`` pairs."""
        images = self.sets[name][0].images
        v, cls = _batched(lambda batch: self.encode_images(variables, batch["image"]), self.counts[name],
                          self.batch_size, self.mesh, lambda rows: {"image": images[rows]})
        return {"v": v.astype(np.float32), "cls": cls.astype(np.float32),
                "t": self._embed_texts(variables, self.report_tokens[name])}

    def __call__(self, variables: dict, ranks_path: pathlib.Path | None = None) -> dict:
        """ranks_path: where process 0 also writes every retrieval query's rank ({set: ``metrics.
        retrieval_ranks``' lists}, JSON), the per-query results of paired tests over queries."""
        evaluation, results, ranks = self.config.eval, {}, {}
        embedded = {name: self._embed(variables, name) for name in self.sets}
        for name, outputs in embedded.items():
            pairs = min(self.counts[name], evaluation.retrieval_pairs)
            ranks[name] = metrics.retrieval_ranks(outputs["v"][:pairs], outputs["t"][:pairs], self.report_groups[name])
            results |= {f"{name}/{k}": value for k, value in metrics.retrieval_scores(ranks[name]).items()}
        if ranks_path is not None and jax.process_index() == 0:
            ranks_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(ranks_path, json_text({name: {k: v.tolist() for k, v in r.items()} for name, r in ranks.items()}))
        held_out = [name for name in embedded if name != "train"]
        for label, (classes, tokens) in self.prompts.items():
            prompts = self._embed_texts(variables, tokens)
            for name in held_out:
                scores = metrics.zero_shot_accuracy(embedded[name]["v"], prompts,
                                                    self.sets[name][1][label][:self.counts[name]], classes)
                results |= {f"{name}/zero_shot/{label}/{k}": value for k, value in scores.items()}
        if "train" in embedded and held_out:
            rows = min(self.counts["train"], evaluation.probe_rows)
            for label in evaluation.probe_fields:
                # One fit per field on the training rows, scored on every held-out set.
                per_set = metrics.linear_probe_accuracy(
                    embedded["train"]["cls"][:rows], self.sets["train"][1][label][:rows],
                    {name: (embedded[name]["cls"], self.sets[name][1][label][:self.counts[name]]) for name in held_out},
                    steps=evaluation.probe_steps)
                for name, scores in per_set.items():
                    results |= {f"{name}/probe/{label}/{k}": value for k, value in scores.items()}
        return results


# ---------------------------------------------------------------------------
# Host data
# ---------------------------------------------------------------------------


def host_batch(raw: dict, tokenizer, reports, step: int, seed: int, with_augmented_view: bool) -> dict:
    """A training batch from the pipeline's (image, index) and the split's reports, or from fresh
    (image, report) pairs; the reports tokenised by ``tokenizer`` (a ``ReportTokenizer``).

    The momentum view is augmented with a generator seeded by (seed, step,
    process), so a resumed run sees the same views.
    """
    texts = list(raw["report"]) if "report" in raw else [reports[i] for i in raw["index"]]
    batch = {"image": raw["image"]} | tokenizer(texts)
    if with_augmented_view:
        rng = np.random.default_rng([seed, step, jax.process_index()])
        batch["image_aug"] = np.stack([pipeline.augment([image], rng)[0] for image in raw["image"]])
    return batch


def load_pairs(config, workdir: pathlib.Path, split: str, size: int) -> tuple | None:
    """(SplitArrays without masks, labels {field: [value]}) of a split's image-report pairs, from the corpus
    files when data.corpus.train is set (labels from the label fields the evaluations name), else from the
    LViT folders (no labels); None when the data has no such split."""
    if corpus.is_configured(config):
        loaded = corpus.load(config, split, size, threads=config.data.read_threads)
        if loaded is not None:
            info(loaded[2])
        return None if loaded is None else loaded[:2]
    root = datasets.data_root(config, workdir)
    if not folders.has_split(root, split):
        return None
    return folders.load_split(root, split, image_size=size, num_classes=config.data.num_classes, with_masks=False,
                              threads=config.data.read_threads), {}


def fresh_pairs(config) -> bool:
    """Whether pre-training draws new synthetic pairs every step (config.data.synthetic.fresh_pairs)."""
    return config.data.name == "synthetic" and bool(config.data.synthetic.fresh_pairs)


def capped_batch_size(requested: int, num_pairs: int, num_devices: int) -> int:
    """The requested batch, or the largest size <= num_pairs divisible by the devices when the split is smaller."""
    if num_pairs >= requested:
        return requested
    capped = (num_pairs // num_devices) * num_devices
    if capped < 2:
        raise ConfigError(f"{num_pairs} training pairs cannot fill a batch of at least 2 over {num_devices} device(s)")
    return capped


def say_if_no_held_out_split(config, sets: dict) -> None:
    """One info line when zero-shot or probe scores are asked for but ``sets`` (split -> pairs) holds no
    held-out split to score them on."""
    if (config.eval.zero_shot or config.eval.probe_fields) and not set(sets) - {"train"}:
        info("zero-shot and probe accuracy are scored on held-out splits only: none of config.eval.splits is one "
             "the data has")


# ---------------------------------------------------------------------------
# Training job
# ---------------------------------------------------------------------------


def train(config, workdir: str | pathlib.Path) -> dict:
    """Pre-trains on all training pairs; resumes from <workdir>/pretrain.

    Returns the summary also written to <workdir>/pretrain/summary.json:
    initial_retrieval, final_retrieval (``EncoderEvaluation`` before and after
    training), first_epoch_terms, final_terms (epoch means of the weighted
    total 'loss' and of every term), epochs, batch_size, pairs {split: N},
    seconds (training time summed over resumed runs).
    """
    pre = config.pretrain
    workdir = pathlib.Path(workdir)
    run_dir = workdir / "pretrain"
    run_dir.mkdir(parents=True, exist_ok=True)
    size = build.pretrain_image_size(config)
    tokenizer = ReportTokenizer(build.text_encoder_dir(config), pre.max_length)  # Its errors before the data's.
    resuming = checkpoint.has_step(run_dir / "checkpoints" / "latest")
    if pre.vit_weights and not resuming:  # Likewise a missing file, an uncached hub id, another pixel normalisation.
        with weights.field_errors("config.pretrain.vit_weights"):
            weights.check_pixel_normalisation(weights.vit_weights_file(pre.vit_weights), pre.vit_pixel_mean,
                                              pre.vit_pixel_std)
    corpus.check_files(config)
    # The held-out splits of config.eval.splits are scored for the logs only: nothing is chosen on them (the
    # newest checkpoint is kept); one left out (choosing settings on val) is neither read nor scored.
    held_out = [name for name in ("val", "test") if name in config.eval.splits]
    sets = {name: pairs for name in ("train", *held_out) if (pairs := load_pairs(config, workdir, name, size))}
    if "train" not in sets:
        raise ConfigError("pre-training needs training pairs: data.corpus.train or data.root's Train_Folder")
    say_if_no_held_out_split(config, sets)
    train_pairs = sets["train"][0]

    devices = math.prod(parallel.mesh_shape(config, jax.device_count()))  # The batch is split over data x fsdp.
    batch_size = capped_batch_size(pre.batch_size, pre.batch_size if fresh_pairs(config) else len(train_pairs), devices)
    if batch_size != pre.batch_size:
        info(f"only {len(train_pairs)} training pairs: batch size capped from {pre.batch_size} to {batch_size}")
    mesh = parallel.make_mesh(config, batch_size=batch_size, field="config.pretrain.batch_size")
    steps_per_epoch = max(1, math.ceil(len(train_pairs) / batch_size))
    pairs = (f"fresh synthetic pairs ({steps_per_epoch * batch_size} an epoch)" if fresh_pairs(config)
             else f"{len(train_pairs)} pairs")
    info(f"pre-training ({pre.objective}) on {pairs}, batch {batch_size}, "
          f"{steps_per_epoch} steps per epoch, {mesh.size} device(s)")

    model = build.build_model(config, build.text_encoder_config(config))
    state = initial_state(config, model, mesh, steps_per_epoch, resuming=resuming)
    evaluation = EncoderEvaluation(config, model, sets, tokenizer, mesh, batch_size)
    with_view = build.uses_momentum(config)

    def batches(start_step):
        if fresh_pairs(config):
            source = pipeline.fresh_synthetic_batches(
                config.data.synthetic.seed, config.data.image_size, size, batch_size, start_step=start_step,
                worker_count=config.data.worker_count,
            )
        else:
            source = pipeline.training_batches(
                train_pairs, batch_size, seed=config.seed, start_step=start_step,
                with_mask=False, augmentation=pre.augment, worker_count=config.data.worker_count,
            )
        for step, raw in enumerate(source, start_step):
            yield host_batch(raw, tokenizer, train_pairs.reports, step, config.seed, with_view)

    _, meta = loop.run(loop.Job(
        name="pretrain", workdir=run_dir, mesh=mesh, config=config, state=state,
        train_step=make_train_step(model, config), batches=batches, steps_per_epoch=steps_per_epoch,
        epochs=pre.epochs,
        # Retrieval, zero-shot and probes, before training (epoch 0) and after every epoch.
        evaluators=[loop.Evaluator(lambda state: evaluation(
            {"params": state.params, "batch_stats": state.batch_stats},
            ranks_path=run_dir / "ranks" / f"step_{int(state.step)}.json"),
            every_epochs=pre.eval_every_epochs, at_start=True)],
        best_metric=None,  # No selection criterion: the newest model is the one to keep.
        checkpoint_every_epochs=pre.checkpoint_every_epochs, log_every_steps=pre.log_every_steps,
        learning_rate=logged_rates(config, steps_per_epoch),
        # Every training pair is used; the segmentation's sections are read by a later stage (mode 'all') or none.
        unused_fields=("data.labeled_fraction", "data.split_seed", "data.num_classes", "train", "unet", "ssl"),
        batch_size=batch_size,
    ))
    terms = lambda means: {k: v for k, v in means.items() if k not in loop.TELEMETRY}  # noqa: E731
    summary = {
        "objective": pre.objective,
        "epochs": meta["epoch"],
        "batch_size": batch_size,
        "pairs": {name: len(split) for name, (split, _) in sets.items()},
        "seconds": meta["seconds"],
        "initial_retrieval": meta["initial_eval"],
        "final_retrieval": meta["last_eval"],
        "first_epoch_terms": terms(meta["first_epoch"]),
        "final_terms": terms(meta["last_epoch"]),
    }
    if jax.process_index() == 0:
        write_atomically(run_dir / "summary.json", json_text(summary, indent=2))
    return summary


def restore_encoders(config, model: AMVLM, source, mesh: Mesh) -> tuple[dict, dict, pathlib.Path]:
    """({'params', 'batch_stats'} of ``model`` from the pre-training checkpoint at ``source``, replicated on
    ``mesh``; its meta; the step folder used). Nothing is initialised: the target is abstract. A checkpoint
    of another job (its meta's 'job') is refused in one line."""
    abstract = jax.eval_shape(lambda: create_state(config, model, build.pretrain_image_size(config)))
    target = parallel.abstract_replicated(mesh, {"params": abstract.params, "batch_stats": abstract.batch_stats})
    return checkpoint.restore_variables(source, target, job="pretrain")


def evaluate_checkpoint(config, workdir, source) -> dict:
    """What a pre-training checkpoint learned (``EncoderEvaluation``: retrieval top-1/5/10 and MRR, zero-shot and
    linear-probe accuracy, fractions) on the image-report pairs of config.eval.splits; writes
    <workdir>/retrieval.json (and each retrieval query's rank to retrieval_ranks.json) and returns
    {split: {metric: value, 'pairs': N}} (None for a split the data lacks; N the split's pairs, of which the
    first config.eval.retrieval_pairs are scored). The probes are fitted on the
    training split. config.eval.initial: the encoders as the run started them (``initial_state`` from its
    recorded config and seed), as its epoch-0 evaluation scored them."""
    workdir = pathlib.Path(workdir)
    corpus.check_files(config)  # Before the checkpoint is restored and any split decoded.
    size = build.pretrain_image_size(config)
    model = build.build_model(config, build.text_encoder_config(config))
    mesh = parallel.make_mesh(config, batch_size=0)  # Its batches are padded to a multiple of the devices.
    batch_size = -(-max(1, config.train.eval_batch_size) // mesh.size) * mesh.size
    if config.eval.initial:  # The control: the state the run's first step started from.
        state = initial_state(config, model, mesh, steps_per_epoch=1)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        info(f"evaluating the encoders as the run of {source} started them (seed {config.seed}, not pre-trained)")
    else:
        variables, meta, used = restore_encoders(config, model, source, mesh)
        info(f"evaluating the encoders of {used} (pre-trained {meta.get('epoch')} epochs)")
    tokenizer = ReportTokenizer(build.text_encoder_dir(config), config.pretrain.max_length)
    wanted = ["train"] if config.eval.probe_fields or "train" in config.eval.splits else []
    wanted += [split for split in config.eval.splits if split != "train"]
    sets = {split: pairs for split in wanted if (pairs := load_pairs(config, workdir, split, size)) is not None}
    if not set(config.eval.splits) & set(sets):  # Else retrieval.json would be rewritten with nothing but nulls.
        raise ConfigError(f"config.eval.splits={','.join(config.eval.splits)}: the data has none of these splits; "
                          "nothing to evaluate")
    say_if_no_held_out_split(config, sets)
    scores = EncoderEvaluation(config, model, sets, tokenizer, mesh, batch_size)(
        variables, ranks_path=workdir / "retrieval_ranks.json")
    results = {split: None if split not in sets else
               {k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith(split + "/")} | {"pairs": len(sets[split][0])}
               for split in config.eval.splits}
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        write_atomically(workdir / "retrieval.json", json_text(results, indent=2) + "\n")
    for split, values in results.items():
        info(scores_line(split, values, config.eval.retrieval_pairs))
    return results


def scores_line(split: str, values: dict | None, retrieval_pairs: int) -> str:
    """One split's scores (percent) as ``evaluate_checkpoint`` prints them, with how many pairs were scored."""
    if values is None:
        return f"{split}: missing"
    shown = " ".join(f"{k} {100 * v:.1f}" for k, v in values.items() if k != "pairs" and not k.endswith("/rows"))
    scored = min(values["pairs"], retrieval_pairs)
    of = f"{scored}" if scored == values["pairs"] else f"the first {scored} of {values['pairs']}"
    return f"{split}: {shown} ({of} pairs, percent)"
