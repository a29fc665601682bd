"""MoNuSeg nuclei segmentation with text (LViT release): binary, 1000x1000 H&E tiles.

    python -m amvlm_jax.main --config=experiments/monuseg.py --config.data.root=DATA/MoNuSeg
    python -m amvlm_jax.main --config=experiments/monuseg.py:cpu --config.data.root=../shared/datasets/MoNuSeg

The paper's settings: 224x224, U-Net width 64, Adam 1e-3 with cosine warm
restarts every 10 epochs down to 1e-4, batch 16.
Pre-training (--config.mode=pretrain): ViT-B/16 + 6-layer BERT, Adam 3e-5,
batch 32, the SPEC's loss weights.
Variants: cpu (U-Net width 16, batch 4, 150 epochs; a 4-block ViT-Ti/16 at
96x96 from scratch, Adam 1e-4, 40 pre-training epochs: fits 2 CPU cores in minutes),
labeled25 / labeled50 /
fewshot1 / fewshot10 (labeled fraction), mgca (MGCA's pre-training
objective and optimiser; `mgca,cpu` keeps the cpu variant's rate),
textbook_unet (the 16w-bottleneck U-Net instead of the authors'),
text_head / text_head_blind (text masks from a head fitted on the labelled
masks with their reports / with the reports withheld; beyond the paper),
text_report / text_report_blind (the same head from the report's words
alone, fused only where it vetoes), vision (no text guidance: w_text=0),
ab_css / ab_icl / ab_css_icl / ab_css_icl_tg (the paper's ablation rows; see
amvlm_jax/experiment.py). The mean-teacher variants run their job: vision
mode 'ssl', ab_* and text_* mode 'all' (pre-training first); with a labeled
fraction, e.g. cpu,labeled25,vision.
"""

from amvlm_jax.experiment import apply_variants, dataset_config, dataset_variants

VARIANTS = dataset_variants(cpu_epochs=150, cpu_pretrain_epochs=40, cpu_eval_batch=6)


def get_config(variant=None):
    config = dataset_config("monuseg", num_classes=1, lr=1e-3, epochs=200)
    return apply_variants(config, variant, VARIANTS)
