"""Converts pre-trained encoder weights into an Orbax params checkpoint.

    python tools/convert_weights.py --kind bert --src BERT_DIR --out OUT_DIR [--num_layers 6]
    python tools/convert_weights.py --kind vit --src deit.safetensors --out OUT_DIR \
        --vit_variant B/16 --image_size 224

OUT_DIR/params is the Orbax checkpoint (read it back with
``amvlm_jax.weights.load_params_checkpoint(OUT_DIR)``); OUT_DIR/metadata.json
records the kind and the model configuration.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from amvlm_jax import weights  # noqa: E402
from amvlm_jax.models.vit import VIT_VARIANTS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("bert", "vit"), required=True)
    parser.add_argument("--src", required=True,
                        help="bert: HF model directory; vit: checkpoint file or save_pretrained folder")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num_layers", type=int, default=None,
                        help="bert: keep only the first N layers")
    parser.add_argument("--vit_variant", default="B/16", choices=sorted(VIT_VARIANTS))
    parser.add_argument("--image_size", type=int, default=224)
    return parser.parse_args(argv)


class NumLayersError(ValueError):
    """--num_layers beyond the BERT folder's layers (one line, naming the flag)."""


def convert(args: argparse.Namespace) -> str:
    """Loads ``args.src`` and writes the checkpoint; returns the output directory."""
    if args.kind == "bert":
        depth = weights.bert_config(args.src).num_hidden_layers
        if args.num_layers is not None and not 1 <= args.num_layers <= depth:
            raise NumLayersError(f"--num_layers={args.num_layers}: {args.src} has {depth} layers")
        config, params = weights.load_bert(args.src, num_layers=args.num_layers)
        metadata = {"kind": "bert", "source": os.path.abspath(args.src),
                    "bert_config": config.to_dict()}
    else:
        fields = dict(VIT_VARIANTS[args.vit_variant],
                      patch_size=int(args.vit_variant.split("/")[1]))
        params = weights.load_vit(args.src, fields, image_size=args.image_size)
        metadata = {"kind": "vit", "source": os.path.abspath(args.src),
                    "vit_variant": args.vit_variant, "vit_config": fields,
                    "image_size": args.image_size}
    return weights.save_params_checkpoint(args.out, params, metadata)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # Found before the conversion's work.
        print(f"error: --out={args.out}: is a file, not a folder", file=sys.stderr)
        return 1
    try:
        out = convert(args)
    except weights.WeightError as error:  # The loaders name the config field that takes the file; here it is --src.
        print(f"error: --src: {re.sub(r'^config[.][a-z_.]+: ', '', str(error))}", file=sys.stderr)
        return 1
    except NumLayersError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
