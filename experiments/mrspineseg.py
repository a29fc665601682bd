"""MRSpineSeg spine MR with reports: multi-class (background + 10 vertebrae + 9 intervertebral discs = 20 classes, Dice+CE; masks hold class ids). The SPEC gives no learning rate for it; it follows QaTa-COV19's.

    python -m amvlm_jax.main --config=experiments/mrspineseg.py --config.data.root=DATA/mrspineseg

Paper settings: 224x224, U-Net width 64, Adam 3e-4 with cosine warm restarts
every 10 epochs down to 1e-4, batch 16.
Pre-training (--config.mode=pretrain): ViT-B/16 + 6-layer BERT, Adam 3e-5,
batch 32, the SPEC's loss weights.
Variants: cpu (U-Net width 16, batch 4, 20 epochs; a 4-block ViT-Ti/16 at
96x96 for pre-training: a 2-core smoke run), labeled25 / labeled50, mgca
(MGCA's pre-training objective).
"""

from amvlm_jax.config import base_config
from amvlm_jax.experiment import COMMON_VARIANTS, apply_variants, combine, small_pretrain, small_unet


VARIANTS = {"cpu": combine(small_unet(batch_size=4, epochs=20, eval_batch_size=8), small_pretrain(epochs=10)), **COMMON_VARIANTS}


def get_config(variant=None):
    config = base_config()
    config.data.name = "mrspineseg"
    config.data.image_size = 224
    config.data.num_classes = 20
    config.train.lr = 3e-4
    config.train.batch_size = 16
    config.train.epochs = 100
    return apply_variants(config, variant, VARIANTS)
