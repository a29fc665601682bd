"""Synthetic lesions with location reports: the embedded default, CPU friendly.

The data (200 train / 50 val / 50 test images at 128x128, 1-3 faint lesions
beside look-alike distractors, a report naming the lesions' count and grid
cells) is generated deterministically into <workdir>/data on first use.

    python -m amvlm_jax.main                                   # this file
    python -m amvlm_jax.main --config=experiments/synthetic.py:labeled25
    python -m amvlm_jax.main --config=experiments/synthetic.py --config.mode=evaluate

Pre-training (--config.mode=pretrain) uses a 4-block ViT-Ti/16 at 96x96 from
scratch and the pretrained MiniLM text encoder for 20 epochs.
Variants: labeled25 / labeled50 / fewshot1 / fewshot10 (fraction of training
masks), mgca (MGCA's pre-training objective), vision (no text guidance),
ab_css / ab_icl / ab_css_icl / ab_css_icl_tg (the paper's ablation rows),
full (paper-size U-Net at 224x224, for accelerators).
"""

from amvlm_jax.config import base_config
from amvlm_jax.experiment import COMMON_VARIANTS, apply_variants, small_pretrain


def _full(config):
    config.data.image_size = 224
    config.unet.base_width = 64
    config.train.batch_size = 16
    config.train.epochs = 100


VARIANTS = {"full": _full, **COMMON_VARIANTS}


def get_config(variant=None):
    config = base_config()
    config.data.name = "synthetic"
    config.data.image_size = 128
    config.unet.base_width = 16
    config.train.batch_size = 8
    config.train.eval_batch_size = 25
    config.train.epochs = 20
    config.train.lr = 1e-3
    config.train.restart_epochs = 10
    small_pretrain(epochs=20)(config)
    return apply_variants(config, variant, VARIANTS)
