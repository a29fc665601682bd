"""Plain PyTorch timing reference for the U-Net step on CPU (torch is a test-only dependency).

    python tools/torch_unet_reference.py [--width=16] [--size=224] [--batch=4] [--steps=10] [--warmup=2]
        [--threads=2] [--mode=train|grad|forward|eval] [--channels-last] [--repeat=1]

Re-states the 'authors' U-Net of amvlm_jax/models/unet.py in torch, from its
architecture: one [Conv3x3, BN, ReLU] at the input (3 -> w); four
maxpool + 2 x [Conv3x3, BN, ReLU] stages to 2w, 4w, 8w, 8w; four stages of a
2x2/2 ConvTranspose2d that keeps its channels, the skip concatenated after
it, and 2 x [Conv3x3, BN, ReLU] to 4w, 2w, w, w; a 1x1 output conv. Every
conv has a bias; BatchNorm momentum 0.1, eps 1e-5.

Modes (each timed per call, median printed):
  train    one Adam step: train-mode BN forward, 0.5 Dice + 0.5 weighted BCE, backward, optimizer.step()
  grad     forward + loss + backward, no optimizer step
  forward  train-mode BN forward and loss under torch.no_grad()
  eval     eval-mode BN forward under torch.inference_mode() (inference only)

Inputs are random: images uniform in [0, 1], masks = image channel 0 > 0.5
(as tools/benchmark.py's synthetic batches). Prints one JSON line:
{"median_s": ..., "times_s": [...], ...}. With --repeat=R the timed loop runs
R times and the JSON holds each run's median plus the median of them.

On a shared machine (other processes on the same cores), torch's OpenMP
threads spin while waiting: with --threads=2 and a busy host a step can be
several times slower than with --threads=1. Set OMP_WAIT_POLICY=PASSIVE, or
pin to idle cores (taskset), before comparing with a JAX step. --channels-last
(NHWC, the layout amvlm_jax uses) is usually the faster torch layout on CPU.

load_flax_variables copies a flax UNet(architecture='authors') variable tree
into AuthorsUNet: tests/test_unet.py checks through it that this module
computes our U-Net's outputs, loss, gradients and running statistics.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

DICE_SMOOTH = 4e-5  # as amvlm_jax/losses/segmentation.py


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True),
            nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1), nn.ReLU(inplace=True)]


class Block(nn.Sequential):
    """num_convs x [Conv3x3 (with bias), BN, ReLU]; the first conv maps in -> out, the others out -> out."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int = 2):
        layers = []
        for i in range(num_convs):
            layers += conv_bn_relu(in_channels if i == 0 else out_channels, out_channels)
        super().__init__(*layers)


class Up(nn.Module):
    """ConvTranspose2d 2x2/2 keeping the channels, concat [upsampled, skip], Block to out_channels."""

    def __init__(self, channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, 2, stride=2, bias=True)
        self.convs = Block(channels + skip_channels, out_channels)

    def forward(self, x, skip):
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class AuthorsUNet(nn.Module):
    def __init__(self, width: int = 16, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        w = width
        self.inc = Block(in_channels, w, num_convs=1)
        self.down = nn.ModuleList([Block(a, b) for a, b in ((w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w), (8 * w, 8 * w))])
        # (channels coming up, skip channels, output channels) for up4, up3, up2, up1.
        self.up = nn.ModuleList([Up(8 * w, 8 * w, 4 * w), Up(4 * w, 4 * w, 2 * w), Up(2 * w, 2 * w, w), Up(w, w, w)])
        self.outc = nn.Conv2d(w, num_classes, 1, bias=True)

    def forward(self, x):
        x = self.inc(x)
        skips = []
        for block in self.down:
            skips.append(x)
            x = block(F.max_pool2d(x, 2))
        for up in self.up:
            x = up(x, skips.pop())
        return self.outc(x)


def load_flax_variables(model: AuthorsUNet, params: dict, batch_stats: dict) -> AuthorsUNet:
    """Copies the variables of amvlm_jax's UNet(architecture='authors') into `model` (for parity checks).

    params / batch_stats: the flax trees (numpy-convertible leaves). Conv kernels (kh, kw, in, out) become
    (out, in, kh, kw); the 2x2 up-convolution kernel[1 - a, 1 - b] (in, out) becomes ConvTranspose2d's
    W[:, :, a, b]; BatchNorm scale/bias/mean/var become weight/bias/running_mean/running_var.
    """
    import numpy as np

    def tensor(value):
        return torch.from_numpy(np.array(value, dtype=np.float32))

    def conv(module, tree):
        module.weight.data.copy_(tensor(np.transpose(np.asarray(tree["kernel"]), (3, 2, 0, 1))))
        module.bias.data.copy_(tensor(tree["bias"]))

    def block(module, name):
        convs = [m for m in module if isinstance(m, nn.Conv2d)]
        norms = [m for m in module if isinstance(m, nn.BatchNorm2d)]
        for i, (c, n) in enumerate(zip(convs, norms)):
            conv(c, params[name][f"Conv_{i}"])
            n.weight.data.copy_(tensor(params[name][f"BatchNorm_{i}"]["scale"]))
            n.bias.data.copy_(tensor(params[name][f"BatchNorm_{i}"]["bias"]))
            n.running_mean.copy_(tensor(batch_stats[name][f"BatchNorm_{i}"]["mean"]))
            n.running_var.copy_(tensor(batch_stats[name][f"BatchNorm_{i}"]["var"]))

    block(model.inc, "inc")
    for level, down in enumerate(model.down, start=1):
        block(down, f"down{level}")
    for level, up in zip((4, 3, 2, 1), model.up):
        kernel = np.asarray(params[f"up{level}"]["kernel"])[::-1, ::-1]  # (a, b, in, out)
        up.up.weight.data.copy_(tensor(np.transpose(kernel, (2, 3, 0, 1))))
        up.up.bias.data.copy_(tensor(params[f"up{level}"]["bias"]))
        block(up.convs, f"up{level}_convs")
    conv(model.outc, params["outc"])
    return model


def dice_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.5 Dice (per image, on sigmoid probabilities) + 0.5 weighted BCE; logits (B, 1, H, W), targets (B, H, W)."""
    logits = logits[:, 0]
    p = torch.sigmoid(logits).flatten(1)
    y = targets.flatten(1)
    dice = 1.0 - (2.0 * (p * y).sum(-1) + DICE_SMOOTH) / ((p * p).sum(-1) + (y * y).sum(-1) + DICE_SMOOTH)
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    positive = (targets > 0.5).float()
    negative = (targets < 0.5).float()
    bce = 0.5 * (per_pixel * positive).sum() / (positive.sum() + 1e-12) \
        + 0.5 * (per_pixel * negative).sum() / (negative.sum() + 1e-12)
    return 0.5 * dice.mean() + 0.5 * bce


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed calls per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs; the JSON reports the median of their medians")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--mode", choices=("train", "grad", "forward", "eval"), default="train")
    parser.add_argument("--channels-last", action="store_true", help="torch.channels_last memory format (NHWC)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_call(args):
    """(a no-argument function running one call of args.mode, the model)."""
    torch.manual_seed(args.seed)
    model = AuthorsUNet(args.width)
    images = torch.rand(args.batch, 3, args.size, args.size)
    targets = (images[:, 0] > 0.5).float()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    last = {}

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = dice_bce_loss(model(images), targets)
        loss.backward()
        optimizer.step()
        last["loss"] = loss.item()

    def grad():
        model.train()
        model.zero_grad(set_to_none=True)
        loss = dice_bce_loss(model(images), targets)
        loss.backward()
        last["loss"] = loss.item()

    def forward():
        model.train()
        with torch.no_grad():
            last["loss"] = dice_bce_loss(model(images), targets).item()

    def evaluate():
        model.eval()
        with torch.inference_mode():
            last["loss"] = float(model(images).float().mean())

    return {"train": train, "grad": grad, "forward": forward, "eval": evaluate}[args.mode], model, last


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    call, model, last = make_call(args)
    for _ in range(args.warmup):
        call()
    first_loss = last.get("loss")
    run_medians, all_times = [], []
    for _ in range(args.repeat):
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        run_medians.append(statistics.median(times))
        all_times.append([round(t, 4) for t in times])
    print(json.dumps({
        "tool": "torch_unet_reference", "mode": args.mode, "width": args.width, "size": args.size,
        "batch": args.batch, "threads": torch.get_num_threads(), "channels_last": args.channels_last,
        "parameters": sum(p.numel() for p in model.parameters()),
        "median_s": round(statistics.median(run_medians), 4), "run_medians_s": [round(m, 4) for m in run_medians],
        "times_s": all_times if args.repeat > 1 else all_times[0], "loss_after_warmup": first_loss,
        "torch": torch.__version__, "mkldnn": torch.backends.mkldnn.is_available(),
    }))


if __name__ == "__main__":
    main()
