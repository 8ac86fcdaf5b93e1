#!/usr/bin/env python
"""Write RANDOM weights under the released DINOv2 file names and key layout (not pretrained!).

For offline machines and tests: with `DINOV2_WEIGHTS_DIR=OUT`, `torch.hub.load(".", "dinov2_vits14", source="local")`
and `dinov2.hub.backbones.dinov2_vits14()` then run the real strict loading path without the internet.

Usage: python scripts/make_fake_official_weights.py OUT [--models dinov2_vits14 dinov2_vits14_reg ...]
       [--linear-heads] [--seed K]
Writes OUT/<name>_pretrain.pth (e.g. dinov2_vits14_reg4_pretrain.pth) and, with --linear-heads,
OUT/<name>_linear_head.pth and OUT/<name>_linear4_head.pth.
"""

import argparse
import os
import sys
from typing import List, Sequence

import torch
from torch import nn

from dinov2.hub import backbones
from dinov2.utils.utils import atomic_write

BACKBONES = (
    "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
    "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg",
)  # fmt: skip


def make_fake_official_weights(
    out_dir: str, models: Sequence[str] = ("dinov2_vits14",), linear_heads: bool = False, seed: int = 0
) -> List[str]:
    """Randomly initialised (seeded) backbones of the hub entry points `models` and, optionally, their
    ImageNet linear heads, saved as raw state dicts under the official file names. Returns the written paths."""
    unknown = [name for name in models if name not in BACKBONES]
    if unknown:
        raise ValueError(f"Unknown hub models {unknown}; expected some of {list(BACKBONES)}")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name in models:
        torch.manual_seed(seed)
        model = getattr(backbones, name)(pretrained=False)
        stem = name.replace("_reg", f"_reg{model.num_register_tokens}")
        files = {f"{stem}_pretrain.pth": model.state_dict()}
        if linear_heads:
            for layers, suffix in [(1, ""), (4, "4")]:
                files[f"{stem}_linear{suffix}_head.pth"] = nn.Linear((1 + layers) * model.embed_dim, 1000).state_dict()
        for file_name, state_dict in files.items():
            path = os.path.join(out_dir, file_name)
            atomic_write(path, lambda f, sd=state_dict: torch.save(sd, f))
            written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory (use it as DINOV2_WEIGHTS_DIR)")
    parser.add_argument("--models", nargs="+", default=["dinov2_vits14"], choices=BACKBONES, metavar="NAME")
    parser.add_argument("--linear-heads", action="store_true", help="also write the ImageNet linear heads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in make_fake_official_weights(args.out, args.models, linear_heads=args.linear_heads, seed=args.seed):
        print(f"wrote {path}")
    print(f"RANDOM weights (not pretrained). Use: export DINOV2_WEIGHTS_DIR={os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
