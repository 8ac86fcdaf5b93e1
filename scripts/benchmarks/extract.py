"""Feature-extraction speed: images/s of the probes' extraction pass (class tokens of the last blocks + mean patch
token, inference mode) on synthetic normalised images, and peak memory on CUDA.

The backbone is randomly initialised from the default config with `--arch/--patch-size/--img-size`; data loading is
not measured (see the `data` benchmark). The first `--warmup` batches are not timed (with `--compile`, warm up
at least one batch: the graphs are built then). `--profile DIR` then profiles `--profile-iterations` more batches
(see `profiling.py`): trace, operator table, kernels per batch and GPU busy fraction on CUDA. `--cast-weights` runs
the backbone cast to `--dtype` (the probes' `--cast-weights`) instead of autocast over float32 weights.
"""

import argparse
from typing import Dict, List

import torch
from omegaconf import OmegaConf

from dinov2.configs import dinov2_default_config
from dinov2.eval.features import MAX_BLOCKS, ProbeFeatureModel
from dinov2.eval.utils import make_autocast_ctx
from dinov2.models import build_model_from_cfg
from dinov2.utils.utils import check_compile_options

from .profiling import profile_iterations
from .timing import peak_memory_mib, timed_calls

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="vit_small", help="vit_tiny, vit_small, vit_base, vit_large, vit_giant2")
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--img-size", type=int, default=224, help="input crop size (and position-embedding grid)")
    parser.add_argument("--num-register-tokens", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="autocast dtype (fp16 only on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches")
    parser.add_argument("--iters", type=int, default=3, help="timed batches")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks (compiled during warm-up)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --compile")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode with --compile, e.g. "
                        "max-autotune-no-cudagraphs (default: the backend's default)")  # fmt: skip
    parser.add_argument("--cast-weights", action="store_true",
                        help="run the backbone cast to --dtype instead of autocast over float32 weights")  # fmt: skip
    parser.add_argument("--profile", default=None, metavar="DIR", help="write a profiler trace and table to DIR")
    parser.add_argument("--profile-iterations", type=int, default=3, help="batches under the profiler")


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    device = torch.device(args.device)
    if args.dtype == "fp16" and device.type != "cuda":
        raise SystemExit("--dtype fp16 needs --device cuda (use bf16 or fp32 on CPU)")
    cfg = OmegaConf.create(dinov2_default_config)
    cfg.student.arch, cfg.student.patch_size = args.arch, args.patch_size
    cfg.student.num_register_tokens = args.num_register_tokens
    cfg.crops.global_crops_size = args.img_size
    torch.manual_seed(0)
    backbone, _ = build_model_from_cfg(cfg, only_teacher=True)
    backbone.eval().to(device)
    autocast_dtype = DTYPES[args.dtype]
    if args.cast_weights:
        backbone.to(autocast_dtype)
        autocast_dtype = torch.float32
    if args.compile:
        backbone.compile_blocks(**check_compile_options(args.compile_backend, args.compile_mode,
                                                        "--compile-backend", "--compile-mode"))  # fmt: skip
    n_blocks = min(MAX_BLOCKS, int(backbone.n_blocks))
    model = ProbeFeatureModel(backbone, n_blocks, make_autocast_ctx(autocast_dtype, device))
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    seconds = timed_calls(lambda _: model(images), args.warmup, args.iters, device)
    record = {
        "benchmark": "extract",
        "arch": args.arch,
        "patch_size": args.patch_size,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "n_blocks": n_blocks,
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "cast_weights": args.cast_weights,
        "torch": torch.__version__,
        "images_per_s": round(args.iters * args.batch_size / seconds, 2),
        "ms_per_batch": round(1000 * seconds / args.iters, 2),
        "peak_memory_mib": peak_memory_mib(device),
    }
    if args.profile:
        tag = f"extract_{args.arch}_{args.dtype}" + ("_cast" if args.cast_weights else "")
        record["profile"] = profile_iterations(lambda _: model(images), 0, args.profile_iterations, args.profile, tag)
    return [record]
