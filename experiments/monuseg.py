"""MoNuSeg nuclei segmentation with text (LViT release): binary, 1000x1000 H&E tiles.

    python -m amvlm_jax.main --config=experiments/monuseg.py --config.data.root=DATA/MoNuSeg
    python -m amvlm_jax.main --config=experiments/monuseg.py:cpu --config.data.root=../shared/datasets/MoNuSeg

The paper's settings: 224x224, U-Net width 64, Adam 1e-3 with cosine warm
restarts every 10 epochs down to 1e-4, batch 16.
Pre-training (--config.mode=pretrain): ViT-B/16 + 6-layer BERT, Adam 3e-5,
batch 32, the SPEC's loss weights.
Variants: cpu (U-Net width 16, batch 4, 150 epochs; a 4-block ViT-Ti/16 at
96x96 from scratch, 40 pre-training epochs: fits 2 CPU cores in minutes),
labeled25 / labeled50, mgca (MGCA's pre-training objective).
"""

from amvlm_jax.config import base_config
from amvlm_jax.experiment import COMMON_VARIANTS, apply_variants, combine, small_pretrain, small_unet


VARIANTS = {"cpu": combine(small_unet(batch_size=4, epochs=150, eval_batch_size=6), small_pretrain(epochs=40)), **COMMON_VARIANTS}


def get_config(variant=None):
    config = base_config()
    config.data.name = "monuseg"
    config.data.image_size = 224
    config.train.lr = 1e-3
    config.train.batch_size = 16
    config.train.epochs = 200
    return apply_variants(config, variant, VARIANTS)
