"""Configuration set-up: default <- --config-file <- key=value overrides, scaling rules, and run set-up."""

import argparse
import logging
import math
import os
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

import dinov2.distributed as distributed
from dinov2.configs import ConfigError, dinov2_default_config, merge_configs
from dinov2.logging import setup_logging
from dinov2.utils import utils

logger = logging.getLogger("dinov2")


def apply_scaling_rules_to_cfg(cfg: DictConfig) -> DictConfig:
    """Set `optim.lr` from `optim.base_lr` with the configured scaling rule (upstream: sqrt_wrt_1024)."""
    if cfg.optim.scaling_rule == "sqrt_wrt_1024":
        base_lr = cfg.optim.base_lr
        cfg.optim.lr = base_lr * math.sqrt(cfg.train.batch_size_per_gpu * distributed.get_global_size() / 1024.0)
        logger.info(f"sqrt scaling learning rate; base: {base_lr}, new: {cfg.optim.lr}")
    else:
        raise ConfigError(f"optim.scaling_rule={cfg.optim.scaling_rule!r} is not supported (use 'sqrt_wrt_1024')")
    return cfg


def write_config(cfg: DictConfig, output_dir: str, name: str = "config.yaml") -> str:
    """Write the resolved config to `<output_dir>/<name>` atomically and return the path."""
    logger.info(OmegaConf.to_yaml(cfg))
    os.makedirs(output_dir, exist_ok=True)
    saved_cfg_path = os.path.join(os.path.abspath(output_dir), name)
    utils.atomic_write(saved_cfg_path, lambda f: OmegaConf.save(config=cfg, f=f), binary=False)
    return saved_cfg_path


def get_cfg_from_args(args: argparse.Namespace) -> DictConfig:
    """default config <- `args.config_file` <- `args.opts` (OmegaConf dotlist); unknown keys raise ConfigError.

    `args.output_dir`, when given, becomes `train.output_dir` as an absolute path, set as a plain string (a dotlist
    override would parse it as YAML: `run #2` would lose its `#2`, `a: b` become a mapping); a different
    `train.output_dir=` override beside it is an error."""
    opts: Sequence[str] = list(getattr(args, "opts", None) or [])
    output_dir = getattr(args, "output_dir", "") or ""
    cfg = OmegaConf.create(dinov2_default_config)
    config_file = getattr(args, "config_file", "") or ""
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--config-file {config_file} does not exist")
        cfg = merge_configs(cfg, OmegaConf.load(config_file), source=config_file)
    bad = [opt for opt in opts if "=" not in opt]
    if bad:
        raise ConfigError(f"Overrides must be key=value, got {bad}")
    overrides = OmegaConf.from_dotlist(list(opts))
    cfg = merge_configs(cfg, overrides, source="command-line overrides")
    if output_dir:
        args.output_dir = os.path.abspath(output_dir)
        override = OmegaConf.select(overrides, "train.output_dir")
        if override is not None and os.path.abspath(str(override)) != args.output_dir:
            raise ConfigError(f"--output-dir {args.output_dir} and the override train.output_dir={override} differ: "
                              "give one of them")  # fmt: skip
        cfg.train.output_dir = args.output_dir
    return cfg


def default_setup(args: argparse.Namespace, seed: Optional[int] = None) -> None:
    """Start the distributed environment, logging and per-rank seeding."""
    distributed.enable(overwrite=True)
    rank = distributed.get_global_rank()
    setup_logging(output=args.output_dir or None, level=logging.INFO)
    utils.fix_random_seeds((seed if seed is not None else getattr(args, "seed", 0)) + rank)
    logger.info("git:\n  {}\n".format(utils.get_sha()))
    logger.info("\n".join(f"{k}: {v}" for k, v in sorted(dict(vars(args)).items())))


def setup(args: argparse.Namespace) -> DictConfig:
    """Build the config from `args`, set up the run and write `<output_dir>/config.yaml` on the main process."""
    cfg = get_cfg_from_args(args)
    if not args.output_dir:  # no --output-dir: train.output_dir (default ".", the working directory, as upstream)
        args.output_dir = cfg.train.output_dir = os.path.abspath(cfg.train.output_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    default_setup(args, seed=int(cfg.train.seed))
    apply_scaling_rules_to_cfg(cfg)
    if distributed.is_main_process():
        write_config(cfg, args.output_dir)
    return cfg
