"""Times one SSMIS training iteration of the authors' PyTorch code on CPU, random weights (timing only).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=DEPS python tools/torch_ssmis_reference.py \
        --authors_code=PATH/code/SSMIS [--batch=4] [--steps=3] [--warmup=1] [--threads=2]

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
import os
import resource
import statistics
import sys
import time
import types
from unittest import mock

import torch

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, kind, default, text in (("authors_code", str, None, "the authors' code/SSMIS folder"),
                                      ("batch", int, 4, "labelled images per step (as many unlabelled)"),
                                      ("steps", int, 3, "timed iterations"), ("warmup", int, 1, "untimed ones first"),
                                      ("threads", int, 2, "torch.set_num_threads")):
        parser.add_argument(f"--{flag}", type=kind, default=default, required=default is None, help=text)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
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
