import os
import sys

import pytest
import torch
from omegaconf import OmegaConf
from train_helpers import (
    REPO,
    SAMPLE_CONFIG,
    crash_training,
    manual_losses,
    precision_opts,
    random_batch,
    read_metrics,
    run_torchrun,
    run_training,
    tiny_cfg,
    tiny_opts,
)

from dinov2.configs import ConfigError, load_and_merge_config
from dinov2.train.distillation import check_compatible
from dinov2.train import ssl_meta_arch
from dinov2.train.ssl_meta_arch import LOSS_KEYS, TARGET_KEYS, SSLMetaArch
from dinov2.train.train import teacher_state_dict
from dinov2.utils.utils import PretrainedWeightsError

# the frozen model: a ViT-S/16 on the tiny crops; the students are ViT-Ti/16 (same patch grid, other width)
TEACHER = dict(student__arch="vit_small", student__drop_path_rate=0.0)


def save_teacher(directory, **overrides):
    """A trained-looking run's config.yaml and eval/training_7/teacher_checkpoint.pth; returns (model, cfg path,
    checkpoint path)."""
    torch.manual_seed(1)
    cfg = tiny_cfg(**{**TEACHER, **overrides})
    model = SSLMetaArch(cfg)
    with torch.no_grad():  # not the initialisation: the targets must come from these weights
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg_path = os.path.join(directory, "config.yaml")
    OmegaConf.save(cfg, cfg_path)
    checkpoint = os.path.join(directory, "eval", "training_7", "teacher_checkpoint.pth")
    os.makedirs(os.path.dirname(checkpoint))
    torch.save({"teacher": teacher_state_dict(model)}, checkpoint)
    return model, cfg_path, checkpoint


def distil_overrides(cfg_path, checkpoint):
    return dict(distillation__enabled=True, distillation__full_cfg_path=cfg_path,
                distillation__checkpoint_path=checkpoint)


@pytest.mark.parametrize(
    "teacher_overrides, student_overrides",
    [
        (dict(ibot__separate_head=False), dict(train__centering="centering", ibot__separate_head=False)),
        (dict(ibot__separate_head=True), dict(train__centering="sinkhorn_knopp", ibot__separate_head=True)),
        (dict(ibot__separate_head=False), dict(train__centering="centering", ibot__separate_head=True,
                                               ibot__head_n_prototypes=64)),
    ],
    ids=["centering-shared-heads", "sinkhorn-separate-heads", "separate-student-head-from-shared-teacher-head"],
)
def test_distillation_losses_match_manual_recomputation(tmp_path, teacher_overrides, student_overrides):
    """The frozen model's outputs are the targets (crops swapped for DINO, every patch for iBOT, the student sees
    unmasked crops); its weights are those of the file; the backward reaches the student only."""
    frozen, cfg_path, checkpoint = save_teacher(str(tmp_path), **teacher_overrides)
    patch_head = "ibot_head" if teacher_overrides["ibot__separate_head"] else "dino_head"
    torch.manual_seed(0)
    cfg = tiny_cfg(student__drop_path_rate=0.0, dino__koleo_loss_weight=0.3, ibot__loss_weight=2.0,
                   ibot__mask_sample_probability=0.75, **student_overrides, **distil_overrides(cfg_path, checkpoint))
    model = SSLMetaArch(cfg)
    model.train()
    loaded = model._frozen["distillation_teacher"]
    assert sorted(loaded) == sorted(frozen.teacher) and model._target_patch_head == patch_head
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, frozen.teacher.state_dict()[name]), name
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    batch = random_batch(cfg, seed=1)
    assert not batch["collated_masks"].all()  # the collated masks are there, and ignored
    expected, expected_total = manual_losses(model, cfg, batch, 0.05, teacher=frozen.teacher,
                                             teacher_patch_head=patch_head)
    model.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(batch, teacher_temp=0.05)
    for key in LOSS_KEYS + TARGET_KEYS:
        torch.testing.assert_close(loss_dict[key].double(), expected[key].detach().double(), rtol=1e-5, atol=1e-6,
                                   msg=key)
    torch.testing.assert_close(loss_dict["total_loss"], expected_total.detach(), rtol=1e-5, atol=1e-6)
    assert loss_dict["ibot_loss"] > 0
    assert all(p.grad is not None for p in model.student.backbone.blocks.parameters())
    assert all(p.grad is None for p in [*model.teacher.parameters(), *loaded.parameters()])


def test_distilled_model_is_left_out_of_state_dict_and_parameters(tmp_path):
    _, cfg_path, checkpoint = save_teacher(str(tmp_path))
    plain = SSLMetaArch(tiny_cfg())
    model = SSLMetaArch(tiny_cfg(**distil_overrides(cfg_path, checkpoint)))
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    model.prepare_for_distributed_training()  # one process: the frozen model stays in fp32 on the CPU
    assert {p.dtype for p in model._frozen["distillation_teacher"].parameters()} == {torch.float32}


def test_mixed_precision_runs_the_frozen_model_in_the_teachers_dtype(tmp_path, monkeypatch):
    """bf16 (the CUDA path, switched on for the CPU): the frozen model is cast once, not kept in fp32 beside a copy,
    and its targets stay within bf16 rounding of the fp32 ones."""
    _, cfg_path, checkpoint = save_teacher(str(tmp_path))
    targets = {}
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(ssl_meta_arch, "mixed_precision_enabled", lambda: dtype != torch.float32)
        cfg = tiny_cfg(student__drop_path_rate=0.0, **distil_overrides(cfg_path, checkpoint))
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(precision_opts(name, grad_scaler=False)))
        model = SSLMetaArch(cfg)
        model.prepare_for_distributed_training()
        assert {p.dtype for p in model._frozen["distillation_teacher"].parameters()} == {dtype}
        with torch.no_grad():
            targets[dtype] = model._teacher_targets(random_batch(cfg, seed=1), teacher_temp=0.1)
    for key in ("dino", "ibot"):
        torch.testing.assert_close(targets[torch.bfloat16][key].float(), targets[torch.float32][key], rtol=0.05,
                                   atol=2e-3, msg=key)


def test_distillation_runs_resume_like_an_uninterrupted_run(tmp_path, sample_root, monkeypatch):
    """8 iterations straight against a crash after 6, a resume from the checkpoint at iteration 3 and the rest: the
    same losses. The saved teacher is the student's EMA (a ViT-Ti); the frozen model's file is left as it was."""
    _, cfg_path, checkpoint = save_teacher(str(tmp_path))
    before = os.path.getmtime(checkpoint)
    opts = tiny_opts(sample_root, student__drop_path_rate=0.0, **distil_overrides(cfg_path, checkpoint))
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_training(straight, opts)
    crash_training(resumed, opts, monkeypatch, crash_iteration=6)
    run_training(resumed, opts)

    losses = {run: {m["iteration"]: [m[k] for k in ("total_loss",) + LOSS_KEYS] for m in read_metrics(run)}
              for run in (straight, resumed)}  # fmt: skip
    assert sorted(losses[straight]) == list(range(8))
    for iteration in range(8):
        torch.testing.assert_close(torch.tensor(losses[resumed][iteration]), torch.tensor(losses[straight][iteration]),
                                   rtol=0, atol=1e-6, msg=f"iteration {iteration}")
    saved = torch.load(os.path.join(straight, "eval", "training_7", "teacher_checkpoint.pth"), weights_only=True)
    assert saved["teacher"]["backbone.cls_token"].shape == (1, 1, 192)
    assert os.path.getmtime(checkpoint) == before


@pytest.mark.parametrize(
    "teacher_overrides, student_overrides, error, message",
    [
        ({}, dict(distillation__full_cfg_path=""), ConfigError, "distillation.full_cfg_path is empty"),
        ({}, dict(distillation__checkpoint_path=""), ConfigError, "distillation.checkpoint_path is empty"),
        ({}, dict(distillation__full_cfg_path="missing.yaml"), FileNotFoundError, "distillation.full_cfg_path missing"),
        ({}, dict(dino__head_n_prototypes=32), ConfigError, r"dino.head_n_prototypes \(32\) must equal the teacher's"),
        (dict(ibot__separate_head=True), {}, ConfigError,
         r"dino.head_n_prototypes \(shared iBOT head\) \(64\) must equal the prototypes of the teacher's patch head"),
        ({}, dict(student__patch_size=8), ConfigError, r"student.patch_size \(8\) must equal the teacher's \(16"),
    ],
    ids=["no-config", "no-checkpoint", "config-not-found", "dino-prototypes", "ibot-prototypes", "patch-size"],
)
def test_bad_distillation_settings_name_the_key(tmp_path, teacher_overrides, student_overrides, error, message):
    _, cfg_path, checkpoint = save_teacher(str(tmp_path), **teacher_overrides)
    overrides = {**distil_overrides(cfg_path, checkpoint), **student_overrides}
    with pytest.raises(error, match=message):
        SSLMetaArch(tiny_cfg(**overrides))


def test_patch_size_may_differ_without_ibot(tmp_path):
    _, cfg_path, checkpoint = save_teacher(str(tmp_path))
    cfg = tiny_cfg(student__patch_size=8, ibot__loss_weight=0.0, **distil_overrides(cfg_path, checkpoint))
    loss_dict = SSLMetaArch(cfg).forward_backward(random_batch(cfg, seed=0), teacher_temp=0.05)
    assert loss_dict["ibot_loss"] == 0 and loss_dict["dino_global_crops_loss"] > 0


def test_weights_without_heads_are_refused_naming_the_file_and_keys(tmp_path):
    """A backbone without its DINO head (as the released weights are) cannot give the targets."""
    _, cfg_path, checkpoint = save_teacher(str(tmp_path))
    state = torch.load(checkpoint, weights_only=True)["teacher"]
    backbone_only = str(tmp_path / "backbone_only.pth")
    torch.save({"teacher": {k: v for k, v in state.items() if k.startswith("backbone.")}}, backbone_only)
    with pytest.raises(PretrainedWeightsError) as info:
        SSLMetaArch(tiny_cfg(**distil_overrides(cfg_path, backbone_only)))
    message = str(info.value)
    assert message.splitlines()[0] == (f"distillation.checkpoint_path {backbone_only} does not hold the teacher that "
                                       f"{cfg_path} describes")
    assert message.splitlines()[1] == "  missing keys: dino_head.* (8)"
    assert "released backbones have none" in message
    assert sorted(info.value.missing_keys) == sorted(k for k in state if k.startswith("dino_head."))


def test_two_rank_distillation_resumes_in_one_process(tmp_path, sample_root):
    """2 sharded ranks distil (the frozen model wrapped in FSDP as the teacher is) for 4 iterations, then one process
    resumes from their checkpoint at iteration 3 and does 4 more."""
    _, cfg_path, checkpoint = save_teacher(str(tmp_path))
    out = str(tmp_path / "run")
    opts = tiny_opts(sample_root, optim__epochs=1, train__checkpoint_period=2, **distil_overrides(cfg_path, checkpoint))
    train_py = os.path.join(REPO, "dinov2", "train", "train.py")
    run_torchrun([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", train_py,
                  "--config-file", SAMPLE_CONFIG, "--output-dir", out, *opts], {**os.environ, "OMP_NUM_THREADS": "1"})
    log = open(os.path.join(out, "logs", "log.txt")).read()
    assert "DISTRIBUTED FSDP" in log and f"Distilling from a frozen vit_small/16 ({checkpoint})" in log

    run_training(out, tiny_opts(sample_root, optim__epochs=2, **distil_overrides(cfg_path, checkpoint)))
    log = open(os.path.join(out, "logs", "log.txt")).read()
    assert "model_final.rank_0.pth at iteration 3" in log and "written by 2 ranks, this run has 1" in log
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == list(range(8))
    assert all(0 < m["ibot_loss"] < float("inf") and 0 < m["dino_global_crops_loss"] for m in metrics)
    saved = torch.load(os.path.join(out, "eval", "training_7", "teacher_checkpoint.pth"), weights_only=True)
    assert saved["teacher"]["backbone.cls_token"].shape == (1, 1, 192)


def test_shipped_distillation_config_distils_a_bbu_vitb14_teacher():
    cfg, teacher_cfg = (load_and_merge_config(f"train/{name}") for name in ("bbu_distill_vits14", "bbu_vitb14"))
    assert cfg.distillation.enabled and cfg.student.drop_path_rate == 0
    check_compatible(cfg, teacher_cfg, cfg.dino.head_n_prototypes)
    with pytest.raises(ConfigError, match="distillation.full_cfg_path is empty"):
        SSLMetaArch(cfg)
