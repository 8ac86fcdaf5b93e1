"""Backbone forward speed: images/s in inference mode; on CUDA also peak memory and achieved TFLOP/s.

The model is built as the hub builds released backbones (LayerScale, no chunks; ViT-g with the fused SwiGLU FFN)
with random weights. `--dtype fp16/bf16` runs under `torch.autocast` (weights stay fp32), as the evaluations do.

FLOPs per image (forward; one multiply-add = 2 FLOPs; norms, softmax, activations and biases ignored), with
P = (H/p)(W/p) patches, N = 1 + R + P tokens, D = embed_dim, L = depth, F = FFN hidden size:
    patch embedding  2 * P * (3 p^2) * D
    per block        8 N D^2  (qkv 6 N D^2 + proj 2 N D^2)
                   + 4 N^2 D  (q k^T and attn v)
                   + 4 N D F  (MLP fc1 + fc2)   or   6 N D F  (SwiGLU w12 + w3, F = rounded 2/3 hidden)
TFLOP/s = FLOPs per image * images/s / 1e12.
"""

import argparse

import torch

from dinov2.models import ARCHS
from dinov2.models import vision_transformer as vits
from dinov2.models.vision_transformer import DinoVisionTransformer

from .timing import timed_calls

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="vit_small", choices=ARCHS)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--img-size", type=int, default=224, help="square input resolution (pos_embed built for it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-register-tokens", type=int, default=0)
    parser.add_argument("--ffn-layer", default=None, help="default: swiglufused for vit_giant2, else mlp")
    parser.add_argument("--iters", type=int, default=20, help="timed forward passes")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forward passes first")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="autocast dtype (fp32 = no autocast)")


def forward_flops(model: DinoVisionTransformer, img_size: int) -> int:
    """FLOPs of one forward pass for one image (formula in the module docstring)."""
    patch, dim = model.patch_size, model.embed_dim
    num_patches = (img_size // patch) ** 2
    tokens = 1 + model.num_register_tokens + num_patches
    flops = 2 * num_patches * 3 * patch * patch * dim
    for block in model.flat_blocks():
        flops += 8 * tokens * dim * dim + 4 * tokens * tokens * dim
        mlp = block.mlp
        if hasattr(mlp, "fc1"):
            flops += 4 * tokens * dim * mlp.fc1.out_features
        elif hasattr(mlp, "w3"):
            flops += 6 * tokens * dim * mlp.w3.in_features
    return flops


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ffn_layer = args.ffn_layer or ("swiglufused" if args.arch == "vit_giant2" else "mlp")
    model = getattr(vits, args.arch)(
        patch_size=args.patch_size, img_size=args.img_size, init_values=1.0, block_chunks=0,
        ffn_layer=ffn_layer, num_register_tokens=args.num_register_tokens,
    )  # fmt: skip
    model = model.to(device).eval()
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    with torch.inference_mode(), autocast:
        elapsed = timed_calls(lambda _: model(images), args.warmup, args.iters, device)

    images_per_s = args.iters * args.batch_size / elapsed
    flops = forward_flops(model, args.img_size)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    record = {
        "benchmark": "backbone",
        "arch": args.arch,
        "patch_size": args.patch_size,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "num_register_tokens": args.num_register_tokens,
        "ffn_layer": ffn_layer,
        "dtype": args.dtype,
        "device": device_name,
        "iters": args.iters,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "gflops_per_image": round(flops / 1e9, 3),
        "ms_per_batch": round(1000 * elapsed / args.iters, 3),
        "images_per_s": round(images_per_s, 2),
    }
    if device.type == "cuda":
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        record["tflops"] = round(flops * images_per_s / 1e12, 2)
    return [record]
