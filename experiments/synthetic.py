"""Synthetic lesions with location reports: the embedded default, CPU friendly.

The data (200 train / 50 val / 50 test images at 128x128, 1-3 lesions beside
1-2 look-alike distractors that differ from them only in texture, a report
naming the lesions' count and grid cells) is generated deterministically
into <workdir>/data on first use. A quarter of the training images keep
their masks.

    python -m amvlm_jax.main                           # this file's text_report variant, mode 'all'
    python -m amvlm_jax.main --config.mode=evaluate    # its workdir: runs/synthetic_text_report
    python -m amvlm_jax.main --config=experiments/synthetic.py --config.mode=supervised  # U-Net, 50 labeled images
    python -m amvlm_jax.main --config=experiments/synthetic.py:vision --workdir=runs/synthetic_vision

Mode 'all' pre-trains a 4-block ViT-Ti/16 (96x96, from scratch) with the
pretrained MiniLM text encoder for 20 epochs, then trains the text-guided
mean teacher (U-Net width 16, 8 labeled + 8 unlabeled images a step) for
10 epochs and evaluates it: the default (text_report) took 6.3 minutes with
the install on 2 idle CPU cores (docs/results.md, 2026-12-02).
Variants: labeled100 (every mask; mode 'supervised'), labeled25 / labeled50 / fewshot1 /
fewshot10 (fraction of training masks), mgca (MGCA's pre-training
objective and AdamW schedule, at this file's rate and batch), textbook_unet
(the 16w-bottleneck U-Net instead of the authors'), vision (no text
guidance), ab_css / ab_icl / ab_css_icl / ab_css_icl_tg (the paper's
ablation rows), full (paper-size U-Net at 224x224, for accelerators),
fresh (pre-training on 49,280 never-repeated pairs, about 27 minutes),
text_head / text_head_blind (text masks from a head fitted on the labelled
images' masks with their reports / with the reports withheld; beyond the
paper, docs/results.md "Text masks that localise"), text_report /
text_report_blind (the same head from the report's words alone, fused only
where it vetoes). vision runs mode 'ssl' (no pre-training, which it does not use).
"""

from amvlm_jax.config import base_config
from amvlm_jax.experiment import COMMON_VARIANTS, apply_variants, labeled, small_pretrain


def _full(config):
    config.data.image_size = 224
    config.unet.base_width = 64
    config.train.batch_size = 16
    config.train.epochs = 100


def _mgca(config):
    """MGCA's objective and optimiser form (AdamW, warm-up + cosine), at this file's rate and batch for a
    ViT trained from scratch on 2 cores (MGCA's own 2e-5 at batch 72 assumes pre-trained encoders)."""
    lr, batch_size = config.pretrain.lr, config.pretrain.batch_size
    COMMON_VARIANTS["mgca"](config)
    config.pretrain.lr, config.pretrain.batch_size = lr, batch_size


def _fresh(config):
    """Pre-training on fresh pairs (a new generator sample for every pair of every step) for 220 epochs of
    ceil(200 / 32) = 7 steps of 32, 49,280 pairs in all: about 27 minutes on 2 idle cores (7.2 s an epoch)."""
    config.data.synthetic.fresh_pairs = True
    config.pretrain.epochs = 220
    config.pretrain.checkpoint_every_epochs = 10


def _labeled100(config):
    """Every training mask: the supervised U-Net (no image is left unlabeled for the mean teacher)."""
    labeled(1.0)(config)
    config.mode = "supervised"


VARIANTS = {"full": _full, "fresh": _fresh, "labeled100": _labeled100, **COMMON_VARIANTS, "mgca": _mgca}


def get_config(variant=None):
    config = base_config()
    config.mode = "all"
    config.data.name = "synthetic"
    config.data.image_size = 128
    config.data.labeled_fraction = 0.25
    config.unet.base_width = 16
    config.train.batch_size = 8
    config.train.eval_batch_size = 25
    config.train.epochs = 10
    config.train.lr = 1e-3
    config.train.restart_epochs = 10
    small_pretrain(epochs=20)(config)
    return apply_variants(config, variant, VARIANTS)
