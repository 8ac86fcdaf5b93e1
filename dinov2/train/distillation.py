"""Distillation, as the DINOv2 paper made its smaller models: a frozen pretrained model, usually larger, gives the
DINO and iBOT targets of the student instead of the student's own EMA (upstream did not release this code).

As in the paper, the training loop is the same, the EMA of the student is still kept and is the model a run saves
(`eval/training_<iter>/teacher_checkpoint.pth`, as in any run), and nothing is masked: the iBOT loss compares every
patch token of the two global crops, which the student sees whole, so the frozen model and the student need the same
patch grid. The paper also drops stochastic depth, which is a config value (`bbu_distill_vits14.yaml`).

The frozen model is built from the config of the run that trained it (`distillation.full_cfg_path`: the
`config.yaml` that run wrote) and loaded strictly, heads included, from that run's `teacher_checkpoint.pth`
(`distillation.checkpoint_path`). It is not part of the student's state dict or checkpoints: a resumed run loads it
again from the same files.
"""

import logging
import os
from typing import Dict, Tuple

from omegaconf import DictConfig, OmegaConf
from torch import nn

from dinov2.configs import ConfigError, dinov2_default_config, merge_configs
from dinov2.layers import DINOHead
from dinov2.models import build_model_from_cfg
from dinov2.utils.utils import PretrainedWeightsError, load_pretrained_weights, summarise_keys

logger = logging.getLogger("dinov2")


def load_teacher_cfg(cfg: DictConfig) -> DictConfig:
    """The frozen model's training config (`distillation.full_cfg_path`) merged into the default config."""
    path = cfg.distillation.full_cfg_path
    if not path:
        raise ConfigError(
            "distillation.enabled is true but distillation.full_cfg_path is empty: set it to the config.yaml that the "
            "teacher's training run wrote in its output directory"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"distillation.full_cfg_path {path} does not exist")
    return merge_configs(OmegaConf.create(dinov2_default_config), OmegaConf.load(path), source=path)


def patch_head_name(teacher_cfg: DictConfig) -> str:
    """The head that gives a model's patch (iBOT) outputs: its own iBOT head, or the DINO head it shares."""
    return "ibot_head" if teacher_cfg.ibot.loss_weight > 0 and teacher_cfg.ibot.separate_head else "dino_head"


def check_compatible(cfg: DictConfig, teacher_cfg: DictConfig, student_ibot_dim: int) -> None:
    """The student's heads must score the frozen model's prototypes, and with iBOT see the same patch grid."""
    source = cfg.distillation.full_cfg_path
    if cfg.dino.head_n_prototypes != teacher_cfg.dino.head_n_prototypes:
        raise ConfigError(
            f"dino.head_n_prototypes ({cfg.dino.head_n_prototypes}) must equal the teacher's "
            f"({teacher_cfg.dino.head_n_prototypes} in {source}): the student's DINO head learns the distribution "
            "over the teacher's prototypes"
        )
    if cfg.ibot.loss_weight <= 0:
        return
    teacher_ibot_dim = teacher_cfg[patch_head_name(teacher_cfg).removesuffix("_head")].head_n_prototypes
    if student_ibot_dim != teacher_ibot_dim:
        key = "ibot.head_n_prototypes" if cfg.ibot.separate_head else "dino.head_n_prototypes (shared iBOT head)"
        raise ConfigError(
            f"{key} ({student_ibot_dim}) must equal the prototypes of the teacher's patch head ({teacher_ibot_dim} "
            f"in {source})"
        )
    if cfg.student.patch_size != teacher_cfg.student.patch_size:
        raise ConfigError(
            f"student.patch_size ({cfg.student.patch_size}) must equal the teacher's ({teacher_cfg.student.patch_size} "
            f"in {source}): the iBOT loss matches the student's patch tokens with the teacher's one for one "
            "(ibot.loss_weight=0 distils the class token only)"
        )


def _load_strictly(teacher: nn.ModuleDict, path: str, source: str) -> None:
    try:
        load_pretrained_weights(teacher, path, checkpoint_key="teacher", strict=True)
    except PretrainedWeightsError as e:
        lines = [f"distillation.checkpoint_path {path} does not hold the teacher that {source} describes"]
        if e.missing_keys:
            lines.append(f"  missing keys: {summarise_keys(e.missing_keys, limit=0)}")
        if e.unexpected_keys:
            lines.append(f"  unexpected keys: {summarise_keys(e.unexpected_keys, limit=0)}")
        lines += [f"  shape mismatch {k}: checkpoint {c} vs model {m}" for k, (c, m) in e.shape_mismatches.items()]
        if any(key.startswith(("dino_head.", "ibot_head.")) for key in e.missing_keys):
            lines.append(
                "  the heads are missing: released backbones have none; distil from the teacher_checkpoint.pth of a "
                "training run (<output_dir>/eval/training_<iter>/), which keeps them"
            )
        raise PretrainedWeightsError("\n".join(lines), path, e.missing_keys, e.unexpected_keys,
                                     e.shape_mismatches) from None


def build_distillation_teacher(cfg: DictConfig, student_ibot_dim: int) -> Tuple[nn.ModuleDict, str]:
    """The frozen model `{backbone, dino_head[, ibot_head]}` (eval mode, no gradients) and the name of its patch head,
    after checking it against the student's config."""
    teacher_cfg = load_teacher_cfg(cfg)
    check_compatible(cfg, teacher_cfg, student_ibot_dim)
    path = cfg.distillation.checkpoint_path
    if not path:
        raise ConfigError(
            "distillation.enabled is true but distillation.checkpoint_path is empty: set it to the teacher's "
            "teacher_checkpoint.pth (<output_dir>/eval/training_<iter>/ of its run)"
        )
    backbone, embed_dim = build_model_from_cfg(teacher_cfg, only_teacher=True)
    modules: Dict[str, nn.Module] = {"backbone": backbone, "dino_head": DINOHead.from_cfg(embed_dim, teacher_cfg.dino)}
    head = patch_head_name(teacher_cfg)
    if head == "ibot_head":
        modules["ibot_head"] = DINOHead.from_cfg(embed_dim, teacher_cfg.ibot)
    teacher = nn.ModuleDict(modules)
    _load_strictly(teacher, path, cfg.distillation.full_cfg_path)
    teacher.eval()
    teacher.requires_grad_(False)
    logger.info(f"Distilling from a frozen {teacher_cfg.student.arch}/{teacher_cfg.student.patch_size} ({path})")
    return teacher, head
