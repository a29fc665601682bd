"""Text mask generator, L_tg, pseudo-label fusion and the teacher EMA (SPEC 5, 6)."""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from amvlm_jax.losses.text_guided import (
    INITIAL_LOG_SCALE,
    ema_alpha,
    fuse_multiclass,
    fuse_pseudo_labels,
    text_guided_loss,
)
from amvlm_jax.ops import ema_update, l2_normalize
from amvlm_jax.models.text_mask import TextMaskDecoder, pamr, resize_bilinear_align_corners, text_masks


def pamr_reference(image, masks, iterations, dilations):
    """Loop-by-loop PAMR on numpy arrays (B, H, W, C) and (B, H, W, K)."""
    image = np.asarray(image, np.float64)
    masks = np.asarray(masks, np.float64)
    batch, height, width, _ = image.shape
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

    def clamp(i, j):
        return min(max(i, 0), height - 1), min(max(j, 0), width - 1)

    neighbour_positions = {}
    affinities = np.zeros((batch, height, width, 8 * len(dilations)))
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                positions = [clamp(i + dy * d, j + dx * d) for d in dilations for dy, dx in offsets]
                neighbour_positions[(i, j)] = positions
                stencil = [image[b, i, j]] * len(dilations) + [image[b, p, q] for p, q in positions]
                std = np.std(np.stack(stencil), axis=0, ddof=1)
                raw = [np.mean(-np.abs(image[b, i, j] - image[b, p, q]) / (1e-8 + 0.1 * std)) for p, q in positions]
                raw = np.array(raw)
                weights = np.exp(raw - raw.max())
                affinities[b, i, j] = weights / weights.sum()
    for _ in range(iterations):
        updated = np.zeros_like(masks)
        for b in range(batch):
            for i in range(height):
                for j in range(width):
                    for n, (p, q) in enumerate(neighbour_positions[(i, j)]):
                        updated[b, i, j] += affinities[b, i, j, n] * masks[b, p, q]
        masks = updated
    return masks


def resize_reference(x, out_h, out_w):
    """Aligned-corners bilinear resize of a numpy (H, W) array, pixel by pixel."""
    in_h, in_w = x.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            y = i * (in_h - 1) / (out_h - 1)
            z = j * (in_w - 1) / (out_w - 1)
            y0, z0 = int(math.floor(y)), int(math.floor(z))
            y1, z1 = min(y0 + 1, in_h - 1), min(z0 + 1, in_w - 1)
            fy, fz = y - y0, z - z0
            out[i, j] = (
                (1 - fy) * (1 - fz) * x[y0, z0] + (1 - fy) * fz * x[y0, z1] + fy * (1 - fz) * x[y1, z0] + fy * fz * x[y1, z1]
            )
    return out


def test_pamr_matches_loop_reference():
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(2, 9, 9, 3)).astype(np.float32)
    image[0, :, :4] = 0.2  # a flat region: std 0 in parts of the stencil
    masks = rng.uniform(size=(2, 9, 9, 2)).astype(np.float32)
    refined = pamr(jnp.asarray(image), jnp.asarray(masks), iterations=2, dilations=(1, 2))
    np.testing.assert_allclose(np.asarray(refined), pamr_reference(image, masks, 2, (1, 2)), rtol=1e-4, atol=1e-5)


def test_pamr_has_no_gradient_and_keeps_constants():
    image = jax.random.uniform(jax.random.PRNGKey(0), (1, 8, 8, 3))
    constant = jnp.full((1, 8, 8, 1), 0.3)
    np.testing.assert_allclose(np.asarray(pamr(image, constant, iterations=3, dilations=(1, 2))), 0.3, rtol=1e-6)
    grad = jax.grad(lambda m: jnp.sum(pamr(image, m, iterations=2, dilations=(1,))))(constant)
    assert np.all(np.asarray(grad) == 0)


def test_decoder_is_upsample_at_init_and_gate_changes_it():
    patch_map = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 8))
    decoder = TextMaskDecoder()
    params = decoder.init(jax.random.PRNGKey(2), patch_map)
    out = decoder.apply(params, patch_map)
    assert out.shape == (2, 16, 16, 8)
    expected = l2_normalize(jnp.repeat(jnp.repeat(patch_map, 4, axis=1), 4, axis=2), axis=-1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), 1.0, rtol=1e-5)

    gated = jax.tree_util.tree_map(lambda x: x, params)
    gated["params"]["block_1"]["gate"] = jnp.asarray(0.5)
    changed = decoder.apply(gated, patch_map)
    assert np.max(np.abs(np.asarray(changed) - np.asarray(out))) > 1e-3


def test_resize_align_corners_matches_reference():
    x = np.random.default_rng(1).uniform(size=(5, 7)).astype(np.float32)
    out = resize_bilinear_align_corners(jnp.asarray(x)[None, ..., None], (11, 4))[0, ..., 0]
    np.testing.assert_allclose(np.asarray(out), resize_reference(x, 11, 4), rtol=1e-5, atol=1e-6)
    for corner_in, corner_out in [((0, 0), (0, 0)), ((0, -1), (0, -1)), ((-1, 0), (-1, 0)), ((-1, -1), (-1, -1))]:
        assert float(out[corner_out]) == float(x[corner_in])


def _text_inputs():
    key_dense, key_reports, key_image = jax.random.split(jax.random.PRNGKey(3), 3)
    dense = l2_normalize(jax.random.normal(key_dense, (2, 4, 4, 8)), axis=-1)
    reports = l2_normalize(jax.random.normal(key_reports, (2, 8)), axis=-1)
    image = jax.random.uniform(key_image, (2, 16, 16, 3))
    return dense, reports, image


def test_text_masks_use_own_report():
    dense, reports, image = _text_inputs()
    out = text_masks(dense, reports, image, image_size=16, iterations=3, dilations=(1, 2))
    assert out["sim"].shape == (2, 2, 4, 4) and out["soft"].shape == (2, 2, 4, 4)
    assert out["p_text"].shape == (2, 16, 16)
    np.testing.assert_allclose(np.asarray(out["soft"]), np.asarray(jax.nn.sigmoid(out["sim"])), rtol=1e-6)
    p_text = np.asarray(out["p_text"])
    assert p_text.min() >= 0.0 and p_text.max() <= 1.0

    # The diagonal pair's mixed mask, computed here from its pieces.
    own_sim = jnp.einsum("bhwd,bd->bhw", dense, reports)
    small_image = resize_bilinear_align_corners(image, (4, 4))
    refined = pamr(small_image, jax.nn.sigmoid(own_sim)[..., None], iterations=3, dilations=(1, 2))[..., 0]
    mixed = 0.3 * jax.nn.sigmoid((own_sim - 0.25) * 10) + 0.7 * refined
    expected = resize_bilinear_align_corners(mixed[..., None], (16, 16))[..., 0]
    np.testing.assert_allclose(p_text, np.asarray(expected), rtol=1e-5, atol=1e-6)

    # Changing report 1 leaves image 0's mask alone and changes image 1's.
    other = reports.at[1].set(l2_normalize(jnp.arange(8.0) - 3.0))
    perturbed = np.asarray(text_masks(dense, other, image, image_size=16, iterations=3, dilations=(1, 2))["p_text"])
    np.testing.assert_array_equal(perturbed[0], p_text[0])
    assert np.max(np.abs(perturbed[1] - p_text[1])) > 1e-3


def test_text_guided_loss_hand_case_and_clamp():
    # Image 0: pixels (1, 0), (0, 1); image 1: pixels (0, 1), (1, 0). Reports e1, e2.
    dense = jnp.array([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 1.0], [1.0, 0.0]]]])  # (2, 1, 2, 2)
    soft = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 0.0]], [[1.0, 0.0]]]])  # (2, 2, 1, 2)
    reports = jnp.eye(2)
    # Pooled: e00 = e1, e01 = e2, e10 = e2, e11 = e2 -> logits = s [[1, 1], [0, 1]].
    # Row CEs: log 2, log(1 + e^-s); column CEs: log(1 + e^-s), log 2.
    for log_scale, s in [(0.0, 1.0), (math.log(2.0), 2.0)]:
        expected = 0.5 * (math.log(2.0) + math.log1p(math.exp(-s)))
        assert float(text_guided_loss(dense, soft, reports, log_scale)) == pytest.approx(expected, rel=1e-5)
    clamped = float(text_guided_loss(dense, soft, reports, math.log(1000.0)))
    assert clamped == pytest.approx(float(text_guided_loss(dense, soft, reports, math.log(100.0))), rel=1e-6)
    assert clamped == pytest.approx(0.5 * (math.log(2.0) + math.log1p(math.exp(-100.0))), rel=1e-5)
    assert float(jax.grad(lambda l: text_guided_loss(dense, soft, reports, l))(math.log(1000.0))) == 0.0
    assert INITIAL_LOG_SCALE == pytest.approx(math.log(1 / 0.07))


def _text_guided_reference(dense, soft, reports, scale):
    """SPEC 5's L_tg pair by pair: CE over reports n for each image b and over images b for each report n."""
    size = len(reports)
    logits = np.zeros((size, size))
    for b in range(size):
        for n in range(size):
            pooled = (soft[b, n][..., None] * dense[b]).sum((0, 1)) / soft[b, n].sum()
            logits[b, n] = pooled @ reports[n] / np.linalg.norm(pooled) * scale
    by_image = [np.logaddexp.reduce(logits[b]) - logits[b, b] for b in range(size)]
    by_report = [np.logaddexp.reduce(logits[:, n]) - logits[n, n] for n in range(size)]
    return 0.5 * (np.mean(by_image) + np.mean(by_report))


def test_text_guided_loss_clamps_a_learned_scale_above_100():
    """A log-scale learned past log(100) scores as s = 100. The hand case above cannot show it: its logits
    saturate (log1p(e^-100) and log1p(e^-1000) are both 0 in float32). Here some images' own reports are not
    their best match, so the loss grows with the scale."""
    rng = np.random.default_rng(11)
    dense = rng.normal(size=(3, 2, 2, 4))
    soft = rng.uniform(0.05, 1.0, size=(3, 3, 2, 2))
    reports = rng.normal(size=(3, 4))
    reports /= np.linalg.norm(reports, axis=-1, keepdims=True)
    inputs = [jnp.asarray(a, jnp.float32) for a in (dense, soft, reports)]
    assert _text_guided_reference(dense, soft, reports, 1000.0) > 2 * _text_guided_reference(dense, soft, reports, 100.0)
    for scale, used in ((3.0, 3.0), (100.0, 100.0), (1000.0, 100.0)):
        got = float(text_guided_loss(*inputs, math.log(scale)))
        assert got == pytest.approx(_text_guided_reference(dense, soft, reports, used), rel=1e-5), scale


def test_text_guided_loss_gradients_reach_decoder_and_scale():
    dense, reports, image = _text_inputs()
    patch_map = jax.random.normal(jax.random.PRNGKey(4), (2, 2, 2, 8))
    decoder = TextMaskDecoder()
    params = decoder.init(jax.random.PRNGKey(5), patch_map)
    # Non-zero gates so that the convolution weights receive gradient too.
    params["params"]["block_0"]["gate"] = jnp.asarray(0.3)
    params["params"]["block_1"]["gate"] = jnp.asarray(0.3)

    def loss_fn(trainable):
        dense_map = decoder.apply(trainable["decoder"], patch_map)
        out = text_masks(dense_map, reports, image, image_size=16, iterations=2, dilations=(1,))
        return text_guided_loss(dense_map, out["soft"], reports, trainable["log_scale"])

    trainable = {"decoder": params, "log_scale": jnp.asarray(INITIAL_LOG_SCALE)}
    grads = jax.grad(loss_fn)(trainable)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        leaf = np.asarray(leaf)
        assert np.all(np.isfinite(leaf)), path
        assert np.any(leaf != 0), path


def _logit(p):
    return math.log(p) - math.log1p(-p)


def test_fuse_pseudo_labels_formula_and_clipping():
    p_teacher = jnp.array([[[0.2, 0.9], [0.0, 1.0]]])
    p_text = jnp.array([[[0.7, 0.4], [0.5, 0.5]]])
    fused = np.asarray(fuse_pseudo_labels(p_teacher, p_text))
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert fused[0, 0, 0] == pytest.approx(sigmoid(_logit(0.2) + _logit(0.7)), rel=1e-5)
    assert fused[0, 0, 1] == pytest.approx(sigmoid(_logit(0.9) + _logit(0.4)), rel=1e-5)
    assert np.all(np.isfinite(fused))
    assert fused[0, 1, 0] == pytest.approx(1e-4, rel=1e-3) and fused[0, 1, 1] == pytest.approx(1 - 1e-4, rel=1e-6)
    half = np.asarray(fuse_pseudo_labels(p_teacher, p_text, w_text=0.5))
    assert half[0, 0, 0] == pytest.approx(sigmoid(_logit(0.2) + 0.5 * _logit(0.7)), rel=1e-5)
    teacher_only = np.asarray(fuse_pseudo_labels(p_teacher, p_text, w_text=0.0))
    np.testing.assert_allclose(teacher_only, np.clip(np.asarray(p_teacher), 1e-4, 1 - 1e-4), rtol=1e-5)
    grad = jax.grad(lambda p: jnp.sum(fuse_pseudo_labels(p, p_text)))(p_teacher)
    assert np.all(np.asarray(grad) == 0)
    # A certain teacher against a certain veto: equal clips cancel (0.5); a text clip of 1e-8 wins.
    certain, veto = jnp.ones((1, 1, 1)), jnp.zeros((1, 1, 1))
    assert float(fuse_pseudo_labels(certain, veto)[0, 0, 0]) == pytest.approx(0.5, abs=1e-4)
    won = float(fuse_pseudo_labels(certain, veto, text_eps=1e-8)[0, 0, 0])
    assert won == pytest.approx(sigmoid(_logit(1 - 1e-4) + _logit(1e-8)), rel=1e-3) and won < 2e-4
    # The teacher keeps its own clip, and the multi-class fusion passes the text clip on.
    assert float(fuse_pseudo_labels(veto, jnp.full((1, 1, 1), 0.5), text_eps=1e-8)[0, 0, 0]) == pytest.approx(1e-4, rel=1e-3)
    three = jnp.array([[[[0.0, 0.5, 0.5]]]])
    assert float(fuse_multiclass(three, veto, text_eps=1e-8)[0, 0, 0, 0]) == pytest.approx(1 - won, rel=1e-6)


def test_fuse_multiclass_sums_to_one_and_matches_binary():
    logits = jax.random.normal(jax.random.PRNGKey(6), (2, 4, 4, 3)) * 2
    p_teacher = jax.nn.softmax(logits, axis=-1)
    p_text = jax.random.uniform(jax.random.PRNGKey(7), (2, 4, 4))
    fused = np.asarray(fuse_multiclass(p_teacher, p_text))
    assert fused.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(fused.sum(-1), 1.0, rtol=1e-6)
    binary = np.asarray(fuse_pseudo_labels(1.0 - p_teacher[..., 0], p_text))
    np.testing.assert_allclose(fused[..., 1:].sum(-1), binary, rtol=1e-5)
    # Foreground classes keep the teacher's proportions.
    teacher = np.asarray(p_teacher)
    np.testing.assert_allclose(fused[..., 1] / fused[..., 2], teacher[..., 1] / teacher[..., 2], rtol=1e-4)
    # A teacher with no foreground mass still gives a valid distribution.
    certain = jnp.zeros((1, 1, 1, 3)).at[..., 0].set(1.0)
    edge = np.asarray(fuse_multiclass(certain, jnp.full((1, 1, 1), 0.9)))
    assert np.all(np.isfinite(edge)) and edge.sum() == pytest.approx(1.0, rel=1e-6)
    assert edge[0, 0, 0, 1] == pytest.approx(edge[0, 0, 0, 2])
    # No gradient reaches either input (SPEC 6), also through the teacher's foreground shares. One class's
    # sum: the sum over all classes is 1 whatever the inputs, so its gradient would be 0 anyway.
    grads = jax.grad(lambda p, q: jnp.sum(fuse_multiclass(p, q)[..., 1]), argnums=(0, 1))(p_teacher, p_text)
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_ema_schedule_and_update():
    alphas = [float(ema_alpha(t)) for t in (0, 1, 2, 3, 98, 99, 500)]
    expected = [0.0, 0.5, 2 / 3, 0.75, 1 - 1 / 99, 0.99, 0.99]  # the cap binds from t = 99
    np.testing.assert_allclose(alphas, expected, rtol=1e-6)
    assert float(ema_alpha(50)) == pytest.approx(1 - 1 / 51, rel=1e-6)
    # A lower cap (config.ssl.ema_max_alpha) binds earlier: 0.9 from t = 9.
    capped = [float(ema_alpha(t, 0.9)) for t in (3, 8, 9, 500)]
    np.testing.assert_allclose(capped, [0.75, 1 - 1 / 9, 0.9, 0.9], rtol=1e-6)

    student = {"params": {"w": jnp.array([1.0, 2.0])}, "batch_stats": {"mean": jnp.array([4.0])}}
    teacher = {"params": {"w": jnp.array([3.0, 0.0])}, "batch_stats": {"mean": jnp.array([0.0])}}
    updated = ema_update(student, teacher, 0.75)
    np.testing.assert_allclose(np.asarray(updated["params"]["w"]), [0.75 * 3 + 0.25 * 1, 0.25 * 2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updated["batch_stats"]["mean"]), [1.0], rtol=1e-6)
    copied = ema_update(student, teacher, ema_alpha(0))
    np.testing.assert_array_equal(np.asarray(copied["params"]["w"]), [1.0, 2.0])


@pytest.mark.parametrize("shows_patches", [True, False])
def test_word_attention_head_learns_where_the_words_point(shows_patches):
    """Hand-made features: every image has two blobs (V channel 0) in two of the 9 cells of a 6x6 patch grid,
    the report's one word names the lesion's cell (a one-hot), the target marks the lesion's patches. Fitted
    on 40 images, the head ranks the named blob above the other on 20 held-out ones; the same head fitted
    with the words withheld (zeros) cannot tell them apart. Without its patch term ('report') the head has
    no parameter that reads V and its logits do not change with the patch map."""
    from amvlm_jax.models.text_mask import WordAttentionMaskHead
    from amvlm_jax.train.ssl import fit_mask_head

    rng = np.random.default_rng(0)

    def make(count):
        patch_maps = 0.1 * rng.standard_normal((count, 6, 6, 8)).astype(np.float32)
        words = 0.1 * rng.standard_normal((count, 3, 12)).astype(np.float32)
        lesion, other = np.zeros((count, 6, 6), bool), np.zeros((count, 6, 6), bool)
        for b in range(count):
            named, unnamed = rng.choice(9, 2, replace=False)
            for cell, target in ((named, lesion), (unnamed, other)):
                row, col = divmod(int(cell), 3)
                target[b, 2 * row:2 * row + 2, 2 * col:2 * col + 2] = True
            words[b, 0, named] += 1.0
        patch_maps[..., 0] += (lesion | other)
        word_mask = np.tile(np.array([[1.0, 1.0, 0.0]], np.float32), (count, 1))
        return (patch_maps, words, word_mask), lesion, other

    train_inputs, train_lesion, _ = make(40)
    test_inputs, test_lesion, test_other = make(20)
    targets = np.repeat(np.repeat(train_lesion, 4, 1), 4, 2).astype(np.float32)  # 24x24 target masks
    head = WordAttentionMaskHead(hidden=32, shows_patches=shows_patches)

    def held_out_auroc(withhold: bool) -> float:
        def inputs(xs):
            return (xs[0], np.zeros_like(xs[1]) if withhold else xs[1], xs[2])

        params = head.init(jax.random.PRNGKey(0), *inputs(train_inputs))["params"]
        params, _ = fit_mask_head(head, params, inputs(train_inputs), targets, steps=300, lr=3e-3, batch_size=8, seed=0)
        logits = np.asarray(head.apply({"params": params}, *inputs(test_inputs)))
        shuffled = np.asarray(head.apply({"params": params}, test_inputs[0][::-1], *inputs(test_inputs)[1:]))
        assert np.allclose(shuffled, logits) != shows_patches
        assert ("patch_hidden" in params) == shows_patches
        named, unnamed = logits[test_lesion], logits[test_other]
        return float(np.mean(named[:, None] > unnamed[None, :]) + 0.5 * np.mean(named[:, None] == unnamed[None, :]))

    assert held_out_auroc(withhold=False) > 0.9
    assert 0.3 < held_out_auroc(withhold=True) < 0.7


def test_decoder_blocks_are_gated_pre_activation_residual_convolutions_by_hand():
    """SPEC 5's block, pixel by pixel in numpy: u = nearest x2 upsample of x, then u + tanh(g) * Conv3x3(ReLU(u))
    (zero padding, bias), for each of the two blocks with gates 0.7 and -1.3, then L2 normalisation over channels.
    The inputs take both signs so that the ReLU matters, and the gates are far enough from 0 that tanh(g) is not g."""
    rng = np.random.default_rng(4)
    patch_map = rng.normal(size=(1, 3, 3, 4)).astype(np.float32)
    decoder = TextMaskDecoder()
    params = jax.device_get(decoder.init(jax.random.PRNGKey(5), jnp.asarray(patch_map)))["params"]
    params["block_0"]["gate"], params["block_1"]["gate"] = np.float32(0.7), np.float32(-1.3)
    out = np.asarray(decoder.apply({"params": params}, jnp.asarray(patch_map)))

    x = patch_map[0].astype(np.float64)
    for name in ("block_0", "block_1"):
        x = x.repeat(2, axis=0).repeat(2, axis=1)
        kernel, bias = (np.asarray(params[name]["conv"][k], np.float64) for k in ("kernel", "bias"))
        padded = np.pad(np.maximum(x, 0), ((1, 1), (1, 1), (0, 0)))
        conv = bias + sum(padded[dy:dy + x.shape[0], dx:dx + x.shape[1]] @ kernel[dy, dx]
                          for dy in range(3) for dx in range(3))
        x = x + np.tanh(float(params[name]["gate"])) * conv
    expected = x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-6)


def test_word_attention_head_by_hand_with_padding_words():
    """WordAttentionMaskHead in numpy from its docstring: patch term relu(V W1 + b1) w2 + b2; each grid position's
    learned queries attend, one softmax per head scaled by 1/sqrt(head_dim), over the real words' keys (padding
    words left out), read their values, and relu(read W3 + b3) w4 + b4 turns that into the pointing term; the
    logit is their sum. Padding words carry large values here, so letting them in would show."""
    from amvlm_jax.models.text_mask import WordAttentionMaskHead

    rng = np.random.default_rng(6)
    patch_map = rng.normal(size=(2, 2, 3, 5)).astype(np.float32)
    words = rng.normal(size=(2, 4, 6)).astype(np.float32)
    word_mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], np.float32)
    words[word_mask == 0] *= 20.0
    head = WordAttentionMaskHead(hidden=8, heads=2, head_dim=3)
    params = jax.device_get(head.init(jax.random.PRNGKey(7), patch_map, words, word_mask))["params"]
    logits = np.asarray(head.apply({"params": params}, patch_map, words, word_mask))

    def dense(x, name):
        return x @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"], np.float64)

    shown = dense(np.maximum(dense(patch_map.astype(np.float64), "patch_hidden"), 0), "patch_logit")[..., 0]
    queries = np.asarray(params["queries"], np.float64)  # (positions, heads, head_dim)
    expected = np.zeros((2, 2, 3))
    for b in range(2):
        real = word_mask[b] == 1
        keys = dense(words[b].astype(np.float64), "keys").reshape(4, 2, 3)[real]
        values = dense(words[b].astype(np.float64), "values").reshape(4, 2, 3)[real]
        for position in range(6):
            read = []
            for h in range(2):
                scores = keys[:, h] @ queries[position, h] / np.sqrt(3)
                weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
                read.append(weights @ values[:, h])
            pointed = dense(np.maximum(dense(np.concatenate(read), "word_hidden"), 0), "word_logit")[0]
            expected[b, position // 3, position % 3] = shown[b, position // 3, position % 3] + pointed
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_l2_normalize_and_ema_update_by_hand():
    """l2_normalize: unit vectors along the given axis, exact for tiny norms (only a norm below eps = 1e-12 is
    held at eps), zero stays zero with a finite gradient; the gradient of sum(x / |x|) at (3, 4) is
    (1/5 - 7 * 3/125, 1/5 - 7 * 4/125). ema_update passes no gradient to the online values."""
    x = jnp.array([[3.0, 0.0], [4.0, 5.0]])
    np.testing.assert_allclose(l2_normalize(x, axis=0), [[0.6, 0.0], [0.8, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(l2_normalize(x), [[1.0, 0.0], [0.8 / np.sqrt(1.64), 1.0 / np.sqrt(1.64)]], rtol=1e-6)
    np.testing.assert_allclose(l2_normalize(jnp.array([3e-8, 4e-8])), [0.6, 0.8], rtol=1e-5)
    np.testing.assert_array_equal(l2_normalize(jnp.zeros(3)), 0.0)
    assert np.all(np.isfinite(jax.grad(lambda v: l2_normalize(v).sum())(jnp.zeros(3))))
    np.testing.assert_allclose(jax.grad(lambda v: l2_normalize(v).sum())(jnp.array([3.0, 4.0])), [0.032, -0.024],
                               atol=1e-6)
    grad = jax.grad(lambda online: ema_update({"w": online}, {"w": jnp.ones(2)}, 0.9)["w"].sum())(jnp.ones(2))
    np.testing.assert_array_equal(grad, 0.0)
