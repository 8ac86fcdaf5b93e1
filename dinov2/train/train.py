"""DINOv2 self-supervised pretraining loop (single process, torchrun or SLURM).

    python dinov2/train/train.py --config-file CFG --output-dir OUT [--no-resume] [--eval-only] [key=value ...]
    torchrun --nproc_per_node=N dinov2/train/train.py ...

Schedules are indexed by iteration over `optim.epochs * train.OFFICIAL_EPOCH_LENGTH` iterations. Checkpoints
(model, optimizer, grad scaler, iteration and RNG states, one file per rank) are written every
`train.checkpoint_period` iterations; a run resumes by default from the newest complete checkpoint in the output
directory (or from `MODEL.WEIGHTS`), replaying the exact data order and random draws of an uninterrupted run.
The EMA teacher is saved as `<out>/eval/training_<iter>/teacher_checkpoint.pth` every
`evaluation.eval_period_iterations` iterations and at the end.
"""

import argparse
import logging
import os
import random
import time
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import get_model_state_dict

import dinov2.distributed as distributed
from dinov2.configs import ConfigError
from dinov2.data import SamplerType, collate_data_and_cast, make_data_loader, make_dataset
from dinov2.data.augmentations import make_augmentation_from_cfg
from dinov2.data.collate import mask_args_from_cfg
from dinov2.data.datasets.extended import ExtendedVisionDataset
from dinov2.data.gpu_augmentations import EncodedCropsTransform, GPUMultiCropAugmentation, collate_encoded_crops
from dinov2.data.prefetcher import DevicePrefetcher
from dinov2.fsdp import FSDPCheckpointer, PeriodicCheckpointer, is_fsdp
from dinov2.fsdp import clip_grad_norm_ as fsdp_clip_grad_norm_
from dinov2.fsdp.checkpointer import full_state_dict_options, get_rng_state, set_rng_state
from dinov2.logging import MetricLogger, SmoothedValue
from dinov2.train import ssl_meta_arch
from dinov2.train.ssl_meta_arch import LOSS_KEYS, TARGET_KEYS, SSLMetaArch
from dinov2.utils.config import setup
from dinov2.utils.dtype import as_torch_dtype
from dinov2.utils.utils import CosineScheduler, atomic_write

torch.backends.cuda.matmul.allow_tf32 = True  # PyTorch 1.12 sets this to False by default
logger = logging.getLogger("dinov2")

METRIC_KEYS = ("total_loss",) + LOSS_KEYS + TARGET_KEYS
SCHEDULE_KEYS = ("lr", "wd", "mom", "last_layer_lr", "current_batch_size")  # logged beside the metrics
UNIFORM_TARGETS = 0.99  # dino_target_entropy (fraction of ln K) at or above which the targets count as uniform
ONE_PROTOTYPE = 2.0  # dino_target_prototypes below which every image counts as going to the same prototype


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINOv2 training", add_help=add_help)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="Start fresh instead of resuming from the newest checkpoint in --output-dir",
    )
    parser.add_argument("--eval-only", action="store_true", help="Only save the teacher of the loaded checkpoint")
    parser.add_argument(
        "--output-dir", "--output_dir", default="", type=str, help="Output directory to save logs and checkpoints"
    )
    parser.add_argument(
        "opts",
        help="Modify config options at the end of the command, e.g. optim.epochs=10 (OmegaConf dotlist)",
        default=None,
        nargs=argparse.REMAINDER,
    )
    return parser


def no_target(_: Any) -> Tuple:
    """SSL needs no labels (module-level so DataLoader workers can pickle it)."""
    return ()


def build_optimizer(cfg: DictConfig, params_groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    """Fused AdamW (one kernel per parameter group and dtype; on the CPU too, where it is ~7x faster than foreach):
    the grad scaler hands it its found-inf flag, so a skipped fp16 step needs no host synchronisation."""
    return torch.optim.AdamW(params_groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), fused=True)


def build_schedulers(cfg: DictConfig) -> Tuple[CosineScheduler, ...]:
    """(lr, wd, momentum, teacher_temp, last_layer_lr, backbone_lr) schedules, indexed by iteration. The student
    backbone's is lr's with `optim.freeze_backbone_epochs` of zeros first, then a warmup of its own."""
    epoch_len = cfg.train.OFFICIAL_EPOCH_LENGTH
    total_iters = cfg.optim.epochs * epoch_len
    lr = dict(
        base_value=cfg.optim.lr,
        final_value=cfg.optim.min_lr,
        total_iters=total_iters,
        warmup_iters=cfg.optim.warmup_epochs * epoch_len,
        start_warmup_value=0,
    )
    lr_schedule = CosineScheduler(**lr)
    wd_schedule = CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total_iters)
    momentum_schedule = CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total_iters)
    teacher_warmup = cfg.teacher.warmup_teacher_temp_epochs * epoch_len
    teacher_temp_schedule = CosineScheduler(
        base_value=cfg.teacher.teacher_temp,
        final_value=cfg.teacher.teacher_temp,
        total_iters=teacher_warmup,
        warmup_iters=teacher_warmup,
        start_warmup_value=cfg.teacher.warmup_teacher_temp,
    )
    last_layer_lr_schedule = CosineScheduler(**lr)
    last_layer_lr_schedule.schedule[: cfg.optim.freeze_last_layer_epochs * epoch_len] = 0  # frozen head last layer
    freeze_backbone = cfg.optim.freeze_backbone_epochs
    if not 0 <= freeze_backbone <= cfg.optim.epochs - cfg.optim.warmup_epochs:
        raise ValueError(f"optim.freeze_backbone_epochs must be between 0 and optim.epochs - optim.warmup_epochs "
                         f"({cfg.optim.epochs} - {cfg.optim.warmup_epochs}), got {freeze_backbone}")
    backbone_lr_schedule = CosineScheduler(**lr, freeze_iters=freeze_backbone * epoch_len)
    logger.info("Schedulers ready.")
    return (lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule, last_layer_lr_schedule,
            backbone_lr_schedule)


def apply_optim_scheduler(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float,
                          backbone_lr: float) -> None:
    """Set each group's learning rate and weight decay for this iteration: heads' last layers follow `last_layer_lr`,
    the student backbone `backbone_lr`, the rest `lr` (AdamW's decoupled decay scales with the group's rate, so a
    rate of 0 leaves the group's parameters as they are)."""
    for param_group in optimizer.param_groups:
        param_group["weight_decay"] = wd * param_group["wd_multiplier"]
        if param_group["is_last_layer"]:
            base = last_layer_lr
        elif param_group.get("is_backbone", False):  # absent in the optimizer states of older checkpoints
            base = backbone_lr
        else:
            base = lr
        param_group["lr"] = base * param_group["lr_multiplier"]


def teacher_state_dict(model: SSLMetaArch) -> Dict[str, torch.Tensor]:
    """The full (gathered) teacher state dict (for CUDA models on CPU on rank 0 and empty elsewhere, see
    `full_state_dict_options`), in the model's own block layout as upstream writes it: `blocks.<chunk>.<i>.` keys
    with `student.block_chunks` > 0, so upstream's evaluation code, which builds the backbone from the run's config
    and loads non-strictly, finds every block. This codebase's loaders take both layouts.

    A collective under FSDP: call it on every rank."""
    state: Dict[str, torch.Tensor] = {}
    for name, module in model.teacher.items():
        options = full_state_dict_options(module)
        for k, v in get_model_state_dict(module, options=options).items():
            state[f"{name}.{k}"] = v
    return state


def do_test(cfg: DictConfig, model: SSLMetaArch, iteration: str) -> Optional[str]:
    """Save the consolidated teacher as `{"teacher": state_dict}` (rank 0) for the eval scripts and the hub."""
    state = teacher_state_dict(model)
    if not distributed.is_main_process():
        return None
    path = os.path.join(cfg.train.output_dir, "eval", iteration, "teacher_checkpoint.pth")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: torch.save({"teacher": state}, f))
    logger.info(f"Saved teacher checkpoint to {path}")
    return path


class BatchSeededCollate:
    """Collate function + worker_init_fn that seed torch/numpy/random per batch in DataLoader workers.

    The DataLoader hands batch k of an iterator to worker k % num_workers, in order. Each worker reseeds from
    (seed, rank, global batch index) before producing a batch, so the augmentations and masks of batch i do not
    depend on where the iterator started: a run resumed at iteration i draws what an uninterrupted run drew.
    """

    def __init__(self, collate_fn: Callable, seed: int, rank: int, first_batch: int, num_workers: int) -> None:
        self.collate_fn = collate_fn
        self.seed = seed
        self.rank = rank
        self.first_batch = first_batch
        self.num_workers = num_workers
        self._next_batch = first_batch

    def _reseed(self) -> None:
        state = np.random.SeedSequence([self.seed, self.rank, self._next_batch]).generate_state(2)
        torch.manual_seed(int(state[0]))
        random.seed(int(state[1]))
        np.random.seed(int(state[1]))

    def worker_init_fn(self, worker_id: int) -> None:
        self._next_batch = self.first_batch + worker_id
        self._reseed()

    def __call__(self, samples: List[Any]) -> Dict[str, Any]:
        batch = self.collate_fn(samples)
        self._next_batch += self.num_workers
        self._reseed()
        return batch


def build_data_loader(cfg: DictConfig, start_iter: int, inputs_dtype: torch.dtype) -> torch.utils.data.DataLoader:
    """The SSL loader from `start_iter` on; with `crops.gpu_augmentation` its batches still need
    `GPUMultiCropAugmentation` (bytes and crop parameters instead of crops)."""
    mask_args = mask_args_from_cfg(cfg)
    transform: Callable = make_augmentation_from_cfg(cfg)
    if cfg.crops.gpu_augmentation:
        transform = EncodedCropsTransform(transform)
        collate_fn: Callable = partial(collate_encoded_crops, **mask_args)
    else:
        collate_fn = partial(collate_data_and_cast, dtype=inputs_dtype, **mask_args)
    num_workers = cfg.train.num_workers
    seeded = None
    if num_workers > 0:
        seeded = BatchSeededCollate(
            collate_fn, int(cfg.train.seed), distributed.get_global_rank(), start_iter, num_workers
        )
        collate_fn = seeded
    dataset = make_dataset(dataset_str=cfg.train.dataset_path, transform=transform, target_transform=no_target)
    if cfg.crops.gpu_augmentation and not isinstance(dataset, ExtendedVisionDataset):
        raise ValueError(
            f"crops.gpu_augmentation needs a dataset of encoded image files; {cfg.train.dataset_path!r} gives a "
            f"{type(dataset).__name__}"
        )
    if cfg.crops.gpu_augmentation and dataset.skip_bad_images:
        logger.warning(
            "skip_bad_images with crops.gpu_augmentation: the loader workers read only each JPEG's header, so a JPEG "
            "broken past its header is found when the training process decodes it, where it stops the run naming "
            "the file instead of being replaced; `python -m dinov2.data.check` without --no-decode finds them first"
        )
    data_loader = make_data_loader(
        dataset=dataset,
        batch_size=cfg.train.batch_size_per_gpu,
        num_workers=num_workers,
        shuffle=True,
        seed=int(cfg.train.seed),
        sampler_type=SamplerType.SHARDED_INFINITE,
        sampler_advance=start_iter * cfg.train.batch_size_per_gpu,
        drop_last=True,
        collate_fn=collate_fn,
    )
    if seeded is not None:
        data_loader.worker_init_fn = seeded.worker_init_fn
    return data_loader


class LossMonitor:
    """Loss sums over the logging window kept on the device, plus a NaN/inf guard that needs no per-iteration sync.

    `add` records the losses of one iteration and, on the device, the first iteration whose total loss was not
    finite with its loss terms. `sync` (at log / checkpoint / eval iterations) reduces across ranks once, raises
    FloatingPointError naming that iteration and every loss term if any rank saw a non-finite total, and returns
    the window means.
    """

    def __init__(self, device: torch.device) -> None:
        self.window = torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=device)
        self.count = 0
        self.first_bad_iter = torch.full((), -1, dtype=torch.long, device=device)
        self.first_bad_terms = torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=device)

    def add(self, iteration: int, loss_dict: Dict[str, torch.Tensor]) -> None:
        terms = torch.stack([loss_dict[k].to(torch.float64) for k in METRIC_KEYS])
        newly_bad = ~torch.isfinite(terms[0]) & (self.first_bad_iter < 0)
        bad_iter = torch.full_like(self.first_bad_iter, iteration)
        self.first_bad_iter = torch.where(newly_bad, bad_iter, self.first_bad_iter)
        self.first_bad_terms = torch.where(newly_bad, terms, self.first_bad_terms)
        self.window += terms
        self.count += 1

    def sync(self) -> Dict[str, float]:
        bad = (self.first_bad_iter >= 0).to(torch.float64).reshape(1)
        reduced = torch.cat([self.window / max(self.count, 1), bad])
        if distributed.is_multi_process():
            torch.distributed.all_reduce(reduced)
            reduced[:-1] /= distributed.get_global_size()
        values = reduced.tolist()
        if values[-1] > 0:
            first_bad = int(self.first_bad_iter.item())
            if first_bad >= 0:
                terms = ", ".join(f"{k}={v}" for k, v in zip(METRIC_KEYS, self.first_bad_terms.tolist()))
                msg = f"Non-finite total loss at iteration {first_bad}: {terms}"
            else:
                msg = "Non-finite total loss on another rank (see its log)"
            logger.error(msg)
            raise FloatingPointError(msg)
        self.window.zero_()
        self.count = 0
        return dict(zip(METRIC_KEYS, values[:-1]))


def collapse_warning(metrics: Dict[str, float], n_prototypes: int) -> Optional[str]:
    """A warning when the logged DINO target statistics show a collapsed image-level head, else None."""
    entropy, prototypes = metrics["dino_target_entropy"], metrics["dino_target_prototypes"]
    if entropy >= UNIFORM_TARGETS:
        what = (f"the DINO targets are almost uniform (entropy {entropy:.4f} of ln {n_prototypes}): the head tells no "
                "image from another")
    elif prototypes < ONE_PROTOTYPE:
        what = f"every image goes to the same DINO prototype (effective prototypes in a batch: {prototypes:.2f})"
    else:
        return None
    return (f"Collapse: {what}, and only the other losses train the backbone (seen on small datasets and small "
            "batches: dinov2 #143, #407). Larger batches, fewer prototypes (dino.head_n_prototypes), a sharper "
            "teacher (teacher.teacher_temp) or the other centring (train.centering) are what to try.")


def clip_gradients(model: SSLMetaArch, max_norm: float) -> None:
    """Clip each student submodule's gradient norm (over all shards for FSDP modules)."""
    for module in model.student.values():
        if is_fsdp(module):
            fsdp_clip_grad_norm_(module, max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


def optimizer_step(model: SSLMetaArch, optimizer: torch.optim.Optimizer, clip_grad: float) -> None:
    """Gradient clipping (on unscaled gradients) and the optimizer step, through the grad scaler if there is one.

    The scaler always unscales here, clipping or not: `ShardedGradScaler.unscale_` is where the found-inf flags are
    summed over the ranks, and `step` on a fused optimizer would otherwise set them per rank, so one rank's overflow
    would let the other ranks step and their loss scales drift apart."""
    scaler = model.fp16_scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        clip_gradients(model, clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _needs_sync(iteration: int, max_iter: int, periods: Sequence[int]) -> bool:
    return iteration == max_iter - 1 or any(p > 0 and (iteration + 1) % p == 0 for p in periods)


def input_dtype(cfg: DictConfig) -> torch.dtype:
    """dtype of the collated crops: the student backbone's param dtype with mixed precision (CUDA), else fp32."""
    if not ssl_meta_arch.mixed_precision_enabled():
        return torch.float32
    return as_torch_dtype(cfg.compute_precision.student.backbone.mixed_precision.param_dtype)


def do_train(cfg: DictConfig, model: SSLMetaArch, resume: bool = False) -> Dict[str, float]:
    """Train until `optim.epochs * OFFICIAL_EPOCH_LENGTH` iterations; returns the last logged metrics."""
    for key, nullable in (("checkpoint_period", True), ("log_period", False)):
        value = cfg.train[key]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.{key} must be a number of iterations >= 1" + (" or null" if nullable else "")
                              + f", got {value!r}")  # fmt: skip
    model.train()
    inputs_dtype = input_dtype(cfg)
    fp16_scaler = model.fp16_scaler

    optimizer = build_optimizer(cfg, model.get_params_groups())
    (lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule, last_layer_lr_schedule,
     backbone_lr_schedule) = build_schedulers(cfg)

    epoch_len = cfg.train.OFFICIAL_EPOCH_LENGTH
    max_iter = cfg.optim.epochs * epoch_len
    checkpoint_period = cfg.train.checkpoint_period or 3 * epoch_len
    eval_period = cfg.evaluation.eval_period_iterations

    checkpointables: Dict[str, Any] = {"scaler": fp16_scaler} if fp16_scaler is not None else {}
    checkpointer = FSDPCheckpointer(
        model, cfg.train.output_dir, optimizer=optimizer, save_to_disk=True, **checkpointables
    )
    # resuming logs "Resumed training from checkpoint <rank 0 file> at iteration <last saved iteration>" on every rank
    start_iter = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume).get("iteration", -1) + 1
    periodic_checkpointer = PeriodicCheckpointer(
        checkpointer, period=checkpoint_period, max_iter=max_iter, max_to_keep=cfg.train.max_to_keep
    )

    data_loader = build_data_loader(cfg, start_iter, inputs_dtype)
    gpu_augmentation = None
    if cfg.crops.gpu_augmentation:
        gpu_augmentation = GPUMultiCropAugmentation(
            inputs_dtype, cfg.crops.gpu_decode_batch_size, side_stream=cfg.crops.gpu_side_stream
        )
    rng_state = get_rng_state()  # as restored from the checkpoint; iter() below draws the loader's base seed
    data_iter: Iterator[Dict[str, Any]] = iter(data_loader)
    set_rng_state(rng_state)
    if cfg.train.prefetch_to_device and cfg.train.num_workers > 0 and gpu_augmentation is None:
        data_iter = DevicePrefetcher(data_iter, model.device)

    logger.info(f"Starting training from iteration {start_iter} to {max_iter}")
    metrics_file = os.path.join(cfg.train.output_dir, "training_metrics.json")
    metric_logger = MetricLogger(delimiter="  ", output_file=metrics_file)
    metric_logger.drop_records_from(start_iter)  # a fresh start (--no-resume) or the iterations a crash logged twice
    # losses already averaged over the log window, and the schedules' values at the log iteration: the latest value
    # (a window of 20 updates, one every log_period iterations, would lag the schedules by 20 log periods)
    for key in METRIC_KEYS + SCHEDULE_KEYS + ("eta_seconds",):
        metric_logger.add_meter(key, SmoothedValue(window_size=1, fmt="{value:.4f}"))
    monitor = LossMonitor(model.device)
    log_period = cfg.train.log_period
    collapse_checked_from = cfg.teacher.warmup_teacher_temp_epochs * epoch_len  # once the teacher is at temperature
    collapse_reported = False
    last_metrics: Dict[str, float] = {}
    start_time = time.monotonic()

    iteration = start_iter
    for data in metric_logger.log_every(data_iter, log_period, "Training", max_iter, start_iter):
        if gpu_augmentation is not None:
            data = gpu_augmentation(data, model.device)
        current_batch_size = data["collated_global_crops"].shape[0] / 2
        # plain floats: numpy scalars in the optimizer state would not load with weights_only=True
        lr = float(lr_schedule[iteration])
        wd = float(wd_schedule[iteration])
        mom = float(momentum_schedule[iteration])
        teacher_temp = float(teacher_temp_schedule[iteration])
        last_layer_lr = float(last_layer_lr_schedule[iteration])
        backbone_lr = float(backbone_lr_schedule[iteration])
        apply_optim_scheduler(optimizer, lr, wd, last_layer_lr, backbone_lr)

        optimizer.zero_grad(set_to_none=True)
        loss_dict = model.forward_backward(data, teacher_temp=teacher_temp)
        optimizer_step(model, optimizer, cfg.optim.clip_grad)
        model.update_teacher(mom)

        monitor.add(iteration, loss_dict)
        is_log_iter = iteration % log_period == 0 or iteration == max_iter - 1
        if is_log_iter or _needs_sync(iteration, max_iter, (checkpoint_period, eval_period)):
            last_metrics = monitor.sync()  # raises on a NaN/inf total loss before anything is saved
            if is_log_iter:
                seconds_per_iter = (time.monotonic() - start_time) / (iteration + 1 - start_iter)
                metric_logger.update(lr=lr, wd=wd, mom=mom, last_layer_lr=last_layer_lr)
                metric_logger.update(current_batch_size=current_batch_size, **last_metrics)
                metric_logger.update(eta_seconds=seconds_per_iter * (max_iter - iteration - 1))
                warning = collapse_warning(last_metrics, cfg.dino.head_n_prototypes)
                if warning and iteration >= collapse_checked_from and not collapse_reported:
                    logger.warning(f"Iteration {iteration}: {warning}")  # once per run
                    collapse_reported = True

        if eval_period > 0 and (iteration + 1) % eval_period == 0 and iteration != max_iter - 1:
            do_test(cfg, model, f"training_{iteration}")
        periodic_checkpointer.step(iteration)
        iteration += 1

    if start_iter < max_iter:  # the final teacher (also when max_iter is a multiple of the eval period)
        do_test(cfg, model, f"training_{max_iter - 1}")
    metric_logger.synchronize_between_processes()
    return last_metrics


def main(args: argparse.Namespace) -> Optional[Dict[str, float]]:
    cfg = setup(args)
    model = SSLMetaArch(cfg).to(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    model.prepare_for_distributed_training()
    logger.info(f"Model:\n{model}")

    if args.eval_only:
        checkpointer = FSDPCheckpointer(model, save_dir=cfg.train.output_dir)
        iteration = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=not args.no_resume).get("iteration", -1) + 1
        do_test(cfg, model, f"manual_{iteration}")
        metrics = None
    else:
        metrics = do_train(cfg, model, resume=not args.no_resume)
    distributed.shutdown()
    return metrics


if __name__ == "__main__":
    main(get_args_parser(add_help=True).parse_args())
    distributed.exit_now(0)
