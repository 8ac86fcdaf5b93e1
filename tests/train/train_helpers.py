"""Shared helpers of the training tests: a tiny CPU configuration on the sample BBU data, in-process runs."""

import json
import math
import os
import random
import subprocess
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from references import sinkhorn_reference

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


def run_torchrun(cmd: List[str], env: Dict[str, str]) -> None:
    """Run a torchrun job; its output is shown when it fails. A rendezvous port taken by another process between
    torchrun's free-port pick and its bind (EADDRINUSE) is the one failure retried, once."""
    for attempt in range(2):
        result = subprocess.run(cmd, cwd=REPO, env=env, timeout=240, capture_output=True, text=True)
        output = result.stdout + result.stderr
        if result.returncode == 0:
            return
        if attempt == 0 and "address already in use" in output.lower():
            continue
        pytest.fail(f"torchrun exited with {result.returncode}:\n{output[-6000:]}")


def crash_training(output_dir: str, opts: List[str], monkeypatch, crash_iteration: int) -> None:
    """`run_training` that stops with a KeyboardInterrupt (a simulated crash) when it starts iteration
    `crash_iteration`: what it saved before stays for a resumed run."""
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    original = SSLMetaArch.forward_backward
    calls = {"n": 0}

    def crash(self, images, teacher_temp):
        calls["n"] += 1
        if calls["n"] == crash_iteration + 1:
            raise KeyboardInterrupt("simulated crash")
        return original(self, images, teacher_temp)

    monkeypatch.setattr(SSLMetaArch, "forward_backward", crash)
    with pytest.raises(KeyboardInterrupt):
        run_training(output_dir, opts)
    monkeypatch.setattr(SSLMetaArch, "forward_backward", original)


def read_metrics(output_dir: str) -> List[Dict]:
    with open(os.path.join(output_dir, "training_metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


STUDENT_TEMP = 0.1


def _ce(targets: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy H(targets, softmax(student / 0.1))."""
    return -(targets * F.log_softmax(student_logits / STUDENT_TEMP, dim=-1)).sum(-1)


def _koleo(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=-1)
    sims = x @ x.t()
    sims.fill_diagonal_(-1)
    nn_index = sims.argmax(dim=1)
    return -torch.log((x - x[nn_index]).norm(dim=-1) + 1e-8).mean()


def manual_losses(model, cfg, batch, teacher_temp: float, teacher=None, teacher_patch_head: str = ""):
    """The DINOv2 objective recomputed with separate backbone/head calls and no crop swapping tricks. With a
    `teacher` (a distilled model: modules and the name of its patch head) the targets are its outputs and nothing is
    masked: the iBOT terms cover every patch of the global crops."""
    b = cfg.train.batch_size_per_gpu
    n_local = cfg.crops.local_crops_number
    global_crops, local_crops = batch["collated_global_crops"], batch["collated_local_crops"]
    masks = batch["collated_masks"]
    student_masks = masks
    sinkhorn = cfg.train.centering == "sinkhorn_knopp"
    ibot_head_name = "ibot_head" if cfg.ibot.separate_head else "dino_head"
    if teacher is None:
        teacher, teacher_patch_head = model.teacher, ibot_head_name
    else:
        masks, student_masks = torch.ones_like(masks), None
    with torch.no_grad():
        t_out = teacher["backbone"](global_crops, is_training=True)
        t_cls = teacher["dino_head"](t_out["x_norm_clstoken"])
        t_masked = teacher[teacher_patch_head](t_out["x_norm_patchtokens"][masks])
        if sinkhorn:
            t_cls, t_masked = (sinkhorn_reference(t, teacher_temp, dtype=torch.float32) for t in (t_cls, t_masked))
        else:  # fresh centres are zero
            t_cls, t_masked = F.softmax(t_cls / teacher_temp, -1), F.softmax(t_masked / teacher_temp, -1)
    s_global = model.student.backbone(global_crops, masks=student_masks, is_training=True)
    s_local = model.student.backbone(local_crops, is_training=True)
    s_global_cls = model.student.dino_head(s_global["x_norm_clstoken"])
    s_local_cls = model.student.dino_head(s_local["x_norm_clstoken"])
    s_masked = model.student[ibot_head_name](s_global["x_norm_patchtokens"][masks])

    teacher_crops = [t_cls[:b], t_cls[b:]]
    n_terms = 2 * n_local + 2
    dino_global = (_ce(teacher_crops[1], s_global_cls[:b]).mean() + _ce(teacher_crops[0], s_global_cls[b:]).mean())
    dino_local = sum(
        _ce(t, s_local_cls[j * b : (j + 1) * b]).mean() for j in range(n_local) for t in teacher_crops
    )
    do_dino = cfg.dino.loss_weight > 0  # KoLeo, too, only with the DINO loss, as upstream
    koleo = sum(_koleo(s_global["x_norm_clstoken"][c * b : (c + 1) * b]) for c in range(2)) * do_dino
    token_ce = _ce(t_masked, s_masked)
    owner = masks.nonzero()[:, 0]  # global crop of every masked token, in the same (row-major) order
    per_crop = [token_ce[owner == i].mean() if (owner == i).any() else token_ce.new_zeros(()) for i in range(2 * b)]
    ibot = torch.stack(per_crop).mean()
    marginal = t_cls.double().mean(dim=0)
    losses = {
        "dino_target_entropy": (-(t_cls.double() * t_cls.double().log()).sum(-1).mean() / math.log(t_cls.shape[-1])),
        "dino_target_prototypes": torch.exp(-(marginal * marginal.log()).sum()),
        "dino_local_crops_loss": dino_local / n_terms * do_dino,
        "dino_global_crops_loss": dino_global / n_terms * do_dino,
        "koleo_loss": cfg.dino.koleo_loss_weight * koleo / 2,
        "ibot_loss": ibot / 2,
    }
    total = (
        cfg.dino.loss_weight * (losses["dino_local_crops_loss"] + losses["dino_global_crops_loss"])
        + cfg.dino.koleo_loss_weight * koleo
        + cfg.ibot.loss_weight * ibot
    )
    return losses, total
