"""Times one SSMIS training iteration of the authors' PyTorch code on CPU, random weights (timing only).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=DEPS python tools/torch_ssmis_reference.py \
        --authors_code=PATH/code/SSMIS [--batch=4] [--steps=3] [--warmup=1] [--threads=2]
    OMP_WAIT_POLICY=PASSIVE python tools/torch_ssmis_reference.py --plain [--channels-last] [--batch=4] ...

--plain needs no authors' code (the project's venv suffices): it times a plain torch re-statement of OUR
step, amvlm_jax/train/ssl.py's make_ssl_step as tools/benchmark.py --mode=ssl builds it for
experiments/monuseg.py with a random 6-layer 768-wide BERT: teacher U-Net forward on the B unlabelled
(train-mode BatchNorm, stored statistics untouched); frozen ViT-B/16 + image local head and BERT + text
global head (eval mode, no_grad); text-mask decoder forward, L_tg backward and its Adam step (decoder +
logit scale); PAMR on the B own-report maps, key-point mix, fusion into pseudo-labels; student U-Net
(width 64) forward + Dice/BCE + backward + Adam on the 2B images; gradient and parameter norms; EMA
teacher. The student's cosine schedule is a constant rate here (ours changes it once per epoch), and the
reports are random full-length token ids. It prints each part's parameter count beside ours (built with
jax.eval_shape; the script exits 1 on a difference) and the JSON line; --channels-last puts the U-Nets
and images in torch.channels_last.

Imports the authors' modules from --authors_code (none of their code is here) and times their own loop
body, train_SSL_one_epoch.train_one_epoch, on a one-batch loader of B labelled 224x224 images with masks
+ B unlabelled (texts: the unlabelled file names, as their loader gives): student U-Net (width 64) on 2B;
TextMask: frozen ViT-B/16 on the B unlabelled, frozen 6-layer BERT (768, their bert_config.json) on B
texts of 20 tokens (their tokenizer's most), trained decoder, PAMR (10 iterations on the B x B maps),
key-point mix, L_tg; teacher U-Net forward on B (train-mode BatchNorm, no graph); Dice + BCE on 2B,
backward into the student and (through the pseudo-labels) the decoder, Adam, EMA teacher, L_tg backward,
decoder Adam; their dice and scikit-learn IoU (metrics_s: these alone). Left out: data loading and
augmentation, tensorboard and log output (no-ops), the per-epoch LR schedule. On a CPU without weights:
checkpoint loads become random init, a stand-in tokenizer gives random full-length ids, 'cuda:0' is the
CPU, autocast and GradScaler switch off (all float32) and the targets their loop casts to float16 are cast
back to the predictions' dtype (CPU BCE needs one); the pre-trained model's momentum encoders and PDT
modules, idle in this step, are not built.

DEPS (not the project's venv): pip install --no-deps --target DEPS timm einops fairscale "transformers<5"
"huggingface_hub<1" "tokenizers<0.23" requests charset_normalizer idna urllib3 certifi pandas
opencv-python-headless torchvision==<torch's match>. Shims: torchvision's op registrations are skipped (a
CUDA build under a CPU torch has no C ops; timm needs none); transformers.modeling_utils re-exports three
helpers med.py imports (4.5x moved them). OMP_WAIT_POLICY=PASSIVE: no OpenMP spinning on a busy host.
"""

import argparse
import importlib
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
import types
from unittest import mock

import torch
from torch import nn
from torch.nn import functional as F

AUTHORS_MODULES = ("Config_SSL", "TextMask_generation", "train_SSL_one_epoch", "utils_train", "utils.UNet",
                   "backbones.bert_model.TextEncoder", "backbones.bert_model.med", "backbones.image_encoder.ImageEncoder")


def import_authors(code: str) -> dict:
    """{short name: module} of the authors' modules under ``code``, after the two import shims above."""
    sys.path.insert(0, code)
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    from transformers import modeling_utils, pytorch_utils
    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    return {name.split(".")[-1]: importlib.import_module(name) for name in AUTHORS_MODULES}


class RandomTokenizer:
    """Stands in for BertTokenizer (vocabulary 28996): [CLS] + random word ids + [SEP], max_length long."""

    vocab = {f"w{i}": i for i in range(28996)} | {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102}

    def get_vocab(self):
        return self.vocab

    def __call__(self, texts, max_length=20, **_):
        ids = torch.randint(1000, len(self.vocab), (len(texts), max_length))
        ids[:, 0], ids[:, -1] = 101, 102
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def build(a: dict, code: str, batch: int) -> tuple:
    """Their train_SSL.main_loop set-up, all in train mode: (student, teacher, TextMask, criterion, Adams, scalers)."""
    a["Config_SSL"].device, a["Config_SSL"].batch_size = "cpu", batch
    med, json_file = a["med"], os.path.join(code, "backbones", "bert_model", "bert_config.json")
    pretrained = torch.nn.Module()  # Stands for the pre-training model: TextMask uses its img_encoder and text_encoder.

    class CpuTorch:  # What TextMask.__init__ sees as torch: device('cuda:0') -> CPU, load(path) -> `pretrained`.
        device, load = staticmethod(lambda *_: torch.device("cpu")), staticmethod(lambda *_, **__: pretrained)

        def __getattr__(self, name):
            return getattr(torch, name)

    with mock.patch.object(torch, "load", lambda *_, **__: {"model": {}}), mock.patch.multiple(  # DeiT weights: none.
            a["TextEncoder"], BertConfig=types.SimpleNamespace(from_json_file=lambda _: med.BertConfig.from_json_file(json_file)),
            BertTokenizer=types.SimpleNamespace(from_pretrained=lambda _: RandomTokenizer()),
            BertModel=types.SimpleNamespace(from_pretrained=lambda _, config, **kw: med.BertModel(config, **kw))), \
            mock.patch.object(a["TextMask_generation"], "torch", CpuTorch()):
        pretrained.img_encoder = a["ImageEncoder"].ImageEncoder_Vit()
        pretrained.text_encoder = a["TextEncoder"].TextEncoder_Bert()
        novel = a["TextMask_generation"].TextMask()
    student, teacher = a["UNet"].UNet(), a["UNet"].UNet()
    for param in teacher.parameters():  # As train_SSL.choose_model('teacher').
        param.detach_()

    class Criterion(a["utils_train"].WeightedDiceBCE):
        def forward(self, inputs, targets):
            return super().forward(inputs, targets.to(inputs.dtype))

    optimizer, optimizer_novel = (torch.optim.Adam(filter(lambda p: p.requires_grad, m.parameters()),
                                                   lr=a["Config_SSL"].learning_rate) for m in (student, novel))
    return (student, teacher, novel, Criterion(dice_weight=0.5, BCE_weight=0.5), optimizer, optimizer_novel,
            torch.cuda.amp.GradScaler(enabled=True), torch.cuda.amp.GradScaler(enabled=True))


# --plain: our own step (amvlm_jax/train/ssl.py make_ssl_step, experiments/monuseg.py) re-stated in plain torch.
SIZE, GRID, EMBED, TOKENS = 224, 14, 128, 20  # image side, ViT patch grid, embedding D, config.pretrain.max_length


def projection_head(width: int) -> nn.Sequential:
    """models/heads.py (eval mode here): Linear(width, 2048) - BN - ReLU - Linear(2048, D) - BN without scale/shift."""
    return nn.Sequential(nn.Linear(width, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, EMBED),
                         nn.BatchNorm1d(EMBED, affine=False))


class FrozenEncoders(nn.Module):
    """TextGuidance.encode: ViT-B/16 patches -> image local head -> unit-norm map V (B, D, 14, 14); 6-layer BERT
    [CLS] -> text global head -> unit-norm reports t (B, D). Random init, eval mode, no gradient."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel, ViTConfig, ViTModel
        self.vit = ViTModel(ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                      layer_norm_eps=1e-6, image_size=SIZE, patch_size=16), add_pooling_layer=False)
        self.bert = BertModel(BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                                         intermediate_size=3072), add_pooling_layer=False)
        self.image_head, self.text_head = projection_head(768), projection_head(768)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))  # Our ViT normalises.
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, images, ids):
        patches = self.vit(pixel_values=(images - self.mean) / self.std).last_hidden_state[:, 1:]
        patch_map = F.normalize(self.image_head(patches.flatten(0, 1)), dim=-1)
        text = self.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, 0]
        return patch_map.view(len(images), GRID, GRID, EMBED).permute(0, 3, 1, 2), F.normalize(self.text_head(text), dim=-1)


class Decoder(nn.Module):
    """TextMaskDecoder: 2 x [nearest x2, x + tanh(g) Conv3x3(ReLU(x))], L2 over channels: (B, D, h, w) -> (B, D, 4h, 4w)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(EMBED, EMBED, 3, padding=1) for _ in range(2))
        self.gates = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        for conv, gate in zip(self.convs, self.gates):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = x + torch.tanh(gate) * conv(F.relu(x))
        return F.normalize(x, dim=1)


def pamr(image, mask, iterations=10, dilations=(1, 2, 4, 8, 12, 24)):
    """text_mask.pamr: refines mask (B, 1, h, w) along the edges of image (B, 3, h, w)."""
    height, width = image.shape[-2:]

    def neighbours(x):  # (B, C, 48, h, w): the 8 stencil neighbours at each dilation, replicate padding.
        shifted = []
        for d in dilations:
            padded = F.pad(x, (d, d, d, d), mode="replicate")
            shifted += [padded[..., d + dy * d:d + dy * d + height, d + dx * d:d + dx * d + width]
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
        return torch.stack(shifted, 2)

    near = neighbours(image)
    std = torch.cat([near, image[:, :, None].expand(-1, -1, len(dilations), -1, -1)], 2).std(2, keepdim=True)
    affinity = torch.softmax((-(near - image[:, :, None]).abs() / (1e-8 + 0.1 * std)).mean(1, keepdim=True), 2)
    for _ in range(iterations):
        mask = (neighbours(mask) * affinity).sum(2)
    return mask


def plain_setup(batch: int, channels_last: bool) -> tuple:
    """(one training step, {part: its parameters}) of B labelled + B unlabelled random images."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_unet_reference import AuthorsUNet, dice_bce_loss

    layout = torch.channels_last if channels_last else torch.contiguous_format
    student, teacher = AuthorsUNet(64).to(memory_format=layout), AuthorsUNet(64).to(memory_format=layout)
    teacher.load_state_dict(student.state_dict())  # The teacher starts as a copy of the student.
    teacher.requires_grad_(False)
    for module in teacher.modules():  # teacher_norm 'batch': the batch's statistics, the stored ones untouched.
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.0
    averaged = [(t, s) for (name, t), s in zip(teacher.state_dict(keep_vars=True).items(), student.state_dict().values())
                if not name.endswith("num_batches_tracked")]  # EMA: parameters and BatchNorm statistics.
    encoders, decoder = FrozenEncoders(), Decoder()
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # L_tg's logit scale, trained with the decoder.
    student_adam = torch.optim.Adam(student.parameters(), lr=1e-3)
    decoder_adam = torch.optim.Adam([*decoder.parameters(), log_scale], lr=1e-3)  # ssl.decoder_lr 0: train.lr.
    labeled, unlabeled = (torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8) for _ in range(2))
    mask, ids = (labeled[:, 0] > 128).to(torch.uint8), torch.randint(1000, 30522, (batch, TOKENS))
    labels, updates = torch.arange(batch), 0

    def step() -> dict:
        nonlocal updates
        x_l, x_u = ((x.float() / 255).contiguous(memory_format=layout) for x in (labeled, unlabeled))
        with torch.no_grad():
            p_teacher = torch.sigmoid(teacher(x_u)[:, 0])
            patch_map, reports = encoders(x_u, ids)
        dense = decoder(patch_map)  # Text masks and L_tg (text_masks, text_guided_loss), then the decoder's Adam.
        sim = torch.einsum("bdhw,nd->bnhw", dense, reports)
        soft = torch.sigmoid(sim)
        pooled = torch.einsum("bnhw,bdhw->bnd", soft, dense) / (soft.sum((2, 3))[..., None] + 1e-6)
        logits = torch.einsum("bnd,nd->bn", F.normalize(pooled, dim=-1), reports) * log_scale.exp().clamp(max=100)
        tg_loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        decoder_adam.zero_grad(set_to_none=True)
        tg_loss.backward()
        decoder_adam.step()
        with torch.no_grad():  # p_text of each image from its own report: PAMR, key-point mix, resize; the fusion.
            own = sim.diagonal(0, 0, 1).permute(2, 0, 1)[:, None]
            small = F.interpolate(x_u, size=own.shape[-2:], mode="bilinear", align_corners=True)
            mixed = 0.3 * torch.sigmoid((own - 0.25) * 10) + 0.7 * pamr(small, torch.sigmoid(own))
            p_text = F.interpolate(mixed, size=SIZE, mode="bilinear", align_corners=True)[:, 0].clamp(0, 1)
            pseudo = torch.sigmoid(torch.logit(p_teacher, eps=1e-4) + torch.logit(p_text, eps=1e-4))  # w_text 1.
        loss = dice_bce_loss(student(torch.cat([x_l, x_u])), torch.cat([mask.float(), pseudo]))  # The student.
        student_adam.zero_grad(set_to_none=True)
        loss.backward()
        student_adam.step()
        with torch.no_grad():
            metrics = {"loss": loss.detach(), "tg_loss": tg_loss.detach(), "text_mask_mean": p_text.mean(),
                       "pseudo_label_mean": pseudo.mean(), "grad_norm": nn.utils.get_total_norm(
                           [p.grad for p in student.parameters()]), "param_norm": nn.utils.get_total_norm(student.parameters())}
            alpha = min(1 - 1 / (updates + 1), 0.99)  # ema_alpha of the updates before this one.
            for mean, online in averaged:
                mean.lerp_(online, 1 - alpha)
        updates += 1
        return metrics

    return step, {"unet": student.parameters(), "image_encoder": encoders.vit.parameters(), "image_local_head":
                  encoders.image_head.parameters(), "text_encoder": encoders.bert.parameters(), "text_global_head":
                  encoders.text_head.parameters(), "decoder": decoder.parameters(), "log_scale": [log_scale]}


def our_parameter_counts(batch: int) -> dict:
    """Our modules' parameter counts for tools/benchmark.py --mode=ssl's configuration (shapes only)."""
    import jax
    import jax.numpy as jnp

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from amvlm_jax.experiment import load_config
    from amvlm_jax.train import build, ssl, supervised

    config = load_config(os.path.join(root, "experiments", "monuseg.py"))
    config.train.batch_size, config.pretrain.text_weights_init = batch, "random"
    config.pretrain.text_hidden, config.pretrain.text_heads = 768, 12
    model = build.build_model(config, build.text_encoder_config(config))
    guidance = ssl.TextGuidance.from_variables(config, model, None)
    length = config.pretrain.max_length
    tokens = {k: jnp.zeros((1, length), jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids", "word_index")}
    tokens["word_mask"] = jnp.zeros((1, length - 1), jnp.int32)

    def init(rng):
        image = jnp.zeros((1, config.data.image_size, config.data.image_size, 3))
        return ({"unet": supervised.init_variables(config, supervised.build_unet(config))["params"]}
                | model.init(rng, image, False, method=model.encode_image)["params"]
                | model.init(rng, tokens, False, method=model.encode_text)["params"] | guidance.init_generator(rng))

    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))  # Also holds image_global_head, unused by the step.
    return {name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)) for name, tree in shapes.items()}


def main_plain(args) -> None:
    step, parts = plain_setup(args.batch, args.channels_last)
    counts = {name: sum(p.numel() for p in params) for name, params in parts.items()}
    times = []
    for _ in range(args.warmup + args.steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Before jax is imported below.
    ours = our_parameter_counts(args.batch)
    print(f"{'parameters':<18}{'ours (jax)':>14}{'torch':>14}")
    for name, count in counts.items():
        print(f"{name:<18}{ours[name]:>14,}{count:>14,}  {'equal' if ours[name] == count else 'DIFFERENT'}")
    ours = {name: ours[name] for name in counts}
    timed = times[args.warmup:]
    print(json.dumps({
        "tool": "torch_ssmis_reference", "mode": "plain", "labeled": args.batch, "unlabeled": args.batch, "size": SIZE,
        "threads": torch.get_num_threads(), "channels_last": args.channels_last,
        "median_s": round(statistics.median(timed), 3), "min_s": round(min(timed), 3), "warmup": args.warmup,
        "times_s": [round(t, 3) for t in times], "parameters": counts, "parameters_equal_ours": ours == counts,
        "peak_rss_gib": round(peak_rss, 2), "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }))
    if ours != counts:
        sys.exit(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, kind, default, text in (("authors_code", str, None, "the authors' code/SSMIS folder"),
                                      ("batch", int, 4, "labelled images per step (as many unlabelled)"),
                                      ("steps", int, 3, "timed iterations"), ("warmup", int, 1, "untimed ones first"),
                                      ("threads", int, 2, "torch.set_num_threads")):
        parser.add_argument(f"--{flag}", type=kind, default=default, help=text)
    parser.add_argument("--plain", action="store_true", help="time our own step re-stated in torch (no authors' code)")
    parser.add_argument("--channels-last", action="store_true", help="--plain: U-Nets and images channels_last")
    args = parser.parse_args(argv)
    if not args.plain and args.authors_code is None:
        parser.error("the following arguments are required: --authors_code (or --plain)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.plain:
        return main_plain(args)
    code = os.path.abspath(args.authors_code)
    a = import_authors(code)
    student, teacher, novel, criterion, optimizer, optimizer_novel, scaler, scaler_novel = build(a, code, args.batch)
    b, size = args.batch, 224  # TextMask hard-codes 224 (14 x 14 patches).
    sample = {"image": torch.rand(b, 3, size, size), "label": (torch.rand(b, size, size) > 0.5).long(),
              "image_unlabeled": torch.rand(b, 3, size, size)}
    loader = [(sample, [f"mask_unlabeled_{i}.png" for i in range(b)])]  # One batch, as their DataLoader yields.
    logger, writer = logging.getLogger("torch_ssmis_reference"), types.SimpleNamespace(add_scalar=lambda *_: None)

    def seconds(call, *args):
        started = time.perf_counter()
        call(*args)
        return time.perf_counter() - started

    times = [seconds(a["train_SSL_one_epoch"].train_one_epoch, loader, student, teacher, novel, None, criterion, optimizer,
                     optimizer_novel, writer, 0, None, "LViT", logger, scaler, scaler_novel, step)
             for step in range(args.warmup + args.steps)]  # step: their global_step (sets the EMA rate).
    preds, targets = torch.rand(2 * b, 1, size, size), torch.rand(2 * b, size, size)
    metrics = [seconds(criterion._show_dice, preds.clone(), targets.half())
               + seconds(a["utils_train"].iou_on_batch, targets.clone(), preds.clone()) for _ in range(3)]
    timed = times[args.warmup:]
    print(json.dumps({
        "tool": "torch_ssmis_reference", "labeled": b, "unlabeled": b, "size": size, "threads": torch.get_num_threads(),
        "median_s": round(statistics.median(timed), 3), "min_s": round(min(timed), 3), "warmup": args.warmup,
        "times_s": [round(t, 3) for t in times], "metrics_s": round(statistics.median(metrics), 3),
        "parameters": {name: sum(p.numel() for p in m.parameters() if p.requires_grad or name != "text_mask_trainable")
                       for name, m in (("student", student), ("vit", novel.img_encoder), ("text_encoder",
                                       novel.text_encoder), ("text_mask_trainable", novel))},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }))


if __name__ == "__main__":
    main()
