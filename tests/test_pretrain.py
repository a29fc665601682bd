"""Vision-language pre-training: model outputs, objective wiring, step equivalence, EMA, train/resume."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from amvlm_jax.config import ConfigError
from amvlm_jax.data import pipeline
from amvlm_jax.data.folders import SplitArrays
from amvlm_jax.data.tokenize import ReportTokenizer
from amvlm_jax.losses.alignment import local_alignment_loss
from amvlm_jax.losses.contrastive import clipped_token_weights, css_loss, cta_loss, ita_loss
from amvlm_jax.losses.intra import icl_loss
from amvlm_jax.losses.prototypes import cpa_loss
from amvlm_jax.models.amvlm import AMVLM
from amvlm_jax.models.bert import Bert, aggregate_words
from amvlm_jax.models.heads import GlobalHead, LocalHead
from amvlm_jax.models.pdt import PDTHead
from amvlm_jax.ops import BATCH_NORM_MOMENTUM
from amvlm_jax import metrics
from amvlm_jax.losses import objectives
from amvlm_jax.train import build, parallel, pretrain
from amvlm_jax.train.parallel import replicate
from amvlm_jax.train.state import PretrainState

from conftest import PRETRAIN_BATCH as BATCH, PRETRAIN_IMAGE_SIZE as IMAGE_SIZE, SAMPLE_REPORTS as REPORTS, tiny_pretrain_config



@pytest.fixture(scope="module")
def tokens():
    config = tiny_pretrain_config()
    return ReportTokenizer(build.text_encoder_dir(config), config.pretrain.max_length)(REPORTS)


def _images(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def _batch(tokens, seed=0):
    images = _images(seed)
    rng = np.random.default_rng(seed + 100)
    augmented = np.stack([pipeline.augment([image], rng)[0] for image in images])
    return {"image": images, "image_aug": augmented, **tokens}


def _setup(config):
    text_config, _ = build.build_text_encoder(config)
    model = build.build_model(config, text_config)
    return model, pretrain.create_state(config, model, IMAGE_SIZE)


@pytest.fixture(scope="module")
def amvlm_setup():
    config = tiny_pretrain_config()
    return (config, *_setup(config))


TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "word_index", "word_mask")


def _forward(model, state, batch, train=True, with_statistics=False):
    """Jitted online forward pass -> (outputs, token arrays); ((outputs, {'batch_stats': moved}), token
    arrays) ``with_statistics``."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = batch["image"].astype(np.float32) / 255.0
    token_arrays = {k: batch[k] for k in TOKEN_KEYS}

    @jax.jit
    def forward(variables, images, token_arrays):
        applied = model.apply(variables, images, token_arrays, train=train, rngs={"dropout": jax.random.PRNGKey(3)},
                              mutable=["batch_stats"])
        return applied if with_statistics else applied[0]

    return forward(variables, images, token_arrays), token_arrays


@pytest.fixture(scope="module")
def amvlm_forward(amvlm_setup, tokens):
    """step -> online outputs (train mode) and momentum-encoder outputs of one batch (``_batch(tokens)``), in one
    compiled call, with the dropout keys the train step draws at that step (``make_train_step``'s docstring);
    ``with_statistics``: also the online heads' BatchNorm statistics as the pass moved them."""
    config, model, state = amvlm_setup
    batch = _batch(tokens)
    token_arrays = {k: batch[k] for k in TOKEN_KEYS}

    @jax.jit
    def forward(variables, momentum_variables, images, augmented, token_arrays, online_key, image_key, text_key):
        outputs, moved = model.apply(variables, images, token_arrays, train=True, rngs={"dropout": online_key},
                                     mutable=["batch_stats"])
        image_view, _ = model.apply(momentum_variables, augmented, train=True, method=AMVLM.encode_image,
                                    rngs={"dropout": image_key}, mutable=["batch_stats"])
        report_view, _ = model.apply(momentum_variables, token_arrays, train=True, method=AMVLM.encode_text,
                                     rngs={"dropout": text_key}, mutable=["batch_stats"])
        return outputs, image_view | report_view, moved["batch_stats"]

    def at_step(step, with_statistics=False):
        online_key, momentum_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), step))
        image_key, text_key = jax.random.split(momentum_key)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        outputs, views, moved = forward(variables, state.momentum, batch["image"] / 255.0, batch["image_aug"] / 255.0,
                                        token_arrays, online_key, image_key, text_key)
        return (outputs, views, moved) if with_statistics else (outputs, views)

    return at_step


@pytest.fixture(scope="module")
def amvlm_outputs(amvlm_forward):
    """``amvlm_forward`` at step 0."""
    return amvlm_forward(0)


def test_model_outputs_shapes_and_padding_words_are_zero(amvlm_setup, amvlm_outputs, tokens):
    config, model, state = amvlm_setup
    outputs, _ = amvlm_outputs
    D, P, W = 16, (IMAGE_SIZE // 16) ** 2, config.pretrain.max_length - 1
    assert outputs["v"].shape == (BATCH, D) and outputs["t"].shape == (BATCH, D)
    assert outputs["V"].shape == (BATCH, P, D) and outputs["T"].shape == (BATCH, W, D)
    assert outputs["patch_attention"].shape == (BATCH, P) and outputs["word_attention"].shape == (BATCH, W)
    assert outputs["word_context"].shape == (BATCH, W, D) and outputs["patch_context"].shape == (BATCH, P, D)
    assert outputs["word_pdt"].token_mu.shape == (BATCH, W, D) and outputs["patch_pdt"].context_logsigma.shape == (BATCH, P, D)
    mask = np.asarray(tokens["word_mask"]).astype(bool)
    assert mask.sum(1).min() < W, "some report must have padding words"
    norms = np.linalg.norm(np.asarray(outputs["T"]), axis=-1)
    np.testing.assert_array_equal(norms[~mask], 0.0)
    np.testing.assert_allclose(norms[mask], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(outputs["word_attention"])[~mask], 0.0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(outputs["v"]), axis=-1), 1.0, rtol=1e-5)
    # SPEC 3.2 at pretrain.temperature, in float64: each word attends over the patches (unit-norm context),
    # each patch over the real words (unnormalised).
    T, V, tau = np.asarray(outputs["T"], np.float64), np.asarray(outputs["V"], np.float64), config.pretrain.temperature

    def softmax(logits, real):
        e = np.exp(logits - logits.max(-1, keepdims=True)) * real
        return e / e.sum(-1, keepdims=True)

    words = softmax(T @ V.transpose(0, 2, 1) / tau, 1.0) @ V
    patches = softmax(V @ T.transpose(0, 2, 1) / tau, mask[:, None, :]) @ T
    np.testing.assert_allclose(outputs["word_context"], words / np.linalg.norm(words, axis=-1, keepdims=True), atol=2e-5)
    np.testing.assert_allclose(outputs["patch_context"], patches, atol=2e-5)
    assert set(state.params) >= {"pdt_word", "pdt_word_ctx", "pdt_patch", "pdt_patch_ctx"}
    assert "prototypes" not in state.params


def test_amvlm_objective_equals_the_loss_functions(amvlm_setup, amvlm_outputs):
    config, model, state = amvlm_setup
    outputs, momentum = amvlm_outputs
    loss, terms = objectives.amvlm_objective(outputs, momentum, config)

    o, tau = outputs, 0.07
    word_weights = clipped_token_weights(o["word_attention"], o["word_mask"])
    patch_weights = clipped_token_weights(o["patch_attention"], np.ones(o["patch_attention"].shape))
    expected = {
        "ita": ita_loss(o["v"], o["t"], tau),
        "css": css_loss(o["T"], o["word_context"], o["V"], o["patch_context"], word_weights, patch_weights,
                        o["word_mask"], tau, o["word_pdt"], o["patch_pdt"]),
        "local": local_alignment_loss(o["V"], o["t"], o["T"], o["v"], o["word_mask"], tau),
        "icl": 0.5 * (icl_loss(o["v"], momentum["v"], momentum["V"], None, tau)
                      + icl_loss(o["t"], momentum["t"], momentum["T"], momentum["word_mask"], tau)),
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(float(value), rel=1e-6), name
        assert np.isfinite(float(value)) and float(value) > 0
    weights = {"ita": 1.0, "css": 0.5, "local": 0.1, "icl": 0.1}
    assert float(loss) == pytest.approx(sum(weights[k] * float(v) for k, v in expected.items()), rel=1e-6)

    # A zero weight removes its term; use_pdt=False is CSS without the constraint.
    off = tiny_pretrain_config(**{"pretrain.weights.css": 0.0, "pretrain.weights.icl": 0.0})
    loss_off, terms_off = objectives.amvlm_objective(outputs, None, off)
    assert set(terms_off) == {"ita", "local"}
    assert float(loss_off) == pytest.approx(float(expected["ita"]) + 0.1 * float(expected["local"]), rel=1e-6)
    no_pdt = tiny_pretrain_config(**{"pretrain.use_pdt": False})
    _, terms_no_pdt = objectives.amvlm_objective(outputs, momentum, no_pdt)
    plain = css_loss(o["T"], o["word_context"], o["V"], o["patch_context"], word_weights, patch_weights, o["word_mask"], tau)
    assert float(terms_no_pdt["css"]) == pytest.approx(float(plain), rel=1e-6)
    assert float(plain) != pytest.approx(float(expected["css"]), rel=1e-4)


def test_eight_device_step_equals_one_device_step_and_momentum_follows_ema(amvlm_setup, tokens):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    config, model, initial = amvlm_setup
    initial = jax.device_get(initial)  # Host copies: the step donates its input state.
    step = pretrain.make_train_step(model, config)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(config, devices, batch_size=BATCH)
        # Plain SGD: Adam's first steps are lr * sign(gradient), which turns
        # rounding noise in near-zero gradients into full-size steps.
        state = replicate(mesh, PretrainState.create(initial.params, initial.batch_stats, optax.sgd(0.1), momentum=initial.momentum))
        losses = []
        for seed in range(2):
            previous_ema = jax.device_get(state.momentum)
            state, metrics = step(state, pipeline.to_global(mesh, _batch(tokens, seed)))
            losses.append(float(metrics["loss"]))
        assert all(np.isfinite(float(v)) for v in jax.device_get(metrics).values())
        results.append((jax.device_get(state), losses, previous_ema))
    (state1, losses1, _), (state8, losses8, previous_ema8) = results
    np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    # Gradients are finite and reach every module (SGD: params moved by -lr * grad).
    for name, before in initial.params.items():
        moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), before, state8.params[name])
        assert all(np.isfinite(x) for x in jax.tree.leaves(moved)), name
        assert max(jax.tree.leaves(moved)) > 0, f"{name} received no gradient"

    # Momentum encoders: m <- 0.995 m + 0.005 online, on params and BatchNorm statistics.
    assert set(state8.momentum["params"]) == set(build.encoder_subset(state8.params))
    for part in ("params", "batch_stats"):
        online = build.encoder_subset(getattr(state8, part))
        expected = jax.tree.map(lambda m, o: 0.995 * m + 0.005 * o, previous_ema8[part], online)
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state8.momentum[part])):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(state8.step) == 2


def test_locked_text_encoder_keeps_its_weights_and_has_no_optimizer_state(amvlm_setup, amvlm_forward, amvlm_outputs,
                                                                          tokens):
    config, model, initial = amvlm_setup
    locked = tiny_pretrain_config(**{"pretrain.train_text_encoder": False})
    initial = jax.device_get(initial)
    batch = _batch(tokens)
    states = {}
    steps = {name: pretrain.make_train_step(model, cfg) for name, cfg in (("trained", config), ("locked", locked))}
    fresh = lambda cfg: PretrainState.create(initial.params, initial.batch_stats,  # noqa: E731
                                             pretrain.pretrain_optimizer(cfg, initial.params), momentum=initial.momentum)
    for name, cfg in (("trained", config), ("locked", locked)):
        states[name] = steps[name](fresh(cfg), batch)
    (trained, trained_metrics), (after, after_metrics) = states["trained"], states["locked"]
    # The step's terms are the objective of the online and momentum outputs of its first step (amvlm_outputs:
    # its dropout keys, the momentum encoders in training mode on the augmented view, SPEC 3.4).
    _, expected = objectives.amvlm_objective(*amvlm_outputs, config)
    for term, value in expected.items():
        assert float(trained_metrics[term]) == pytest.approx(float(value), rel=1e-5), term
    # The online heads' running BatchNorm statistics are the ones the step's forward pass moved.
    moved = amvlm_forward(0, with_statistics=True)[2]
    assert jax.tree.structure(jax.device_get(trained.batch_stats)) == jax.tree.structure(moved)
    for got, want in zip(jax.tree.leaves(jax.device_get(trained.batch_stats)), jax.tree.leaves(moved)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert any(np.abs(np.asarray(w) - np.asarray(b)).max() > 1e-4
               for w, b in zip(jax.tree.leaves(moved), jax.tree.leaves(initial.batch_stats)))
    # The same state and batch at step 5 draw step 5's dropout keys (the text encoders' dropout shows them), as a
    # run resumed there does.
    _, at_five = steps["trained"](fresh(config).replace(step=jnp.asarray(5, jnp.int32)), batch)
    _, expected_five = objectives.amvlm_objective(*amvlm_forward(5), config)
    for term, value in expected_five.items():
        assert float(at_five[term]) == pytest.approx(float(value), rel=1e-5), term
    assert float(at_five["loss"]) != pytest.approx(float(trained_metrics["loss"]), rel=1e-4)
    # The same forward pass: locking changes which parameters move, not the loss.
    np.testing.assert_allclose(float(after_metrics["loss"]), float(trained_metrics["loss"]), rtol=1e-6)
    def moved(before, after):  # The largest change of any value.
        return max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                   for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(after))))

    for name, before in initial.params.items():
        if name == "text_encoder":
            assert moved(before, after.params[name]) == 0.0
            assert moved(before, trained.params[name]) > 0
        else:
            assert moved(before, after.params[name]) > 0, f"{name} did not move"
    # No Adam moments for the locked encoder: the optimiser state is smaller by its parameter count, twice.
    size = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))  # noqa: E731
    assert size(trained.opt_state) - size(after.opt_state) == 2 * size(initial.params["text_encoder"])


def test_create_state_puts_loaded_weights_in_place_and_the_momentum_encoders_copy_them(amvlm_setup):
    """Loaded text and ViT weights replace the random ones; the momentum encoders (SPEC 3.4: the image and text
    encoders with their heads, nothing else) start as copies of the online ones, loaded weights included."""
    config, model, random_state = amvlm_setup
    rng = np.random.default_rng(7)
    loaded = {name: jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), random_state.params[name])
              for name in ("text_encoder", "image_encoder")}
    state = jax.device_get(pretrain.create_state(config, model, IMAGE_SIZE, loaded["text_encoder"],
                                                 loaded["image_encoder"]))
    for name, tree in loaded.items():
        for got, want in zip(jax.tree.leaves(state.params[name]), jax.tree.leaves(tree)):
            np.testing.assert_array_equal(got, want)
    encoders = {"image_encoder", "image_global_head", "image_local_head", "text_encoder", "text_global_head",
                "text_local_head"}
    assert set(state.momentum["params"]) == encoders and set(state.momentum["batch_stats"]) == encoders - {
        "image_encoder", "text_encoder"}
    for part in ("params", "batch_stats"):
        online = {name: getattr(state, part)[name] for name in state.momentum[part]}
        assert jax.tree.structure(state.momentum[part]) == jax.tree.structure(online)
        for got, want in zip(jax.tree.leaves(state.momentum[part]), jax.tree.leaves(online)):
            np.testing.assert_array_equal(got, want)


def test_mgca_objective_and_prototype_freezing(tokens):
    config = tiny_pretrain_config(**{"pretrain.objective": "mgca"})
    model, state = _setup(config)
    assert "prototypes" in state.params and "pdt_word" not in state.params
    assert state.momentum is None
    batch = _batch(tokens)
    (outputs, updated), _ = _forward(model, state, batch, with_statistics=True)
    assert outputs["image_prototype_scores"].shape == (BATCH, 10)
    loss, terms = objectives.mgca_objective(outputs, None, config)
    o = outputs
    # Each modality's prototype scores are its own embedding against the bias-free layer's columns.
    kernel = np.asarray(jax.device_get(state.params["prototypes"]["kernel"]))
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-6)  # Unit prototypes from the start.
    for scores, embedding in (("image_prototype_scores", "v"), ("text_prototype_scores", "t")):
        np.testing.assert_allclose(np.asarray(o[scores]), np.asarray(o[embedding]) @ kernel, atol=1e-6, err_msg=scores)
    # MGCA's padding words (SPEC 4): the head's output for a zero feature, normalised with the batch's
    # statistics (recovered from the running averages this step moved), re-computed in numpy.
    params = jax.device_get(state.params["text_local_head"]["projection"])
    old, new = (jax.device_get(stats["text_local_head"]["projection"]) for stats in (state.batch_stats, updated["batch_stats"]))

    rows = o["T_unmasked"].shape[0] * o["T_unmasked"].shape[1]  # Statistics over every word slot.

    def batch_norm(x, name, scale=1.0, shift=0.0):
        mean, var = ((new[name][k] - BATCH_NORM_MOMENTUM * old[name][k]) / (1 - BATCH_NORM_MOMENTUM) for k in ("mean", "var"))
        var = var * (rows - 1) / rows  # The running variance averages the unbiased one; the batch's is biased.
        return (x - mean) / np.sqrt(var + 1e-5) * scale + shift

    hidden = np.maximum(batch_norm(params["dense_hidden"]["bias"], "norm_hidden", params["norm_hidden"]["scale"],
                                   params["norm_hidden"]["bias"]), 0)
    padding = batch_norm(hidden @ params["dense_out"]["kernel"] + params["dense_out"]["bias"], "norm_out")
    mask = np.asarray(o["word_mask"]).astype(bool)
    assert (~mask).sum() > 0
    np.testing.assert_allclose(np.asarray(o["T_unmasked"])[~mask], np.broadcast_to(padding / np.linalg.norm(padding),
                                                                                   ((~mask).sum(), padding.size)), atol=2e-4)
    np.testing.assert_array_equal(np.asarray(o["T_unmasked"])[mask], np.asarray(o["T"])[mask])
    word_weights = clipped_token_weights(o["word_attention"], o["word_mask"])
    patch_weights = clipped_token_weights(o["patch_attention"], np.ones(o["patch_attention"].shape))
    expected = {
        "ita": ita_loss(o["v"], o["t"], 0.07, reduce="sum"),
        "cta": cta_loss(o["T_unmasked"], o["V"], word_weights, patch_weights, o["word_mask"], 0.1),
        "cpa": cpa_loss(o["image_prototype_scores"], o["text_prototype_scores"], 0.05, 3, 0.2),
    }
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(float(value), rel=1e-6), name
    zeroed = cta_loss(o["T"], o["V"], word_weights, patch_weights, o["word_mask"], 0.1)
    assert abs(float(zeroed) - float(expected["cta"])) > 1e-3  # Zeroed padding would be another loss.
    # SPEC 4: MGCA's released run weighs the three terms 1 / 1 / 1.
    assert float(loss) == pytest.approx(float(expected["ita"] + expected["cta"] + expected["cpa"]), rel=1e-6)

    # One step per epoch: the prototypes stay put during epoch 1, then move and stay unit-norm.
    mesh = parallel.make_mesh(config, batch_size=BATCH)
    step = pretrain.make_train_step(model, config)
    state = replicate(mesh, state)
    kernels = [np.asarray(jax.device_get(state.params["prototypes"]["kernel"]))]
    for seed in range(2):
        state, metrics = step(state, pipeline.to_global(mesh, _batch(tokens, seed)))
        assert np.isfinite(float(metrics["cpa"]))
        kernels.append(np.asarray(jax.device_get(state.params["prototypes"]["kernel"])))
    np.testing.assert_allclose(kernels[1], kernels[0], atol=1e-7)
    assert np.abs(kernels[2] - kernels[1]).max() > 1e-6
    np.testing.assert_allclose(np.linalg.norm(kernels[2], axis=0), 1.0, rtol=1e-5)


def _torch_mgca_run(params, grads, freeze_steps, schedule):
    """torch's AdamW on the same parameters and gradients; prototypes' gradient None while frozen."""
    import torch

    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    optimizer = torch.optim.AdamW(tensors.values(), lr=1.0, betas=(0.9, 0.999), weight_decay=0.05)
    lr_lambda = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule[step])
    for step, grad in enumerate(grads):
        for name, tensor in tensors.items():
            tensor.grad = None if (name == "prototypes" and step < freeze_steps) else torch.tensor(grad[name])
        optimizer.step()
        lr_lambda.step()
    return {name: tensor.detach().numpy() for name, tensor in tensors.items()}


def test_mgca_optimizer_is_torch_adamw_with_warmup_cosine_and_frozen_prototypes():
    """SPEC 4: AdamW(wd 0.05), 40% linear warm-up from 1e-8 then cosine to 1e-8; the frozen prototypes
    get no update and no optimiser state (torch skips parameters whose gradient is None)."""
    from amvlm_jax.experiment import COMMON_VARIANTS

    config = tiny_pretrain_config(**{"pretrain.epochs": 5})
    COMMON_VARIANTS["mgca"](config)
    assert (config.pretrain.mgca.ita, config.pretrain.mgca.cta, config.pretrain.mgca.cpa) == (1.0, 1.0, 1.0)

    def by_hand(peak, warmup, total):
        """Linear from 1e-8 to peak over ``warmup`` steps, then a half cosine to 1e-8 at step ``total``."""
        return [1e-8 + (peak - 1e-8) * (t / warmup if t < warmup else 0.5 * (1 + np.cos(np.pi * (t - warmup) / (total - warmup))))
                for t in range(total + 1)]

    steps_per_epoch, lr = 2, config.pretrain.lr
    total = config.pretrain.epochs * steps_per_epoch  # 10 steps: 4 of warm-up.
    schedule = by_hand(lr, 4, total)  # Step 10, after the last, at 1e-8: the cosine's end.
    rate = pretrain.learning_rate(config, lr, steps_per_epoch)
    np.testing.assert_allclose([float(rate(t)) for t in range(total + 1)], schedule, rtol=1e-5, atol=1e-11)
    # Logged as train/lr; with pretrain.image_lr also train/image_lr, the same schedule at its own peak.
    assert set(pretrain.logged_rates(config, steps_per_epoch)(0)) == {"lr"}
    config.pretrain.image_lr = 4 * lr
    logged = [pretrain.logged_rates(config, steps_per_epoch)(t) for t in range(total + 1)]
    np.testing.assert_allclose([r["lr"] for r in logged], schedule, rtol=1e-5, atol=1e-11)
    np.testing.assert_allclose([r["image_lr"] for r in logged], by_hand(4 * lr, 4, total), rtol=1e-5, atol=1e-11)
    # image_lr equal to lr is no rate of its own: nothing more is logged.
    config.pretrain.image_lr = lr
    assert set(pretrain.logged_rates(config, steps_per_epoch)(0)) == {"lr"}
    config.pretrain.image_lr = 0.0
    # MGCA's warm-up is int(0.4 * steps) steps: 3 epochs of 3 steps warm up over int(3.6) = 3 steps.
    config.pretrain.epochs = 3
    np.testing.assert_allclose([float(pretrain.learning_rate(config, lr, 3)(t)) for t in range(10)], by_hand(lr, 3, 9),
                               rtol=1e-5, atol=1e-11)
    # The optimiser against torch at a peak rate far above MGCA's 2e-5: moved by ~lr a step, the parameters
    # show the weight decay (lr * 0.05 * p a step) and beta2 well above float32's rounding.
    config.pretrain.epochs = 5
    config.pretrain.lr = lr = 1e-2
    schedule = by_hand(lr, 4, total)

    rng = np.random.default_rng(0)
    params = {"text_encoder": rng.normal(size=(3, 4)).astype(np.float32),
              "prototypes": rng.normal(size=(4, 5)).astype(np.float32)}
    grads = [{name: rng.normal(size=value.shape).astype(np.float32) for name, value in params.items()}
             for _ in range(6)]
    tx = pretrain.pretrain_optimizer(config, {name: {"kernel": v} for name, v in params.items()}, steps_per_epoch)
    ours = {name: {"kernel": jax.numpy.asarray(v)} for name, v in params.items()}
    opt_state = tx.init(ours)
    update = jax.jit(tx.update)
    for step, grad in enumerate(grads):
        before = ours["prototypes"]["kernel"]
        updates, opt_state = update({n: {"kernel": jax.numpy.asarray(g)} for n, g in grad.items()}, opt_state, ours)
        ours = optax.apply_updates(ours, updates)
        if step < steps_per_epoch:  # Frozen: untouched, and Adam's moments still empty.
            np.testing.assert_array_equal(ours["prototypes"]["kernel"], before)
            moments = [leaf for leaf in jax.tree.leaves(opt_state) if getattr(leaf, "shape", ()) == (4, 5)]
            assert moments and all(not np.any(m) for m in moments)
    expected = _torch_mgca_run(params, grads, steps_per_epoch, schedule)
    # Compared as displacements from the start, which the weight decay changes by ~1%.
    for name in params:
        np.testing.assert_allclose(np.asarray(ours[name]["kernel"]) - params[name], expected[name] - params[name],
                                   rtol=1e-4, atol=1e-7, err_msg=name)


def _retrieval(v, t, ks, groups=None) -> dict:
    """The retrieval scores of pairs (row i of v and t), as EncoderEvaluation takes them."""
    return metrics.retrieval_scores(metrics.retrieval_ranks(v, t, groups), ks)


def test_retrieval_metrics():
    v = np.eye(4)
    t = np.eye(4)[[0, 1, 3, 2]]
    retrieval = _retrieval(v, t, ks=(1, 2))
    assert retrieval["i2t_top1"] == 0.5 and retrieval["t2i_top1"] == 0.5
    # Pairs 2 and 3 share their report: swapping their texts loses nothing once they are one group.
    grouped = _retrieval(v, t, ks=(1, 2), groups=np.array([0, 1, 2, 2]))
    assert grouped == {"i2t_top1": 1.0, "t2i_top1": 1.0, "i2t_top2": 1.0, "t2i_top2": 1.0, "i2t_mrr": 1.0,
                       "t2i_mrr": 1.0}
    # Hand-computed ranks with a repeated report: pairs 0 and 1 have the same text (rows 0 and 1 of t
    # point different ways, as two encodings of one text may not, but the groups decide what is right).
    v = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    t = np.array([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0]])
    # Scores v @ t.T: image 0 [0, .1, 1], image 1 [1, .9, 0], image 2 [.8, .78, .6].
    # i2t ranks the two distinct reports: image 0's best in-group text scores .1 < 1 (report 7): rank 1;
    # image 1: rank 0; image 2 (report 7): .6 against report 5's best .8: rank 1. t2i, one query per
    # distinct report: report 5 (its first row, text 0) best image 1.0 vs image 2's .8: rank 0; report 7
    # (text 2): image 2 scores .6 against image 0's 1: rank 1.
    grouped = _retrieval(v, t, ks=(1, 2), groups=np.array([5, 5, 7]))
    assert grouped["i2t_top1"] == 1 / 3 and grouped["i2t_top2"] == 1.0
    assert grouped["t2i_top1"] == 1 / 2 and grouped["t2i_top2"] == 1.0
    ranks = metrics.retrieval_ranks(v, t, groups=np.array([5, 5, 7]))
    assert {k: r.tolist() for k, r in ranks.items()} == {"i2t": [1, 0, 1], "t2i": [0, 1], "t2i_rows": [0, 2]}
    # Mean reciprocal rank: (1/2 + 1 + 1/2) / 3 and (1 + 1/2) / 2.
    assert grouped["i2t_mrr"] == pytest.approx(2 / 3) and grouped["t2i_mrr"] == 0.75
    # The queries keep row order whatever the group labels: report 7 first in sorted order, still second.
    ranks = metrics.retrieval_ranks(v, t, groups=np.array([9, 9, 2]))
    assert {k: r.tolist() for k, r in ranks.items()} == {"i2t": [1, 0, 1], "t2i": [0, 1], "t2i_rows": [0, 2]}
    ungrouped = _retrieval(v, t, ks=(1,))
    # Alone, image 0 ranks text 0 third (rank 2), image 1 ranks text 1 second (rank 1); text 0's own image
    # 0 scores 0, below images 1 and 2 (rank 2); text 1's image 1 scores .9 (rank 0).
    assert ungrouped["i2t_top1"] == 0.0 and ungrouped["t2i_top1"] == 1 / 3
    # A report repeated for three images is one report-to-image query: its text [.2, 1] scores image 3
    # (report 1's) 1 and its own images .2: rank 1; report 1's text [0, 1.5] finds image 3: rank 0. Counted
    # per row the miss would weigh three times (1 / 4); per distinct report it is 1 / 2, whatever the group
    # labels. (Image 3 scores its own report 1.5 against 1: no tie.)
    v = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]])
    t = np.array([[0.2, 1.0]] * 3 + [[0.0, 1.5]])
    for labels in ([0, 0, 0, 1], [1, 1, 1, 0]):
        once = _retrieval(v, t, ks=(1,), groups=np.array(labels))
        assert once == {"i2t_top1": 1.0, "t2i_top1": 0.5, "i2t_mrr": 1.0, "t2i_mrr": 0.75}
    # A wrong report repeated for three images fills one slot of an image's list, not three: image 3 scores
    # report 0 (pairs 0-2) .9, its own report .8 and report 4 .1: rank 1 among distinct reports.
    v = np.array([[1.0, 0.0, 0.0]] * 3 + [[0.9, 0.8, 0.1], [0.0, 0.0, 1.0]])
    t = np.array([[1.0, 0.0, 0.0]] * 3 + [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    repeated = _retrieval(v, t, ks=(1, 2), groups=np.array([0, 0, 0, 3, 4]))
    assert repeated["i2t_top1"] == 4 / 5 and repeated["i2t_top2"] == 1.0
    # Ties count against the right answer. Reports 0 and 1 differ but embed the same (two captions cut to
    # the same first max_length tokens); images 1 and 2 embed the same. Scores v @ t.T: image 0 [1, 1, 0],
    # image 1 [0, 0, 1], image 2 [0, 0, 1]. i2t: image 0's report ties with report 1 (rank 1); image 1's
    # scores 0, tied by report 0 and beaten by report 2 (rank 2); image 2 finds its own first (rank 0).
    # t2i: report 0's image scores 1 against 0 and 0 (rank 0); report 1's image 1 scores 0, beaten by image
    # 0 and tied by image 2 (rank 2); report 2's image 2 is tied by image 1 (rank 1). Ties in the right
    # answer's favour would give [0, 1, 0] both ways.
    v = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    t = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ranks = metrics.retrieval_ranks(v, t)
    assert ranks["i2t"].tolist() == [1, 2, 0] and ranks["t2i"].tolist() == [0, 2, 1]
    # Random scores: top-k over G distinct reports is right k / G of the time.
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, 400)
    chance = _retrieval(rng.normal(size=(400, 64)), rng.normal(size=(400, 64))[groups], ks=(10,), groups=groups)
    assert abs(chance["i2t_top10"] - 10 / len(np.unique(groups))) < 0.05
    assert pretrain.capped_batch_size(32, 24, 8) == 24 and pretrain.capped_batch_size(32, 30, 8) == 24
    assert pretrain.capped_batch_size(8, 16, 8) == 8


def test_reports_cut_to_the_same_tokens_are_counted_as_one_input():
    """What EncoderEvaluation reports when max_length merges distinct reports (their embeddings then tie)."""
    reports = ["left lung nodule in the upper lobe", "left lung nodule in the lower lobe", "right kidney cyst",
               "right kidney cyst"]
    groups = np.unique(np.asarray(reports), return_inverse=True)[1]
    directory = build.text_encoder_dir(tiny_pretrain_config())
    # [CLS] left lung nodule [SEP]: the first two reports are one input at 5 tokens, two at 16.
    assert pretrain.distinct_report_inputs(groups, ReportTokenizer(directory, 5)(reports)["input_ids"]) == (3, 2)
    assert pretrain.distinct_report_inputs(groups, ReportTokenizer(directory, 16)(reports)["input_ids"]) == (3, 3)


def test_train_learns_logs_retrieval_and_resumes(tmp_path):
    config = tiny_pretrain_config()
    summary = pretrain.train(config, tmp_path)
    run_dir = tmp_path / "pretrain"
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["epochs"] == 3 and summary["batch_size"] == BATCH
    assert summary["final_terms"]["loss"] < summary["first_epoch_terms"]["loss"]
    assert set(summary["final_terms"]) == {"loss", "ita", "css", "local", "icl"}
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [line for line in lines if "epoch" in line]
    assert [line["epoch"] for line in epochs] == [0, 1, 2, 3]
    for line in epochs:
        for split in ("train", "val"):
            for key in ("i2t_top1", "i2t_top5", "t2i_top1", "t2i_top5"):
                assert 0.0 <= line[f"{split}/{key}"] <= 1.0
    assert all(f"train/{k}" in lines[1] for k in ("loss", "ita", "css", "local", "icl"))
    assert summary["initial_retrieval"] == {k: v for k, v in epochs[0].items() if "/" in k}
    assert summary["final_retrieval"] == {k: epochs[-1][k] for k in summary["initial_retrieval"]}  # Its scores after the last epoch.
    # ranks/step_<N>.json: every query's rank at each evaluation, named by the global step (before training: 0),
    # and the logged scores of that evaluation are read off them (top-1: the share of rank 0).
    steps_per_epoch = -(-summary["pairs"]["train"] // BATCH)
    assert sorted(p.name for p in (run_dir / "ranks").iterdir()) == sorted(f"step_{e * steps_per_epoch}.json"
                                                                         for e in range(4))
    for line in epochs:
        ranks = json.loads((run_dir / "ranks" / f"step_{int(line['epoch']) * steps_per_epoch}.json").read_text())
        assert set(ranks) == set(summary["pairs"]) == {"train", "val", "test"}
        for split, by_direction in ranks.items():
            assert len(by_direction["i2t"]) == summary["pairs"][split]
            for direction in ("i2t", "t2i"):
                assert line[f"{split}/{direction}_top1"] == pytest.approx(np.mean(np.asarray(by_direction[direction]) == 0))
                assert line[f"{split}/{direction}_mrr"] == pytest.approx(np.mean(1 / (np.asarray(by_direction[direction]) + 1)))

    # A second call restores the finished run and trains no further epoch.
    again = pretrain.train(config, tmp_path)
    lines_after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines_after) == len(lines)
    assert again["final_terms"] == summary["final_terms"] and again["seconds"] == summary["seconds"]


def test_host_batch_reads_the_indexed_reports_and_draws_the_momentum_view_per_step():
    """A batch's reports are those of its rows' indices; the momentum encoders' view of a step is drawn again
    the same for that step (a resumed run sees the views it would have), and differs from step to step."""
    config = tiny_pretrain_config()
    tokenizer = ReportTokenizer(build.text_encoder_dir(config), config.pretrain.max_length)
    order = [3, 0, 2, 1, 7, 5, 6, 4]
    raw = {"image": _images(), "index": np.array(order)}
    at = lambda step, seed=0: pretrain.host_batch(raw, tokenizer, REPORTS, step, seed, True)  # noqa: E731
    batch = at(4)
    for key, value in tokenizer([REPORTS[i] for i in order]).items():
        np.testing.assert_array_equal(batch[key], value, err_msg=key)
    np.testing.assert_array_equal(batch["image"], raw["image"])
    assert batch["image_aug"].shape == raw["image"].shape and batch["image_aug"].dtype == np.uint8
    np.testing.assert_array_equal(at(4)["image_aug"], batch["image_aug"])
    for other in (at(5), at(4, seed=1)):
        assert np.abs(other["image_aug"].astype(int) - batch["image_aug"]).max() > 0
    assert "image_aug" not in pretrain.host_batch(raw, tokenizer, REPORTS, 4, 0, False)


def test_fresh_pairs_pretraining_reads_new_pairs_every_step(tmp_path, monkeypatch):
    config = tiny_pretrain_config(**{"data.synthetic.fresh_pairs": True, "pretrain.epochs": 1})
    config.data.synthetic.num_train = 2 * BATCH  # Two steps an epoch; the folder holds 2 * BATCH pairs.
    seen = []
    original = pretrain.host_batch

    def recording(raw, tokens, *args, **kwargs):
        seen.append(list(raw["report"]))
        return original(raw, tokens, *args, **kwargs)

    monkeypatch.setattr(pretrain, "host_batch", recording)
    summary = pretrain.train(config, tmp_path)
    assert np.isfinite(summary["final_terms"]["loss"]) and len(seen) == 2
    from amvlm_jax.data import synthetic

    # Step s reads generator samples s * B ... s * B + B - 1; the batch is not capped by the folder size.
    expected = [synthetic.render_sample(config.data.synthetic.seed, "train", i, config.data.image_size).report
                for i in range(2 * BATCH)]
    assert seen[0] + seen[1] == expected
    with pytest.raises(Exception, match="fresh_pairs needs data.name='synthetic'"):
        from amvlm_jax.config import validate

        other = tiny_pretrain_config(**{"data.synthetic.fresh_pairs": True})
        other.data.name = "monuseg"
        validate(other)


def test_each_pdt_head_reads_its_own_tokens(amvlm_setup, amvlm_outputs):
    """SPEC 3.2: (mu_w, s_w) = PDT_word(T), (mu_o, s_o) = PDT_word_ctx(O), and the patch side's PDT_patch(V),
    PDT_patch_ctx(O_p) (deviation 5: its own head): each head applied alone, with the model's parameters, to the
    tokens it should read gives the model's outputs (the tiny config has no PDT dropout)."""
    config, model, state = amvlm_setup
    o, _ = amvlm_outputs
    head = PDTHead(dim=model.embed_dim, num_heads=model.pdt_heads, dropout=model.pdt_dropout)
    patch_mask = np.ones(o["V"].shape[:2], np.float32)
    for side, token_head, tokens, context_head, contexts, mask in (
            ("word_pdt", "pdt_word", o["T"], "pdt_word_ctx", o["word_context"], o["word_mask"]),
            ("patch_pdt", "pdt_patch", o["V"], "pdt_patch_ctx", o["patch_context"], patch_mask)):
        expected = (*head.apply({"params": state.params[token_head]}, tokens, mask, True),
                    *head.apply({"params": state.params[context_head]}, contexts, mask, True))
        for field, value in zip(o[side]._fields, expected):
            np.testing.assert_allclose(np.asarray(getattr(o[side], field)), np.asarray(value), atol=1e-5,
                                       err_msg=f"{side}.{field}")


def test_embeddings_are_the_heads_of_the_encoders_features(amvlm_setup, tokens):
    """SPEC 2 in evaluation mode, module by module: v = global head of the ViT's CLS feature, V = local head of
    its patch features, t = global head of BERT's [CLS] hidden state, T = local head of the aggregated words with
    padding slots zeroed, and the CLS attention of the ViT (patches) and of BERT (summed into words)."""
    config, model, state = amvlm_setup
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = _images() / 255.0
    token_arrays = {k: tokens[k] for k in TOKEN_KEYS}
    image_out = model.apply(variables, images, train=False, method=AMVLM.encode_image)
    text_out = model.apply(variables, token_arrays, train=False, method=AMVLM.encode_text)

    def head(kind, name, x):
        module = kind(hidden=model.head_hidden, out=model.embed_dim)
        return np.asarray(module.apply({"params": state.params[name], "batch_stats": state.batch_stats[name]}, x, train=False))

    features = model.image_encoder.apply({"params": state.params["image_encoder"]}, images)
    bert = Bert(model.text_config).apply({"params": state.params["text_encoder"]}, tokens["input_ids"],
                                         tokens["attention_mask"], tokens["token_type_ids"])
    word_mask = np.asarray(tokens["word_mask"])
    words, word_attention = aggregate_words(bert["hidden"], bert["cls_attention"], tokens["word_index"], word_mask.shape[1])
    expected = {"cls": np.asarray(features["cls"]), "v": head(GlobalHead, "image_global_head", features["cls"]),
                "V": head(LocalHead, "image_local_head", features["patches"]),
                "patch_attention": np.asarray(features["cls_attention"]),
                "t": head(GlobalHead, "text_global_head", bert["hidden"][:, 0]),
                "T": head(LocalHead, "text_local_head", words) * word_mask[..., None],
                "word_attention": np.asarray(word_attention) * word_mask}
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray((image_out | text_out)[name]), value, atol=1e-5, err_msg=name)


def _stand_in_encoders(tokenizer):
    """Encoders read off the inputs: images (B, S, S, 3) -> (v: pixel (0, 1) at unit norm, [CLS] features: pixel
    (0, 0) / 255); tokens -> t: ([has 'left', has 'right', 0.1]) at unit norm."""
    left, right = (tokenizer([word])["input_ids"][0, 1] for word in ("left", "right"))

    def encode_images(variables, images):
        x = images.astype(jnp.float32) / 255.0
        return x[:, 0, 1] / jnp.linalg.norm(x[:, 0, 1], axis=-1, keepdims=True), x[:, 0, 0]

    def encode_texts(variables, tokens):
        ids = tokens["input_ids"]
        t = jnp.stack([(ids == left).any(1), (ids == right).any(1), jnp.full(ids.shape[:1], True)], -1) * 1.0
        return t * jnp.asarray([1.0, 1.0, 0.1]) / jnp.linalg.norm(t * jnp.asarray([1.0, 1.0, 0.1]), axis=-1, keepdims=True)

    return encode_images, encode_texts


def test_encoder_evaluation_scores_the_slices_and_features_its_docstring_names(monkeypatch):
    """EncoderEvaluation with stand-in encoders whose outputs are read off the pixels and tokens: retrieval on
    each set's first eval.retrieval_pairs pairs; zero-shot on the held-out set's v against the prompts' t with
    its own labels; the probe fitted on the [CLS] features of the first eval.probe_rows training rows. The
    data make each slip visible: held-out v points at the right prompt (zero-shot 1.0), the probe rows' [CLS]
    separate the classes (probe 1.0), the training rows after them carry the classes swapped and outnumber
    them, the training v are all alike, and the training labels run in another order than the held-out ones."""
    size = 16
    config = tiny_pretrain_config(**{"eval.retrieval_pairs": 12, "eval.probe_rows": 4, "eval.probe_fields": ("kind",),
                                     "eval.probe_steps": 20, "eval.zero_shot": {"kind": {"A": "left", "B": "right"}}})
    tokenizer = ReportTokenizer(build.text_encoder_dir(config), config.pretrain.max_length)
    encode_images, encode_texts = _stand_in_encoders(tokenizer)
    monkeypatch.setattr(pretrain, "make_encoders", lambda model: (encode_images, encode_texts))

    def split(labels, cls_labels, v_labels):
        images = np.zeros((len(labels), size, size, 3), np.uint8)
        images[:, 0, 0] = [(200, 40, 90) if c == "A" else (40, 200, 90) for c in cls_labels]
        images[:, 0, 1] = [(255, 0, 0) if c == "A" else (0, 255, 0) if c == "B" else (90, 90, 90) for c in v_labels]
        reports = [f"{'left' if c == 'A' else 'right'} finding {i}" for i, c in enumerate(labels)]
        return SplitArrays([str(i) for i in range(len(labels))], images, None, reports), {"kind": list(labels)}

    train_labels = list("ABAB") + list("AABBBBAA")
    swapped = [{"A": "B", "B": "A"}[c] for c in train_labels[4:]]
    val_labels = list("BBAABA")
    sets = {"train": split(train_labels, train_labels[:4] + swapped, "A" * 12),
            "val": split(val_labels, val_labels, val_labels)}
    mesh = parallel.make_mesh(config, batch_size=8)
    evaluation = pretrain.EncoderEvaluation(config, None, sets, tokenizer, mesh, batch_size=8)
    results = evaluation({})

    embedded = {}
    for name, (arrays, _) in sets.items():
        v, cls = (np.asarray(a) for a in encode_images(None, jnp.asarray(arrays.images)))
        embedded[name] = v, cls, np.asarray(encode_texts(None, tokenizer(arrays.reports)))
    prompts = np.asarray(encode_texts(None, tokenizer(["left", "right"])))
    expected = {}
    for name, (v, _, t) in embedded.items():
        groups = np.unique(sets[name][0].reports, return_inverse=True)[1]
        expected |= {f"{name}/{k}": value for k, value in metrics.retrieval_scores(metrics.retrieval_ranks(v, t, groups)).items()}
    zero_shot = metrics.zero_shot_accuracy(embedded["val"][0], prompts, val_labels, ["A", "B"])
    expected |= {f"val/zero_shot/kind/{k}": value for k, value in zero_shot.items()}
    probe = metrics.linear_probe_accuracy(embedded["train"][1][:4], train_labels[:4],
                                          {"val": (embedded["val"][1], val_labels)}, steps=20)["val"]
    expected |= {f"val/probe/kind/{k}": value for k, value in probe.items()}
    assert zero_shot["accuracy"] == 1.0 and probe["accuracy"] == 1.0 and probe["rows"] == 6
    assert results.keys() == expected.keys()
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-6), key


def test_encoder_evaluation_by_hand_on_fewer_retrieval_pairs_than_probe_rows_and_repeated_reports(monkeypatch, tmp_path):
    """eval.retrieval_pairs 3 < eval.probe_rows 6, a held-out set longer than 3 rows, repeated reports, and a probe
    field other than the zero-shot one; every number worked out by hand. Stand-in encoders (``_stand_in_encoders``):
    v points at class A (red) or B (green) or is grey; [CLS] features encode the probed field 'site' (x or y) in
    colours that zero-shot would read as the other class; t says 'left' (A) or 'right' (B), so equal reports embed
    alike."""
    config = tiny_pretrain_config(**{"eval.retrieval_pairs": 3, "eval.probe_rows": 6, "eval.probe_fields": ("site",),
                                     "eval.probe_steps": 20, "eval.zero_shot": {"kind": {"A": "left", "B": "right"}}})
    tokenizer = ReportTokenizer(build.text_encoder_dir(config), config.pretrain.max_length)
    monkeypatch.setattr(pretrain, "make_encoders", lambda model: _stand_in_encoders(tokenizer))

    def split(v, site, kind, reports):
        images = np.zeros((len(v), 8, 8, 3), np.uint8)
        images[:, 0, 1] = [{"A": (255, 0, 0), "B": (0, 255, 0), "-": (90, 90, 90)}[c] for c in v]
        images[:, 0, 0] = [{"x": (40, 200, 90), "y": (200, 40, 90)}[c] for c in site]
        return SplitArrays([str(i) for i in range(len(v))], images, None, reports), {"kind": list(kind), "site": list(site)}

    sets = {"train": split("BAA-----", "xxxyyyxy", "AAAAAAAA", ["left finding", "right finding", "left finding",
                                                                 *(f"left finding {i}" for i in range(3, 8))]),
            "val": split("AABBA", "yxxyx", "AABBA", ["left finding", "left finding", "right finding", "right finding 3",
                                                     "left finding 4"])}
    results = pretrain.EncoderEvaluation(config, None, sets, tokenizer, parallel.make_mesh(config, batch_size=8), 8)(
        {}, ranks_path=tmp_path / "ranks.json")
    # Train, pairs 0-2 (reports left, right, left: rows 0 and 2 one report). Scores are 1/|t| where v and t agree,
    # else 0. i2t: image 0 (B) finds its report 'left' at 0, 'right' above it: rank 1; image 1 (A, 'right') the
    # same; image 2 (A, 'left'): rank 0. t2i, one query per report: 'left' (best image 2) is tied by image 1:
    # rank 1; 'right' (image 1 scores 0) is beaten by image 0 and tied by image 2: rank 2.
    # Val, pairs 0-2 (v A, A, B; reports left, left, right): every query first. Rows 3 and 4 are no pair.
    ranks = {"train": {"i2t": [1, 1, 0], "t2i": [1, 2], "t2i_rows": [0, 1]},
             "val": {"i2t": [0, 0, 0], "t2i": [0, 0], "t2i_rows": [0, 2]}}
    assert json.loads((tmp_path / "ranks.json").read_text()) == ranks
    expected = {"train/i2t_top1": 1 / 3, "train/t2i_top1": 0.0, "train/i2t_mrr": 2 / 3, "train/t2i_mrr": 5 / 12,
                "val/i2t_top1": 1.0, "val/t2i_top1": 1.0, "val/i2t_mrr": 1.0, "val/t2i_mrr": 1.0}
    expected |= {f"{name}/{direction}_top{k}": 1.0 for name in ("train", "val") for direction in ("i2t", "t2i")
                 for k in (5, 10)}
    # Zero-shot on val's 3 pairs from v: A, A, B, as labelled ([CLS] would answer A, B, B). The probe fitted on the
    # [CLS] of train rows 0-5 (sites x, x, x, y, y, y; rows 0-2 alone hold one class and fit nothing; the kind
    # field holds one), scored on val's 3 pairs (y, x, x).
    expected |= {"val/zero_shot/kind/accuracy": 1.0, "val/zero_shot/kind/majority": 2 / 3, "val/zero_shot/kind/rows": 3,
                 "val/probe/site/accuracy": 1.0, "val/probe/site/majority": 2 / 3, "val/probe/site/rows": 3}
    assert results == pytest.approx(expected)
    # A held-out set with no labelled row is not refused (its zero-shot scores no row); one whose labels are all
    # of unprompted classes is, naming those classes (an unlabelled row is no class).
    for kind, says in (("", None), ("C", "(values: C)")):
        sets["val"][1]["kind"] = ["", kind, "", "A", "B"]
        if says is None:
            pretrain.EncoderEvaluation(config, None, sets, tokenizer, None, 8)
        else:
            with pytest.raises(ConfigError, match=rf"^config.eval.zero_shot\['kind'\]: none of its classes \(A, B\) "
                                                  rf"is a value of 'kind' in val {re.escape(says)}$"):
                pretrain.EncoderEvaluation(config, None, sets, tokenizer, None, 8)


def test_image_lr_moves_the_image_encoder_and_its_heads_and_pretrain_lr_the_rest():
    """pretrain.image_lr is the rate of the image encoder and its two heads, pretrain.lr of every other module
    (text encoder and heads, PDT heads). Adam's first step by hand is -rate * g / (|g| + eps) (its moments'
    bias corrections cancel), so each module's first update names the rate it was given; four steps match torch's
    Adam with the two rates as parameter groups."""
    config = tiny_pretrain_config(**{"pretrain.image_lr": 4e-3})
    lr, image_lr, eps = config.pretrain.lr, 4e-3, 1e-8
    names = ("image_encoder", "image_global_head", "image_local_head", "text_encoder", "text_global_head",
             "text_local_head", "pdt_word", "pdt_patch_ctx")
    rng = np.random.default_rng(3)
    params = {name: {"kernel": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)} for name in names}
    grads = {name: {"kernel": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)} for name in names}
    tx = pretrain.pretrain_optimizer(config, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in names:
        rate = image_lr if name.startswith("image_") else lr
        g = np.asarray(grads[name]["kernel"], np.float64)
        np.testing.assert_allclose(updates[name]["kernel"], -rate * g / (np.abs(g) + eps), rtol=1e-5, err_msg=name)
    # Three more steps against torch's Adam with the same two parameter groups (its betas (0.9, 0.999), no decay):
    # the later steps depend on the moments, which the first does not.
    import torch

    tensors = {name: torch.tensor(np.asarray(params[name]["kernel"]), requires_grad=True) for name in names}
    reference = torch.optim.Adam([{"params": [tensors[n] for n in names if n.startswith("image_")], "lr": image_lr},
                                  {"params": [tensors[n] for n in names if not n.startswith("image_")], "lr": lr}])
    state, ours = tx.init(params), params
    for step in range(4):
        grads = {name: {"kernel": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)} for name in names}
        updates, state = tx.update(grads, state, ours)
        ours = optax.apply_updates(ours, updates)
        for name in names:
            tensors[name].grad = torch.tensor(np.asarray(grads[name]["kernel"]))
        reference.step()
    for name in names:
        np.testing.assert_allclose(np.asarray(ours[name]["kernel"]) - np.asarray(params[name]["kernel"]),
                                   tensors[name].detach().numpy() - np.asarray(params[name]["kernel"]), rtol=1e-4,
                                   atol=1e-7, err_msg=name)


def test_printed_scores_say_how_many_pairs_were_scored():
    # A split larger than eval.retrieval_pairs is scored on its first pairs only: the line said "(10 pairs)".
    values = {"i2t_top1": 0.25, "zero_shot/Type": 0.5, "zero_shot/Type/rows": 8, "pairs": 10}
    assert pretrain.scores_line("test", values, 4) == "test: i2t_top1 25.0 zero_shot/Type 50.0 (the first 4 of 10 pairs, percent)"
    assert pretrain.scores_line("test", values, 10) == "test: i2t_top1 25.0 zero_shot/Type 50.0 (10 pairs, percent)"
    assert pretrain.scores_line("val", None, 10) == "val: missing"


def test_every_dropout_of_the_pdt_heads_is_on_in_training_and_off_in_evaluation(amvlm_setup, tokens):
    """SPEC 3.2's PDT dropout (attention probabilities, after the mu / logsigma projections, in each MLP) acts in
    training only: the model hands ``train`` down to all four heads. Traced abstractly (nothing compiled),
    recording each Dropout under a PDT head (its rate, pretrain.pdt_dropout, and whether it acts); the tiny
    config's rate 0 would hide them numerically."""
    import flax.linen as nn

    config, model, state = amvlm_setup
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    token_arrays = {k: tokens[k] for k in TOKEN_KEYS}
    images = np.zeros((BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    for train in (True, False):
        calls = []

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
                path = context.module.scope.path
                if path and path[0].startswith("pdt_"):
                    calls.append((path[0], context.module.rate,
                                  kwargs.get("deterministic", args[1] if len(args) > 1 else None)))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            jax.eval_shape(lambda v: model.clone(pdt_dropout=0.5).apply(
                v, images, token_arrays, train=train, rngs={"dropout": jax.random.PRNGKey(0)}, mutable=["batch_stats"]),
                variables)
        heads = {"pdt_word", "pdt_word_ctx", "pdt_patch", "pdt_patch_ctx"}
        # Per head: the attention probabilities, mu and logsigma after their projections, two per MLP.
        assert sorted(calls) == sorted((head, 0.5, not train) for head in heads for _ in range(7)), train
