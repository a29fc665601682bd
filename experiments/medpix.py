"""MedPix-2.0 (CT and MR images with captions): pre-training on a real image-report corpus.

    python -m amvlm_jax.main --config=experiments/medpix.py --config.data.root=DATA/MedPix-2.0
    python -m amvlm_jax.main --config=experiments/medpix.py:cpu --config.data.root=../shared/datasets/MedPix-2.0
    python -m amvlm_jax.main --config=experiments/medpix.py:cpu --config.data.root=../shared/datasets/MedPix-2.0 \
        --config.mode=evaluate --config.eval.checkpoint=WORKDIR/pretrain

The corpus as its authors split it by clinical case (splits/descriptions_{train,dev,test}.jsonl: 1,653 / 197 /
200 images); each image's report is its caption. The held-out splits (eval.splits) are scored before training,
every pretrain.eval_every_epochs epochs (1; cpu: 5, long: 10) and at the end: retrieval both ways, zero-shot
modality (CT / MR) and body location from a prompt per class, and linear probes for the same labels on the
frozen image encoder's [CLS] features. Epoch 0 is the control: the same encoders before pre-training (random
ViT and heads; the text encoder as loaded). Variants: cpu (a 4-block ViT-Ti/16 at 96x96 from scratch, the
first 3 layers of the text encoder, 32 tokens, batch 32, Adam 1e-4, 10 epochs: about 10 minutes on 2 cores),
mgca (MGCA's objective and optimiser; `mgca,cpu` keeps the cpu variant's rate), random_text (the text encoder
randomly initialised too), locked_text (after cpu: all 6 text layers, kept as loaded, heads and ViT at 3e-4,
AMVLM's constant rate replaced by a warm-up and cosine; the 3-layer truncation's [CLS] carries almost no
body-location information, and a fine-tuned text encoder memorises 1,653 captions; docs/results.md), long
(after locked_text: 30 epochs, scored and saved every 10, the online view a random crop of each image; about
three times as long; on test its probes, zero-shot modality and image-to-report top-10 are higher than
locked_text's, its top-1 retrieval is not; docs/results.md), gpu (locked_text and long with a 12-block
ViT-S/16 at 224 px: every test score above its start in every AMVLM seed, top-1 retrieval included; about 3
minutes a run on one H200; docs/results.md; tools/gpu_runs.py --experiment=medpix runs it on an offline GPU
machine; `mgca,gpu` for MGCA).
"""

from amvlm_jax.experiment import COMMON_VARIANTS, apply_variants, small_pretrain
from amvlm_jax.config import base_config

ZERO_SHOT = {
    "Type": {"CT": "a CT scan", "MR": "an MRI scan"},
    "Location Category": {
        "Head": "an image of the brain and head",
        "Thorax": "an image of the chest and lungs",
        "Abdomen": "an image of the abdomen, liver and bowel",
        "Spine and Muscles": "an image of the spine and muscles",
        "Reproductive and Urinary System": "an image of the pelvis, kidneys and bladder",
    },
}


def _random_text(config):
    config.pretrain.text_weights_init = "random"


def _cpu(config):
    small_pretrain(epochs=10)(config)
    config.pretrain.text_layers = 3  # The text encoder's cost dominates a CPU step: its first 3 layers.
    config.pretrain.max_length = 32
    config.pretrain.eval_every_epochs = 5
    config.train.eval_batch_size = 32


def _locked_text(config):
    config.pretrain.text_layers = 6
    config.pretrain.train_text_encoder = False
    config.pretrain.lr = 3e-4  # Only the from-scratch ViT and the heads train.
    if config.pretrain.schedule == "constant":
        # AMVLM: 10% warm-up, then a cosine to 1e-8 (chosen on the dev split over a constant rate, batch 72,
        # and MGCA's optimiser). MGCA keeps the schedule its variant sets.
        config.pretrain.schedule = "warmup_cosine"
        config.pretrain.warmup_fraction = 0.1


def _long(config):
    # Cropping slows the memorisation of the pairs (training image-to-report top-1 after 10 epochs: 8% cropped,
    # 44% not), so it needs the longer run.
    config.pretrain.augment = "crop"
    config.pretrain.epochs = 30
    config.pretrain.eval_every_epochs = 10
    config.pretrain.checkpoint_every_epochs = 10


def _gpu(config):
    _locked_text(config)
    _long(config)
    config.pretrain.vit = "S/16"  # 22 M parameters; ViT-B/16's 86 M would memorise 1,653 pairs sooner.


VARIANTS = {"cpu": _cpu, "gpu": _gpu, "mgca": COMMON_VARIANTS["mgca"], "random_text": _random_text, "locked_text": _locked_text,
            "long": _long}


def get_config(variant=None):
    config = base_config()
    config.mode = "pretrain"
    config.data.name = "medpix"
    config.data.image_size = 224
    corpus = config.data.corpus
    corpus.train = "splits/descriptions_train.jsonl"
    corpus.val = "splits/descriptions_dev.jsonl"
    corpus.test = "splits/descriptions_test.jsonl"
    corpus.image_field = "image"
    corpus.image_path = "../images/{}.jpg"
    corpus.text_fields = ("Description.Caption",)
    config.pretrain.max_length = 48  # Captions run to 27 words on average.
    config.eval.zero_shot = ZERO_SHOT
    config.eval.probe_fields = ("Type", "Location Category")
    config.eval.splits = ("val", "test")  # --config.eval.splits=val while choosing settings: test is not read.
    return apply_variants(config, variant, VARIANTS)
