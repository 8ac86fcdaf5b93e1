"""Loss parity: the configured (fast) training path against the reference path over the same iterations.

Both runs start from the same seed (same initial weights, same synthetic batches of the `train` benchmark, same
stochastic-depth draws) and do `--iterations` full training iterations. The reference run is the same config with
every FSDP mixed-precision dtype set to fp32, no grad scaler, TF32 off, `train.compile=false` and
`train.activation_checkpointing=false`. When the fast run compiles, inductor is told to draw random numbers as eager
does (`fallback_random`), so that both runs drop the same samples in stochastic depth.

The record lists both loss curves and, per loss term, the largest |fast - reference| over the iterations; the run
passes when that is at most `--atol + --rtol * |reference|` at every iteration (`scripts/benchmark.py` exits with 1
otherwise, so scripts can gate on it). Mixed precision makes single iterations differ by ~1e-3 relative; the defaults allow that drift.
"""

import argparse
import contextlib
import copy
from typing import Dict, Iterator, List

import torch
from omegaconf import DictConfig

from dinov2.train.ssl_meta_arch import LOSS_KEYS, fp32_precision

from .train import build_training, load_cfg

METRIC_KEYS = ("total_loss",) + LOSS_KEYS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", default="dinov2/configs/train/bbu_sample.yaml", help="training config")
    parser.add_argument("--iterations", type=int, default=20, help="training iterations compared")
    parser.add_argument("--rtol", type=float, default=0.02, help="relative tolerance per loss term")
    parser.add_argument("--atol", type=float, default=0.01, help="absolute tolerance per loss term")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value (the fast path)")


def reference_cfg(cfg: DictConfig) -> DictConfig:
    """`cfg` with fp32 everywhere, no grad scaler, no compile and no activation checkpointing."""
    ref = copy.deepcopy(cfg)
    ref.compute_precision = fp32_precision(cfg.compute_precision)
    ref.compute_precision.grad_scaler = False
    ref.train.compile = False
    ref.train.activation_checkpointing = False
    return ref


@contextlib.contextmanager
def _numerics(reference: bool, compiled: bool) -> Iterator[None]:
    """TF32 off for the reference run; eager-identical random numbers in compiled graphs for the fast run."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    import torch._inductor.config as inductor_config

    saved_fallback = inductor_config.fallback_random
    try:
        if reference:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        if compiled:
            inductor_config.fallback_random = True
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        inductor_config.fallback_random = saved_fallback


def loss_curve(cfg: DictConfig, iterations: int, reference: bool) -> List[List[float]]:
    """Per iteration, the METRIC_KEYS values of `iterations` training iterations of `cfg` from its seed."""
    with _numerics(reference, bool(cfg.train.compile)):
        _, step, _ = build_training(cfg)
        curve = []
        for it in range(iterations):
            losses = step(it)
            curve.append(torch.stack([losses[k].float() for k in METRIC_KEYS]).tolist())
    return curve


def run(args: argparse.Namespace) -> List[Dict]:
    cfg = load_cfg(args.config_file, args.opts)
    reference = loss_curve(reference_cfg(cfg), args.iterations, reference=True)
    fast = loss_curve(cfg, args.iterations, reference=False)
    max_abs, within = {}, True
    for j, key in enumerate(METRIC_KEYS):
        diffs = [abs(f[j] - r[j]) for f, r in zip(fast, reference)]
        max_abs[key] = max(diffs)
        within &= all(d <= args.atol + args.rtol * abs(r[j]) for d, r in zip(diffs, reference))
    record = {
        "benchmark": "parity",
        "config": args.config_file,
        "overrides": list(args.opts),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "iterations": args.iterations,
        "keys": list(METRIC_KEYS),
        "reference": reference,
        "fast": fast,
        "max_abs_diff": max_abs,
        "rtol": args.rtol,
        "atol": args.atol,
        "within_tolerance": within,
    }
    return [record]
