"""Training speed: full SSL iterations/s on synthetic pre-collated batches with the config's real crop shapes.

One timed iteration = schedules + zero_grad + forward_backward (which copies the pinned CPU batch to the device;
with `train.prefetch_to_device`, as in training, the batch was already copied on a side stream during the previous
iteration, and the next one's copy is queued) + (scaler unscale) + clip + step + EMA update + loss `.item()` (a host
sync, so every iteration is complete when its time is taken). The data pipeline is not timed (see the `data`
benchmark). `--runs` repeats warm-up + timed iterations on the same model; the record gives every run's mean and
their mean. Prints images/s from the mean and the median iteration time, peak CUDA memory, model TFLOP/s and MFU
(with --peak-tflops, or the device's known dense fp16/bf16 peak). The protocol of the GPU figures in the README:
`--warmup 10 --iterations 50 --runs 2`.

Every record also has `host_ms_per_iter`: the host time per phase of the timed iterations (`teacher` and `backward`
are parts of `forward_backward`), and `device_wait`, the time the closing `.item()` waits for the device. A
`device_wait` near 0 means the device waits for the host instead (launch-bound: fewer kernels or less Python help);
a large one means the device is the bottleneck.

`--profile DIR` then profiles `--profile-iterations` more iterations with the PyTorch profiler and writes a Chrome
trace and the operator table (sorted by device time on CUDA, CPU time otherwise) to DIR; the record gains kernels
(CUDA) or aten ops (CPU) per iteration and, on CUDA, the fraction of wall time during which a kernel was running.

Model FLOPs per iteration (matmul FLOPs = 2 x multiply-accumulates; attention scores and attention x values
included; norms, softmax and element-wise ops not counted):
    F = F_fwd(teacher backbone, 2B global crops) + F_fwd(teacher heads, 2B cls + masked-token buffer)
      + 3 x [F_fwd(student backbone, 2B global + n_local*B local crops) + F_fwd(student heads, all head tokens)]
(backward = 2 x forward; activation checkpointing's recomputation is not counted). Backbone forward per image with
T tokens (patches + cls + registers), width D, depth L: 2 * n_patches * (3 * p^2) * D  +  L * (2 * T * M_block +
4 * T^2 * D), where M_block is the sum of in x out over the Linear layers of one block (qkv, proj, MLP or SwiGLU).
Heads: 2 * tokens * sum of in x out over the head's Linear layers.
"""

import argparse
import itertools
import random
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

import dinov2.distributed as distributed
from dinov2.data import collate_data_and_cast
from dinov2.data.collate import mask_args_from_cfg
from dinov2.data.prefetcher import DevicePrefetcher
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import apply_optim_scheduler, build_optimizer, build_schedulers, input_dtype, optimizer_step
from dinov2.utils.config import apply_scaling_rules_to_cfg, get_cfg_from_args

from .profiling import profile_iterations

# Dense fp16/bf16 tensor-core peaks (TFLOP/s) for MFU when --peak-tflops is not given.
KNOWN_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "V100": 125.0, "L40S": 362.1, "A10": 125.0}
NUM_SYNTHETIC_BATCHES = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", default="dinov2/configs/train/bbu_sample.yaml", help="training config")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first, in every run")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per run")
    parser.add_argument("--runs", type=int, default=1, help="warm-up + timed runs on the same model")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--profile", default=None, metavar="DIR", help="write a profiler trace and table to DIR")
    parser.add_argument("--profile-iterations", type=int, default=3, help="iterations under the profiler")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def backbone_forward_flops(backbone: nn.Module, img_size: int, n_images: int) -> int:
    patch = backbone.patch_size
    n_patches = (img_size // patch) ** 2
    n_tokens = n_patches + 1 + getattr(backbone, "num_register_tokens", 0)
    dim = backbone.embed_dim
    blocks = [m for m in backbone.modules() if type(m).__name__ in ("Block", "NestedTensorBlock")]
    per_image = 2 * n_patches * 3 * patch * patch * dim
    per_image += sum(2 * n_tokens * _linear_macs(b) + 4 * n_tokens * n_tokens * dim for b in blocks)
    return per_image * n_images


def iteration_flops(model: SSLMetaArch, cfg: DictConfig, batch: Dict) -> int:
    """Model FLOPs of one training iteration (formula in the module docstring)."""
    b = cfg.train.batch_size_per_gpu
    n_local = cfg.crops.local_crops_number
    n_cls_teacher = 2 * b
    buffer = batch["upperbound"]
    backbone = model.student.backbone
    teacher_backbone = backbone_forward_flops(backbone, cfg.crops.global_crops_size, 2 * b)
    student_backbone = teacher_backbone + backbone_forward_flops(backbone, cfg.crops.local_crops_size, n_local * b)
    dino_macs = _linear_macs(model.student.dino_head)
    if model.do_ibot and model.ibot_separate_head:
        ibot_macs = _linear_macs(model.student.ibot_head)
        teacher_heads = 2 * (n_cls_teacher * dino_macs + buffer * ibot_macs)
        student_heads = 2 * ((n_local * b + 2 * b) * dino_macs + buffer * ibot_macs)
    else:
        masked = buffer if model.do_ibot else 0
        teacher_heads = 2 * (n_cls_teacher + masked) * dino_macs
        student_heads = 2 * (n_local * b + 2 * b + masked) * dino_macs
    return teacher_backbone + teacher_heads + 3 * (student_backbone + student_heads)


def synthetic_batch(cfg: DictConfig, dtype: torch.dtype, generator: torch.Generator) -> Dict:
    """A batch from `collate_data_and_cast` on random crops of the configured sizes (real iBOT masks)."""
    g, loc = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    samples = []
    for _ in range(cfg.train.batch_size_per_gpu):
        crops = {
            "global_crops": [torch.randn(3, g, g, generator=generator) for _ in range(2)],
            "local_crops": [torch.randn(3, loc, loc, generator=generator) for _ in range(cfg.crops.local_crops_number)],
        }
        samples.append((crops, ()))
    return collate_data_and_cast(samples, dtype=dtype, **mask_args_from_cfg(cfg))


def synthetic_batches(cfg: DictConfig, dtype: torch.dtype, count: int = NUM_SYNTHETIC_BATCHES) -> List[Dict]:
    """`count` batches from the seed `train.seed` (the same crops and masks for any dtype), pinned on CUDA hosts."""
    random.seed(int(cfg.train.seed))  # the iBOT mask draws
    generator = torch.Generator().manual_seed(int(cfg.train.seed))
    batches = [synthetic_batch(cfg, dtype, generator) for _ in range(count)]
    if torch.cuda.is_available():
        batches = [{k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
    return batches


def load_cfg(config_file: str, opts: List[str]) -> DictConfig:
    cfg = get_cfg_from_args(argparse.Namespace(config_file=config_file, opts=opts, output_dir=""))
    apply_scaling_rules_to_cfg(cfg)
    return cfg


class HostPhases:
    """Host seconds per named phase, summed while `enabled`; phases may nest."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)
        self.enabled = False

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.enabled:
                self.seconds[name] += time.perf_counter() - start

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(name):
                return fn(*args, **kwargs)

        return timed


def build_training(
    cfg: DictConfig, phases: Optional[HostPhases] = None
) -> Tuple[SSLMetaArch, Callable[[int], Dict[str, torch.Tensor]], List[Dict]]:
    """Model (as do_train prepares it, on CUDA if available) seeded by `train.seed`, and `step(it)`: one full training
    iteration of do_train's maths on synthetic batch `it % NUM_SYNTHETIC_BATCHES`, returning the loss dict (on the
    device); call it with it = 0, 1, 2, ... (`train.prefetch_to_device` hands the batches out in that order). With
    `phases`, the host time of each phase of `step` is added to it."""
    distributed.enable(overwrite=True)
    torch.manual_seed(int(cfg.train.seed))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = SSLMetaArch(cfg).to(device)
    model.prepare_for_distributed_training()
    model.train()
    optimizer = build_optimizer(cfg, model.get_params_groups())
    schedules = build_schedulers(cfg)
    batches = synthetic_batches(cfg, input_dtype(cfg))
    cycled = (batches[it % len(batches)] for it in itertools.count())
    feed = DevicePrefetcher(cycled, device) if cfg.train.prefetch_to_device else cycled
    phases = phases if phases is not None else HostPhases()
    model._teacher_targets = phases.wrap(model._teacher_targets, "teacher")
    model.backprop_loss = phases.wrap(model.backprop_loss, "backward")

    def step(it: int) -> Dict[str, torch.Tensor]:
        with phases("schedules"):
            lr, wd, mom, teacher_temp, last_layer_lr, backbone_lr = (float(s[it]) for s in schedules)
            apply_optim_scheduler(optimizer, lr, wd, last_layer_lr, backbone_lr)
            optimizer.zero_grad(set_to_none=True)
        with phases("forward_backward"):
            loss_dict = model.forward_backward(next(feed), teacher_temp=teacher_temp)
        with phases("optimizer"):
            optimizer_step(model, optimizer, cfg.optim.clip_grad)
        with phases("ema"):
            model.update_teacher(mom)
        return loss_dict

    return model, step, batches


def _peak_tflops(args: argparse.Namespace, device: torch.device) -> Optional[float]:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), None)


def run(args: argparse.Namespace) -> List[Dict]:
    cfg = load_cfg(args.config_file, args.opts)
    phases = HostPhases()
    model, step, batches = build_training(cfg, phases)
    device = model.device
    use_cuda = device.type == "cuda"

    def timed_step(it: int) -> float:
        loss = step(it)["total_loss"]
        with phases("device_wait"):
            return loss.item()

    it = 0
    run_means, times = [], []
    for _ in range(args.runs):
        for _ in range(args.warmup):
            timed_step(it)
            it += 1
        if use_cuda:
            torch.cuda.reset_peak_memory_stats()
        run_times = []
        phases.enabled = True
        for _ in range(args.iterations):
            start = time.perf_counter()
            timed_step(it)
            run_times.append(time.perf_counter() - start)
            it += 1
        phases.enabled = False
        run_means.append(statistics.mean(run_times))
        times += run_times

    b = cfg.train.batch_size_per_gpu
    mean_t, median_t = statistics.mean(times), statistics.median(times)
    flops = iteration_flops(model, cfg, batches[0])
    tflops = flops / mean_t / 1e12
    peak = _peak_tflops(args, device)
    record = {
        "benchmark": "train",
        "config": args.config_file,
        "overrides": list(args.opts),
        "device": torch.cuda.get_device_name(device) if use_cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "arch": cfg.student.arch,
        "patch_size": int(cfg.student.patch_size),
        "batch_size": b,
        "crops": f"2x{cfg.crops.global_crops_size} + {cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}",
        "dtype": str(input_dtype(cfg)).replace("torch.", ""),
        "grad_scaler": model.fp16_scaler is not None,
        "compile": bool(cfg.train.compile),
        "compile_loss": bool(cfg.train.compile_loss),
        "activation_checkpointing": bool(cfg.train.activation_checkpointing),
        "release_teacher_copy": bool(cfg.train.release_teacher_copy),
        "prefetch_to_device": bool(cfg.train.prefetch_to_device),
        "warmup": args.warmup,
        "iterations": args.iterations,
        "runs": args.runs,
        "images_per_s_runs": [round(b / t, 2) for t in run_means],
        "iter_time_mean_s": round(mean_t, 4),
        "iter_time_median_s": round(median_t, 4),
        "images_per_s_mean": round(b / mean_t, 2),
        "images_per_s_median": round(b / median_t, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if use_cuda else None,
        "model_gflop_per_iter": round(flops / 1e9, 2),
        "model_tflops": round(tflops, 4),
        "mfu": round(tflops / peak, 4) if peak else None,
        "host_ms_per_iter": {k: round(1e3 * v / len(times), 3) for k, v in phases.seconds.items()},
    }
    if args.profile:
        tag = f"train_{cfg.student.arch}_{record['dtype']}"
        record["profile"] = profile_iterations(timed_step, it, args.profile_iterations, args.profile, tag)
    return [record]
