"""Segmentation losses on small hand cases (SPEC section 6)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amvlm_jax.losses import segmentation as seg


def test_dice_loss_hand_case():
    probs = jnp.array([[[0.5, 1.0], [0.0, 0.0]]])
    targets = jnp.array([[[1.0, 1.0], [0.0, 0.0]]])
    # inter = 1.5, sum p^2 = 1.25, sum y^2 = 2.
    expected = 1 - (2 * 1.5 + 4e-5) / (1.25 + 2 + 4e-5)
    assert float(seg.dice_loss(probs, targets)) == pytest.approx(expected, rel=1e-6)


def test_dice_loss_with_soft_targets_squares_them():
    """A soft pseudo-label (SPEC 6) enters the denominator squared: sum y^2 = 0.25 + 0.0625 + 0.25 = 0.5625,
    not sum y = 1.25 (which binary targets cannot tell apart)."""
    probs = jnp.array([[[0.6, 0.2], [0.0, 1.0]]])
    targets = jnp.array([[[0.5, 0.25], [0.5, 0.0]]])
    # inter = 0.3 + 0.05 = 0.35, sum p^2 = 0.36 + 0.04 + 1 = 1.4.
    expected = 1 - (2 * 0.35 + 4e-5) / (1.4 + 0.5625 + 4e-5)
    assert float(seg.dice_loss(probs, targets)) == pytest.approx(expected, rel=1e-6)


def test_dice_loss_is_mean_over_images():
    probs = jnp.array([[[1.0, 0.0]], [[0.0, 0.0]]])
    targets = jnp.array([[[1.0, 0.0]], [[1.0, 0.0]]])
    first = 1 - (2 + 4e-5) / (2 + 4e-5)
    second = 1 - 4e-5 / (1 + 4e-5)
    assert float(seg.dice_loss(probs, targets)) == pytest.approx((first + second) / 2, rel=1e-6)


def test_weighted_bce_averages_positives_and_negatives_separately():
    logits = jnp.array([2.0, -1.0, 0.5, -3.0, 1.0])
    targets = jnp.array([1.0, 1.0, 0.0, 0.0, 0.0])

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    pos = (bce(2.0, 1) + bce(-1.0, 1)) / 2
    neg = (bce(0.5, 0) + bce(-3.0, 0) + bce(1.0, 0)) / 3
    assert float(seg.weighted_bce(logits, targets)) == pytest.approx(0.5 * pos + 0.5 * neg, rel=1e-6)


def test_weighted_bce_with_soft_targets_and_no_positives():
    logits = jnp.array([0.3, -0.2])
    targets = jnp.array([0.2, 0.0])  # Both count as negatives; the positive term is 0.
    per_pixel = [-(0.2 * math.log(1 / (1 + math.exp(-0.3)))) - 0.8 * math.log(1 - 1 / (1 + math.exp(-0.3))),
                 -math.log(1 - 1 / (1 + math.exp(0.2)))]
    assert float(seg.weighted_bce(logits, targets)) == pytest.approx(0.5 * sum(per_pixel) / 2, rel=1e-5)


def test_dice_bce_combines_halves():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 1))
    targets = (jax.random.uniform(jax.random.PRNGKey(1), (2, 4, 4)) > 0.5).astype(jnp.float32)
    expected = 0.5 * seg.dice_loss(jax.nn.sigmoid(logits[..., 0]), targets) + 0.5 * seg.weighted_bce(logits[..., 0], targets)
    assert float(seg.segmentation_loss(logits, targets)) == pytest.approx(float(expected), rel=1e-6)


def test_dice_ce_hand_case():
    # One image, two pixels, three classes.
    logits = jnp.log(jnp.array([[[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]]))
    masks = jnp.array([[[0, 2]]])
    targets = seg.mask_targets(masks, 3)
    ce = -(math.log(0.7) + math.log(0.8)) / 2
    # Foreground classes 1 and 2, per-class dice terms.
    d1 = 1 - (0 + 4e-5) / (0.2**2 + 0.1**2 + 0 + 4e-5)
    d2 = 1 - (2 * 0.8 + 4e-5) / (0.1**2 + 0.8**2 + 1 + 4e-5)
    expected = 0.5 * (d1 + d2) / 2 + 0.5 * ce
    assert float(seg.segmentation_loss(logits, targets)) == pytest.approx(expected, rel=1e-5)


def test_losses_have_finite_gradients_at_extremes():
    logits = jnp.array([[[[40.0], [-40.0]]]])
    targets = jnp.array([[[0.0, 1.0]]])
    grads = jax.grad(seg.segmentation_loss)(logits, targets)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_multiclass_dice_pairs_each_class_with_its_own_pixels():
    """(B, H, W, C) input: class 0 over pixels (0.6, 0.2) against (1, 1), class 1 over (0.3, 0.9) against
    (0, 1); grouping a pixel's classes instead (0.6, 0.3 | 0.2, 0.9, and 1, 0 | 1, 1) gives other sums."""
    probs = jnp.array([[[[0.6, 0.3], [0.2, 0.9]]]])  # (1, 1, 2, 2)
    targets = jnp.array([[[[1.0, 0.0], [1.0, 1.0]]]])
    class0 = 1 - (2 * 0.8 + 4e-5) / (0.36 + 0.04 + 2 + 4e-5)
    class1 = 1 - (2 * 0.9 + 4e-5) / (0.09 + 0.81 + 1 + 4e-5)
    assert float(seg.dice_loss(probs, targets)) == pytest.approx((class0 + class1) / 2, rel=1e-6)


def test_two_class_task_takes_softmax_dice_of_class_1_and_cross_entropy():
    """num_classes = 2 is a softmax task: one-hot targets, Dice of class 1 alone, and cross-entropy."""
    masks = jnp.array([[[0, 1]]])
    targets = seg.mask_targets(masks, 2)
    np.testing.assert_array_equal(targets, [[[[1.0, 0.0], [0.0, 1.0]]]])
    logits = jnp.log(jnp.array([[[[0.7, 0.3], [0.4, 0.6]]]]))
    ce = -(math.log(0.7) + math.log(0.6)) / 2
    dice = 1 - (2 * 0.6 + 4e-5) / (0.09 + 0.36 + 1 + 4e-5)
    assert float(seg.segmentation_loss(logits, targets)) == pytest.approx(0.5 * dice + 0.5 * ce, rel=1e-5)


def test_weighted_bce_leaves_a_target_of_one_half_out_of_both_means():
    """Positives are y > 0.5 and negatives y < 0.5: a pixel at exactly 0.5 joins neither count."""
    logits = jnp.array([1.0, -2.0, 0.7])
    targets = jnp.array([1.0, 0.0, 0.5])
    pos = math.log1p(math.exp(-1.0))  # -log sigmoid(1)
    neg = math.log1p(math.exp(-2.0))  # -log (1 - sigmoid(-2))
    assert float(seg.weighted_bce(logits, targets)) == pytest.approx(0.5 * pos + 0.5 * neg, rel=1e-6)
