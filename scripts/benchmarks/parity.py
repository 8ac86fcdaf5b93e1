"""Loss parity: the configured (fast) training path against the reference path over the same iterations.

Both runs start from the same seed (same initial weights, same synthetic batches of the `train` benchmark, same
stochastic-depth draws) and do `--iterations` full training iterations. The reference run is the same config with
every FSDP mixed-precision dtype set to fp32, no grad scaler, TF32 off and the speed switches `train.compile`,
`train.compile_loss` and `train.activation_checkpointing` off. When the fast run compiles, inductor is told to draw
random numbers as eager does (`fallback_random`), so that both runs drop the same samples in stochastic depth.

Mixed precision alone moves the losses: on an untrained model most of all KoLeo, -log of the distances between
almost equal class tokens. When the fast run uses speed switches, a third run measures that: the fast config's
precision without the switches, i.e. upstream's maths in mixed precision. The allowance of a loss term is then
`--mp-factor` x its largest |mixed - reference| over the run.

The record lists the loss curves and, per term, the largest |fast - reference|, |mixed - reference| and
|fast - mixed| over the iterations; the run passes when |fast - reference| is at most
`--atol + --rtol * |reference| + allowance` at every iteration (`scripts/benchmark.py` exits with 1 otherwise, so
scripts can gate on it). Without speed switches the allowance is 0: the check is then that of plain tolerances.
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
# the train.* keys that must not change the maths
SPEED_SWITCHES = ("compile", "compile_loss", "activation_checkpointing")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", default="dinov2/configs/train/bbu_sample.yaml", help="training config")
    parser.add_argument("--iterations", type=int, default=20, help="training iterations compared")
    parser.add_argument("--rtol", type=float, default=0.02, help="relative tolerance per loss term")
    parser.add_argument("--atol", type=float, default=0.01, help="absolute tolerance per loss term")
    parser.add_argument("--mp-factor", type=float, default=2.0,
                        help="allowance = this x the drift of mixed precision alone (with speed switches on)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value (the fast path)")


def reference_cfg(cfg: DictConfig) -> DictConfig:
    """`cfg` with fp32 everywhere, no grad scaler and no speed switches."""
    ref = mixed_cfg(cfg)
    ref.compute_precision = fp32_precision(cfg.compute_precision)
    ref.compute_precision.grad_scaler = False
    return ref


def mixed_cfg(cfg: DictConfig) -> DictConfig:
    """`cfg` without the speed switches: its precision, upstream's maths."""
    mixed = copy.deepcopy(cfg)
    for key in SPEED_SWITCHES:
        mixed.train[key] = False
    return mixed


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


def _max_abs_diff(a: List[List[float]], b: List[List[float]]) -> Dict[str, float]:
    return {key: max(abs(x[j] - y[j]) for x, y in zip(a, b)) for j, key in enumerate(METRIC_KEYS)}


def run(args: argparse.Namespace) -> List[Dict]:
    cfg = load_cfg(args.config_file, args.opts)
    reference = loss_curve(reference_cfg(cfg), args.iterations, reference=True)
    fast = loss_curve(cfg, args.iterations, reference=False)
    switches = any(cfg.train[key] for key in SPEED_SWITCHES)
    mixed = loss_curve(mixed_cfg(cfg), args.iterations, reference=False) if switches else None
    max_abs = _max_abs_diff(fast, reference)
    allowance = {key: 0.0 for key in METRIC_KEYS}
    record_mixed = {}
    if mixed is not None:
        drift = _max_abs_diff(mixed, reference)
        allowance = {key: args.mp_factor * d for key, d in drift.items()}
        record_mixed = {"mixed": mixed, "mixed_max_abs_diff": drift,
                        "fast_vs_mixed_max_abs_diff": _max_abs_diff(fast, mixed)}  # fmt: skip
    within = all(
        abs(f[j] - r[j]) <= args.atol + args.rtol * abs(r[j]) + allowance[key]
        for j, key in enumerate(METRIC_KEYS)
        for f, r in zip(fast, reference)
    )
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
        **record_mixed,
        "max_abs_diff": max_abs,
        "rtol": args.rtol,
        "atol": args.atol,
        "mp_factor": args.mp_factor,
        "allowance": allowance,
        "within_tolerance": within,
    }
    return [record]
