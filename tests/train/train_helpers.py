"""Shared helpers of the training tests: a tiny CPU configuration on the sample BBU data, in-process runs."""

import json
import os
import random
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import dinov2.distributed as distributed
from dinov2.configs import load_and_merge_config, merge_configs
from dinov2.data import MaskingGenerator, collate_data_and_cast

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE_CONFIG = os.path.join(REPO, "dinov2", "configs", "train", "bbu_sample.yaml")

# vit_tiny on 64 px global / 32 px local crops (16 + 4 patch tokens), small heads, 8 iterations of batch 4.
TINY = {
    "train.batch_size_per_gpu": 4,
    "train.num_workers": 0,
    "train.OFFICIAL_EPOCH_LENGTH": 4,
    "train.log_period": 1,
    "train.checkpoint_period": 4,
    "optim.epochs": 2,
    "optim.warmup_epochs": 1,
    "teacher.warmup_teacher_temp_epochs": 1,
    "crops.global_crops_size": 64,
    "crops.local_crops_size": 32,
    "crops.local_crops_number": 2,
    "dino.head_n_prototypes": 64,
    "dino.head_hidden_dim": 32,
    "dino.head_bottleneck_dim": 16,
    "ibot.head_n_prototypes": 48,
    "ibot.head_hidden_dim": 32,
    "ibot.head_bottleneck_dim": 16,
    "evaluation.eval_period_iterations": 1000,
}


def tiny_opts(data_root: Optional[str] = None, **overrides) -> List[str]:
    """key=value overrides of bbu_sample.yaml for the tiny set-up (`overrides` use '__' for '.')."""
    values = dict(TINY)
    if data_root is not None:
        values["train.dataset_path"] = f"BBU:root={data_root}:split=TRAIN"
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [f"{k}={v}" for k, v in values.items()]


def precision_opts(dtype: str, grad_scaler: bool, keys: tuple = ("param_dtype", "reduce_dtype")) -> List[str]:
    """Overrides setting the FSDP mixed-precision `keys` of every student/teacher module to `dtype` (bbu_sample.yaml
    is fp32) and the grad scaler."""
    return [f"compute_precision.grad_scaler={str(grad_scaler).lower()}"] + [
        f"compute_precision.{side}.{module}.mixed_precision.{key}={dtype}"
        for side in ("student", "teacher") for module in ("backbone", "dino_head", "ibot_head") for key in keys
    ]  # fmt: skip


def tiny_cfg(**overrides) -> DictConfig:
    cfg = load_and_merge_config("train/bbu_sample")
    cfg = merge_configs(cfg, OmegaConf.from_dotlist(tiny_opts(**overrides)))
    cfg.optim.lr = 1e-3
    return cfg


def random_batch(cfg: DictConfig, seed: int) -> Dict:
    """A collated batch of random crops with real iBOT masks, reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    random.seed(seed)
    g, loc, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    grid = g // cfg.student.patch_size
    samples = [
        (
            {
                "global_crops": [torch.randn(3, g, g, generator=generator) for _ in range(2)],
                "local_crops": [torch.randn(3, loc, loc, generator=generator) for _ in range(n_local)],
            },
            (),
        )
        for _ in range(cfg.train.batch_size_per_gpu)
    ]
    return collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid),
    )


def run_training(
    output_dir: str, opts: List[str], no_resume: bool = False, eval_only: bool = False, config_file: str = SAMPLE_CONFIG
):
    """dinov2/train/train.py main() in this process (world size 1); returns its last logged metrics."""
    from dinov2.train.train import get_args_parser, main

    flags = (["--no-resume"] if no_resume else []) + (["--eval-only"] if eval_only else [])
    argv = ["--config-file", config_file, "--output-dir", output_dir, *flags, *opts]
    try:
        return main(get_args_parser().parse_args(argv))
    finally:
        distributed.disable()  # the next run starts its own process group


def read_metrics(output_dir: str) -> List[Dict]:
    with open(os.path.join(output_dir, "training_metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]
