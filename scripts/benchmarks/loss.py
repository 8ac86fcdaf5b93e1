"""Loss-maths speed: the iBOT loss's row-wise work of one training iteration, eager or compiled (`train.compile_loss`).

One iteration = teacher targets (`softmax_center_teacher`: centre, temperature, softmax) and the centre update's batch
sum on `--rows` masked tokens x `--prototypes` logits in the heads' dtype, then the student's masked cross-entropy
(`forward_masked`) and its backward to the student logits. The token count cycles over the last 64 values up to
`--rows` and the teacher temperature changes every iteration, as in training, so a compiled run that recompiled
would show it in its time. On the default ViT-B/14 shape (about 5000 masked tokens of the anchor's protocol, 65536
prototypes) this is the part of the iteration the compiled loss fuses. The record has ms per iteration (mean over
the timed iterations, CUDA-synchronised), peak memory on CUDA and the last loss value, which must agree between eager
and compiled runs.
"""

import argparse
from typing import Dict, List

import torch

from dinov2.loss import iBOTPatchLoss
from dinov2.utils.utils import check_compile_options

from .timing import peak_memory_mib, timed_calls

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=4992, help="largest masked-token count (it cycles below it)")
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="dtype of the head outputs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="compile the loss maths (as train.compile_loss)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations (compiled during these)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations")


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.rows <= 64:
        raise SystemExit(f"--rows must be above 64, got {args.rows}")
    loss = iBOTPatchLoss(args.prototypes).to(device)
    if args.compile:
        loss.kernels.compile(check_compile_options(args.compile_backend, None, "--compile-backend")["backend"])
    generator = torch.Generator(device).manual_seed(0)
    teacher = torch.randn(args.rows, args.prototypes, generator=generator, device=device).to(dtype)
    student = torch.randn(args.rows, args.prototypes, generator=generator, device=device).to(dtype)

    losses: List[torch.Tensor] = []

    def iteration(it: int) -> None:
        n = args.rows - it % 64
        masks = torch.ones(n, 1, dtype=torch.bool, device=device)  # one masked token per "image": weights 1
        with torch.no_grad():
            targets = loss.softmax_center_teacher(teacher[:n].unsqueeze(0), teacher_temp=0.04 + 1e-4 * it).squeeze(0)
            loss.update_center(teacher[:n].unsqueeze(0))
        logits = student[:n].detach().requires_grad_()
        value = loss.forward_masked(logits, targets, masks)
        value.backward()
        losses.append(value.detach())

    seconds = timed_calls(iteration, args.warmup, args.iters, device)
    return [{
        "benchmark": "loss",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "rows": args.rows,
        "prototypes": args.prototypes,
        "dtype": args.dtype,
        "compile": args.compile,
        "ms_per_iter": round(1e3 * seconds / args.iters, 3),
        "peak_memory_mib": peak_memory_mib(device),
        "last_loss": round(float(losses[-1]), 6),
    }]  # fmt: skip
