"""Student/teacher meta-architecture of DINOv2: DINO (image-level), iBOT (masked patches) and KoLeo losses.

The student sees 2 global + `crops.local_crops_number` local crops in ONE backbone call (list input) and ONE head
call; the teacher (an EMA of the student, no gradient, no drop path) sees the 2 global crops. Crop pairing as
upstream: the teacher's two global outputs are swapped, so student global crop 1 is matched with teacher crop 2.

Precision (`mixed_precision_enabled`): on CUDA each module follows `compute_precision` (fp16 params with a
ShardedGradScaler when `compute_precision.grad_scaler`, or bf16 configs with `grad_scaler: false`). On CPU every
module runs in fp32 and no grad scaler is created whatever the config says, because fp16/bf16 matmuls on CPU are slow
and fp16 is unstable.

Wrapping (`prepare_for_distributed_training`): with several processes (or `train.single_process_fsdp`) each student
and teacher module is wrapped in FSDP, which applies the mixed precision. With one process the modules run without
FSDP: a module in another dtype than its fp32 parameters runs as a `LowPrecisionCopy` (the same maths without FSDP's
host time), and `self.student` / `self.teacher` keep the fp32 parameters the optimizer, EMA and checkpoints use.
"""

import logging
import math
from contextlib import nullcontext
from typing import Any, Dict, List, NoReturn, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.attention import sdpa_kernel

import dinov2.distributed as distributed
from dinov2.configs import ConfigError
from dinov2.data.prefetcher import batch_to_device
from dinov2.fsdp import ShardedGradScaler, get_fsdp_wrapper, mixed_precision_dtype, reshard_fsdp_model
from dinov2.fsdp.low_precision import LowPrecisionCopy, cast_forward_inputs
from dinov2.layers import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.models import build_model_from_cfg
from dinov2.models.vision_transformer import BlockChunk
from dinov2.train.distillation import build_distillation_teacher
from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay
from dinov2.utils.utils import (
    check_compile_options,
    has_batchnorms,
    load_pretrained_weights,
    sdpa_backends_from_cfg,
    uses_cuda_graphs,
)

logger = logging.getLogger("dinov2")

N_GLOBAL_CROPS = 2
LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
# what the DINO targets look like (see `target_statistics`): the signs of a collapsed image-level head
TARGET_KEYS = ("dino_target_entropy", "dino_target_prototypes")


def mixed_precision_enabled() -> bool:
    """Whether `compute_precision` (fp16/bf16 FSDP dtypes, grad scaler) applies: on CUDA only, because fp16/bf16
    matrix products on the CPU are slow. The tests switch it on to run the mixed-precision path on the CPU."""
    return torch.cuda.is_available()


def fp32_precision(precision_cfg: DictConfig) -> DictConfig:
    """Copy of `compute_precision` with every mixed-precision dtype set to fp32 (the CPU path)."""
    cfg = OmegaConf.create(OmegaConf.to_container(precision_cfg))
    for side in ("student", "teacher"):
        for module_cfg in cfg[side].values():
            for key in module_cfg.mixed_precision:
                module_cfg.mixed_precision[key] = "fp32"
    return cfg


def target_statistics(targets: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Of DINO target distributions (rows over K prototypes): their mean entropy as a fraction of ln K (1: every
    target uniform, the head tells no image from another) and the effective number of prototypes the batch uses,
    exp(entropy of the mean target) (about 1: every image goes to the same prototype). Tensors: no host sync."""
    p = targets.float().flatten(0, -2)
    k = p.shape[-1]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=-1).mean() / math.log(k)
    marginal = p.mean(dim=0)
    prototypes = torch.exp(-(marginal * marginal.clamp_min(1e-30).log()).sum())
    return dict(zip(TARGET_KEYS, (entropy, prototypes)))


class SSLMetaArch(nn.Module):
    """Student and teacher `ModuleDict{backbone, dino_head, ibot_head?}` with the DINOv2 losses."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mixed_precision = mixed_precision_enabled()
        self.fp16_scaler = None
        if self.mixed_precision and cfg.compute_precision.grad_scaler:
            self.fp16_scaler = ShardedGradScaler(device="cuda" if torch.cuda.is_available() else "cpu")

        student_backbone, teacher_backbone, embed_dim = build_model_from_cfg(cfg)
        student_backbone.set_activation_checkpointing(cfg.train.activation_checkpointing)
        # the blocks of the backbones that run are compiled in prepare_for_distributed_training
        self._compile_kwargs: Optional[Dict[str, Any]] = None
        if cfg.train.compile:
            self._compile_kwargs = check_compile_options(
                cfg.train.compile_backend, cfg.train.compile_mode, "train.compile_backend", "train.compile_mode"
            )
        self.sdpa_backends = sdpa_backends_from_cfg(cfg.train.sdpa_backends, "train.sdpa_backends")
        self.release_teacher_copy = bool(cfg.train.release_teacher_copy)
        if self.release_teacher_copy and self._compile_kwargs is not None and uses_cuda_graphs(self._compile_kwargs):
            raise ValueError(
                f"train.compile_mode {cfg.train.compile_mode!r} records CUDA graphs, which need the teacher's "
                "parameters at fixed addresses, and train.release_teacher_copy=true frees them between iterations: "
                "set train.release_teacher_copy=false or use a mode without CUDA graphs"
            )
        student_model_dict = {"backbone": student_backbone}
        teacher_model_dict = {"backbone": teacher_backbone}
        self.embed_dim = embed_dim
        self.dino_out_dim = cfg.dino.head_n_prototypes

        load_heads = bool(cfg.student.pretrained_heads)
        if load_heads and not cfg.student.pretrained_weights:
            raise ConfigError("student.pretrained_heads is true but student.pretrained_weights is empty: set it to a "
                              "run's teacher_checkpoint.pth (eval/training_<iter>/), which holds the heads")
        if cfg.student.pretrained_weights and not load_heads:
            # raw hub .pth, {"model": ...} or {"teacher": ...}; logs "Loaded pretrained weights from <path>"
            load_pretrained_weights(student_backbone, cfg.student.pretrained_weights, strict=True)

        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = self.do_dino and cfg.dino.koleo_loss_weight > 0  # upstream: KoLeo only with the DINO loss
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = bool(cfg.ibot.separate_head)
        self.centering = cfg.train.centering
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"train.centering must be 'centering' or 'sinkhorn_knopp', got {self.centering!r}")
        if not (self.do_dino or self.do_ibot):
            raise ValueError("dino.loss_weight and ibot.loss_weight are both 0: nothing to train")

        self.distilling = bool(cfg.distillation.enabled)
        self.ibot_out_dim = cfg.ibot.head_n_prototypes if self.ibot_separate_head else self.dino_out_dim
        # the side whose outputs are the targets: the EMA teacher, or a frozen model to distil (dinov2/train/
        # distillation.py; kept out of the state dict as the low-precision copies are), and its head for iBOT
        self._target_side = "teacher"
        self._target_patch_head = "ibot_head" if self.ibot_separate_head else "dino_head"
        self._frozen: Dict[str, nn.ModuleDict] = {}
        if self.distilling:
            self._target_side = "distillation_teacher"
            frozen, self._target_patch_head = build_distillation_teacher(cfg, self.ibot_out_dim)
            self._frozen[self._target_side] = frozen

        self.dino_loss_weight = cfg.dino.loss_weight
        self.dino_loss = DINOLoss(self.dino_out_dim)
        if self.do_koleo:
            self.koleo_loss = KoLeoLoss()
        student_model_dict["dino_head"] = DINOHead.from_cfg(embed_dim, cfg.dino)
        teacher_model_dict["dino_head"] = DINOHead.from_cfg(embed_dim, cfg.dino)

        if self.do_ibot:
            masking = max(cfg.ibot.mask_ratio_min_max) > 0 and cfg.ibot.mask_sample_probability > 0
            if not (masking or self.distilling):
                raise ValueError("ibot.loss_weight > 0 needs ibot.mask_ratio_min_max and mask_sample_probability > 0")
            n_masked_crops = int(N_GLOBAL_CROPS * cfg.train.batch_size_per_gpu * cfg.ibot.mask_sample_probability)
            if masking and not self.distilling and n_masked_crops == 0:
                raise ConfigError(
                    f"ibot.mask_sample_probability={cfg.ibot.mask_sample_probability} of the {N_GLOBAL_CROPS} x "
                    f"train.batch_size_per_gpu={cfg.train.batch_size_per_gpu} global crops is less than one crop: "
                    "no crop would ever be masked and the iBOT loss would never train; raise either, or set "
                    "ibot.loss_weight: 0"
                )
            self.ibot_loss_weight = cfg.ibot.loss_weight
            self.ibot_patch_loss = iBOTPatchLoss(self.ibot_out_dim)
            if self.ibot_separate_head:
                student_model_dict["ibot_head"] = DINOHead.from_cfg(embed_dim, cfg.ibot)
                teacher_model_dict["ibot_head"] = DINOHead.from_cfg(embed_dim, cfg.ibot)

        if cfg.train.compile_loss:
            backend = check_compile_options(cfg.train.compile_backend, None, "train.compile_backend")["backend"]
            for loss in [self.dino_loss] + ([self.ibot_patch_loss] if self.do_ibot else []):
                loss.kernels.compile(backend)

        if load_heads:  # backbone and heads of a run's teacher, strictly (the teacher copies them below)
            load_pretrained_weights(nn.ModuleDict(student_model_dict), cfg.student.pretrained_weights, strict=True)
        self.student = nn.ModuleDict(student_model_dict)
        self.teacher = nn.ModuleDict(teacher_model_dict)
        # what runs the forward of each side: the modules themselves, or their low-precision copies (plain dicts and
        # lists, so that the copies are neither submodules nor in the state dict)
        self._run: Dict[str, Any] = {"student": self.student, "teacher": self.teacher}
        self._run.update(self._frozen)
        if self.distilling:
            # nothing is masked: the mask token gets no gradient, so it is left out of training (and of the
            # optimizer, whose state it would otherwise never have)
            self.student.backbone.mask_token.requires_grad_(False)
        self._copies: Dict[str, List[LowPrecisionCopy]] = {"student": [], "teacher": []}
        self._copy_student_to_teacher()
        for p in self.teacher.parameters():
            p.requires_grad = False
        logger.info(f"Student and teacher built: {', '.join(self.student.keys())}; embed_dim {embed_dim}")

    def _copy_student_to_teacher(self) -> None:
        for k in self.student.keys():
            self.teacher[k].load_state_dict(self.student[k].state_dict())

    def forward(self, inputs: Any) -> NoReturn:
        raise RuntimeError("SSLMetaArch is trained with forward_backward(images, teacher_temp)")

    def backprop_loss(self, loss: torch.Tensor) -> None:
        """Backward (of the scaled loss with a grad scaler); the student parameters then hold the gradients."""
        if self.fp16_scaler is not None:
            self.fp16_scaler.scale(loss).backward()
        else:
            loss.backward()
        for low_precision in self._copies["student"]:
            low_precision.grads_to_master()

    @property
    def device(self) -> torch.device:
        return next(self.student.backbone.parameters()).device

    def _ibot_tokens(self, images: Dict[str, Any]) -> Tuple[torch.Tensor, int, int]:
        """(masks, number of iBOT tokens, static bound on it) of the global crops: the collated masks, or when
        distilling every patch (nothing is masked)."""
        masks = images["collated_masks"]
        if self.distilling:
            return torch.ones_like(masks), masks.numel(), masks.numel()
        return masks, images["mask_indices_list"].shape[0], images["upperbound"]

    def _select_ibot_tokens(self, patch_tokens: torch.Tensor, images: Dict[str, Any]) -> torch.Tensor:
        """The iBOT tokens among the flattened patch tokens of the global crops (all of them when distilling)."""
        if self.distilling:
            return patch_tokens
        return torch.index_select(patch_tokens, 0, images["mask_indices_list"])

    def _teacher_targets(self, images: Dict[str, Any], teacher_temp: float) -> Dict[str, torch.Tensor]:
        """Target forward (EMA teacher or distilled model) on the 2 global crops -> centred/Sinkhorn-normalised
        targets, crops swapped."""
        global_crops = images["collated_global_crops"]
        _, n_masked_patches, upperbound = self._ibot_tokens(images)

        teacher = self._run[self._target_side]
        out = teacher["backbone"](global_crops, is_training=True)
        cls_tokens = out["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)
        cls_tokens = torch.cat((cls_tokens[1], cls_tokens[0]))  # crop 2 is the target of student crop 1
        n_cls_tokens = cls_tokens.shape[0]

        masked_patch_tokens_after_head = None
        if self.do_ibot:
            patch_tokens = out["x_norm_patchtokens"].flatten(0, 1)
            separate_head = self._target_patch_head == "ibot_head"
            offset = 0 if separate_head else n_cls_tokens
            buffer = patch_tokens.new_zeros(offset + upperbound, patch_tokens.shape[-1])
            if offset:
                buffer[:offset].copy_(cls_tokens)
            buffer[offset : offset + n_masked_patches].copy_(self._select_ibot_tokens(patch_tokens, images))
            if separate_head:
                cls_tokens_after_head = teacher["dino_head"](cls_tokens)
                masked_patch_tokens_after_head = teacher["ibot_head"](buffer)[:n_masked_patches]
            else:
                tokens_after_head = teacher["dino_head"](buffer)
                cls_tokens_after_head = tokens_after_head[:n_cls_tokens]
                masked_patch_tokens_after_head = tokens_after_head[n_cls_tokens : n_cls_tokens + n_masked_patches]
        else:
            cls_tokens_after_head = teacher["dino_head"](cls_tokens)

        targets = {}
        if self.centering == "centering":
            targets["dino"] = self.dino_loss.softmax_center_teacher(cls_tokens_after_head, teacher_temp=teacher_temp)
            self.dino_loss.update_center(cls_tokens_after_head)
            if self.do_ibot:
                masked = masked_patch_tokens_after_head.unsqueeze(0)
                centred = self.ibot_patch_loss.softmax_center_teacher(masked, teacher_temp=teacher_temp)
                targets["ibot"] = centred.squeeze(0)
                self.ibot_patch_loss.update_center(masked)
        else:
            targets["dino"] = self.dino_loss.sinkhorn_knopp_teacher(cls_tokens_after_head, teacher_temp=teacher_temp)
            if self.do_ibot:
                targets["ibot"] = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    masked_patch_tokens_after_head,
                    teacher_temp=teacher_temp,
                    n_masked_patches_tensor=(
                        global_crops.new_full((1,), n_masked_patches, dtype=torch.long)
                        if self.distilling
                        else images["n_masked_patches"]
                    ),
                )
        targets["dino"] = targets["dino"].view(N_GLOBAL_CROPS, -1, targets["dino"].shape[-1])
        return targets

    def forward_backward(self, images: Dict[str, Any], teacher_temp: float) -> Dict[str, torch.Tensor]:
        """One training step's losses (backpropagated) for a batch from `collate_data_and_cast` (see
        `_forward_backward`), with attention restricted to `train.sdpa_backends` if set."""
        with sdpa_kernel(self.sdpa_backends) if self.sdpa_backends is not None else nullcontext():
            return self._forward_backward(images, teacher_temp)

    def _forward_backward(self, images: Dict[str, Any], teacher_temp: float) -> Dict[str, torch.Tensor]:
        """The losses of one training step, backpropagated.

        Normalisation as upstream: with n_local local crops there are 2*n_local local and 2 global DINO terms;
        each DINO term is divided by their total (a mean over pairs), KoLeo is summed over the 2 global crops, and
        the iBOT loss is the mean over global crops of the per-crop mean over masked patches. The returned dict holds
        the displayed values (KoLeo and iBOT per global crop, as upstream) as detached tensors, and the
        `target_statistics` of the DINO targets.
        """
        device = self.device
        images = batch_to_device(images, device)
        n_local_crops = self.cfg.crops.local_crops_number
        global_crops = images["collated_global_crops"]
        local_crops = images["collated_local_crops"]
        masks, n_masked_patches, upperbound = self._ibot_tokens(images)

        n_local_terms = max(n_local_crops * N_GLOBAL_CROPS, 1)
        n_global_terms = (N_GLOBAL_CROPS - 1) * N_GLOBAL_CROPS
        n_terms = n_local_terms + n_global_terms
        running_teacher = [] if self.distilling else self._copies["teacher"]  # a distilled EMA teacher only saves
        for low_precision in running_teacher + self._copies["student"]:
            low_precision.refresh()  # after the last optimizer step, EMA update or checkpoint load

        with torch.no_grad():
            targets = self._teacher_targets(images, teacher_temp)
        reshard_fsdp_model(self._frozen.get(self._target_side, self.teacher))
        for low_precision in self._copies["teacher"]:
            if low_precision.releasable:
                low_precision.release()  # the student's forward and backward (the peak) run without it

        student_crops = [global_crops, local_crops] if n_local_crops > 0 else [global_crops]
        global_masks = None if self.distilling else masks
        student_masks = [global_masks, None] if n_local_crops > 0 else [global_masks]
        student = self._run["student"]
        outputs = student["backbone"](student_crops, masks=student_masks, is_training=True)
        global_out = outputs[0]
        global_cls = global_out["x_norm_clstoken"]

        # One head call on [local cls; global cls; masked global patches] (the head is token-wise), then split.
        head_inputs: List[torch.Tensor] = []
        if n_local_crops > 0:
            head_inputs.append(outputs[1]["x_norm_clstoken"])
        head_inputs.append(global_cls)
        masked_after_head = None
        if self.do_ibot:
            patch_tokens = global_out["x_norm_patchtokens"].flatten(0, 1)
            buffer = patch_tokens.new_zeros(upperbound, patch_tokens.shape[-1])
            buffer[:n_masked_patches].copy_(self._select_ibot_tokens(patch_tokens, images))
            if self.ibot_separate_head:
                masked_after_head = student["ibot_head"](buffer)[:n_masked_patches]
            else:
                head_inputs.append(buffer)
        head_outputs = list(student["dino_head"](torch.cat(head_inputs)).split([t.shape[0] for t in head_inputs]))
        local_cls_after_head = head_outputs.pop(0) if n_local_crops > 0 else None
        global_cls_after_head = head_outputs.pop(0)
        if self.do_ibot and not self.ibot_separate_head:
            masked_after_head = head_outputs.pop(0)[:n_masked_patches]

        zero = global_cls.new_zeros(())
        loss_dict = {k: zero for k in LOSS_KEYS}
        loss_accumulator = zero
        if self.do_dino:
            if n_local_crops > 0:
                local_students = local_cls_after_head.unflatten(0, (n_local_crops, -1))  # (n_local, B, K)
                local_loss = self.dino_loss([local_students], list(targets["dino"]))
                loss_dict["dino_local_crops_loss"] = local_loss / n_terms
                loss_accumulator = loss_accumulator + self.dino_loss_weight * loss_dict["dino_local_crops_loss"]
            # one term over the 2B global outputs, x2 = sum of the two (student crop i, teacher crop 1-i) means
            global_loss = self.dino_loss([global_cls_after_head], [targets["dino"].flatten(0, 1)])
            loss_dict["dino_global_crops_loss"] = global_loss * N_GLOBAL_CROPS / n_terms
            loss_accumulator = loss_accumulator + self.dino_loss_weight * loss_dict["dino_global_crops_loss"]
        if self.do_koleo:
            koleo = self.cfg.dino.koleo_loss_weight * sum(self.koleo_loss(p) for p in global_cls.chunk(N_GLOBAL_CROPS))
            loss_accumulator = loss_accumulator + koleo
            loss_dict["koleo_loss"] = koleo / N_GLOBAL_CROPS
        if self.do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(
                masked_after_head,
                targets["ibot"],
                student_masks_flat=masks,
                n_masked_patches=n_masked_patches,
                masks_weight=None if self.distilling else images["masks_weight"],  # None: 1 / tokens of the crop
            )
            # forward_masked averages over the 2B global crops; x2 x 1/2 as upstream (scale by crops, per-crop weight)
            loss_accumulator = loss_accumulator + self.ibot_loss_weight * ibot
            loss_dict["ibot_loss"] = ibot / N_GLOBAL_CROPS

        self.backprop_loss(loss_accumulator)
        loss_dict = {k: v.detach() for k, v in loss_dict.items()}
        loss_dict["total_loss"] = loss_accumulator.detach()
        with torch.no_grad():
            loss_dict.update(target_statistics(targets["dino"]))
        return loss_dict

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, over matching (identically wrapped) parameters."""
        student_params, teacher_params = [], []
        for k in self.student.keys():
            s_named = list(self.student[k].named_parameters())
            t_named = list(self.teacher[k].named_parameters())
            if [n for n, _ in s_named] != [n for n, _ in t_named]:
                raise RuntimeError(f"student and teacher {k} parameters differ; cannot update the teacher")
            student_params += [p for _, p in s_named]
            teacher_params += [p for _, p in t_named]
        torch._foreach_mul_(teacher_params, m)
        torch._foreach_add_(teacher_params, student_params, alpha=1 - m)

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()
        for low_precision in self._copies["student"]:
            low_precision.module.train(mode)
        for low_precision in self._copies["teacher"]:
            low_precision.module.eval()
        for frozen in self._frozen.values():
            frozen.eval()
        return self

    def get_maybe_fused_params_for_submodel(self, m: nn.Module) -> List[Dict[str, Any]]:
        params_groups = get_params_groups_with_decay(
            model=m,
            lr_decay_rate=self.cfg.optim.layerwise_decay,
            patch_embed_lr_mult=self.cfg.optim.patch_embed_lr_mult,
        )
        return list(fuse_params_groups(params_groups))

    def get_params_groups(self) -> List[Dict[str, Any]]:
        """AdamW groups keyed by (lr_multiplier, wd_multiplier, is_last_layer) for every student submodule, flagged
        `is_backbone` for the backbone's (`optim.freeze_backbone_epochs`)."""
        all_params_groups: List[Dict[str, Any]] = []
        for name, m in self.student.items():
            groups = self.get_maybe_fused_params_for_submodel(m)
            all_params_groups += [{**group, "is_backbone": name == "backbone"} for group in groups]
        return all_params_groups

    def prepare_for_distributed_training(self) -> None:
        """Teacher <- student, then set up what runs each module: with several processes or
        `train.single_process_fsdp`, `dinov2.fsdp.get_fsdp_wrapper` (BlockChunk units); with one process the module
        itself, or a `LowPrecisionCopy` where its param_dtype is not its parameters' dtype. Backbone blocks are
        compiled here (`train.compile`), in whatever runs."""
        if has_batchnorms(self.student):
            raise TypeError("BatchNorm layers are not supported by the training path (use LayerNorm)")
        self._copy_student_to_teacher()
        precision = self.cfg.compute_precision
        if not self.mixed_precision:
            precision = fp32_precision(precision)
        use_fsdp = distributed.get_global_size() > 1 or self.cfg.train.single_process_fsdp
        self._prepare_frozen(precision["teacher"], use_fsdp)
        if use_fsdp:
            logger.info("DISTRIBUTED FSDP -- preparing model for distributed training")
            wrap_units = {BlockChunk} if self.cfg.student.block_chunks > 0 else set()
            for side in ("student", "teacher"):
                modules = getattr(self, side)
                for k in list(modules.keys()):
                    self._compile(k, modules[k])
                    modules[k] = get_fsdp_wrapper(precision[side][k], modules_to_wrap=wrap_units)(modules[k])
            return
        logger.info("One process: student and teacher run without FSDP")
        for side in ("student", "teacher"):
            run = {}
            for k, module in getattr(self, side).items():
                mp_cfg, key = precision[side][k].mixed_precision, f"compute_precision.{side}.{k}.mixed_precision"
                param_dtype = mixed_precision_dtype(mp_cfg.param_dtype, f"{key}.param_dtype")
                buffer_dtype = mixed_precision_dtype(mp_cfg.buffer_dtype, f"{key}.buffer_dtype")
                if param_dtype != next(module.parameters()).dtype:
                    releasable = side == "teacher" and self.release_teacher_copy
                    low_precision = LowPrecisionCopy(module, param_dtype, buffer_dtype, releasable)
                    self._copies[side].append(low_precision)
                    module = low_precision.module
                elif self.mixed_precision:
                    cast_forward_inputs(module, param_dtype)
                self._compile(k, module)
                run[k] = module
            self._run[side] = run
        self.train(self.training)

    def _prepare_frozen(self, precision: DictConfig, use_fsdp: bool) -> None:
        """Move the distilled model to the student's device and run it in the teacher's `compute_precision`: wrapped
        in FSDP as the teacher is, or with one process cast to `param_dtype` (it never trains: no fp32 copy)."""
        for modules in self._frozen.values():
            modules.to(self.device)
            for k in list(modules.keys()):
                self._compile(k, modules[k])
                if use_fsdp:
                    modules[k] = get_fsdp_wrapper(precision[k], modules_to_wrap={BlockChunk})(modules[k])
                    continue
                mp_cfg, key = precision[k].mixed_precision, f"compute_precision.teacher.{k}.mixed_precision"
                param_dtype = mixed_precision_dtype(mp_cfg.param_dtype, f"{key}.param_dtype")
                buffer_dtype = mixed_precision_dtype(mp_cfg.buffer_dtype, f"{key}.buffer_dtype")
                for p in modules[k].parameters():
                    p.data = p.data.to(param_dtype)
                for b in modules[k].buffers():
                    if b.is_floating_point():
                        b.data = b.data.to(buffer_dtype)
                if self.mixed_precision:
                    cast_forward_inputs(modules[k], param_dtype)

    def _compile(self, name: str, module: nn.Module) -> None:
        if self._compile_kwargs is not None and name == "backbone":
            module.compile_blocks(**self._compile_kwargs)
