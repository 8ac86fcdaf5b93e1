"""The packaged configs: upstream defaults, every shipped file merges, unknown keys are rejected by name."""

import pathlib

import pytest
from omegaconf import OmegaConf

from dinov2.configs import CONFIGS_DIR, ConfigError, dinov2_default_config, load_and_merge_config, merge_configs

# Upstream facebookresearch/dinov2 defaults (reference §2) that a DINOv2 user relies on.
UPSTREAM_DEFAULTS = {
    "MODEL.WEIGHTS": "",
    "compute_precision.grad_scaler": True,
    "compute_precision.student.dino_head.mixed_precision.reduce_dtype": "fp32",
    "compute_precision.teacher.backbone.sharding_strategy": "SHARD_GRAD_OP",
    "dino.loss_weight": 1.0,
    "dino.head_n_prototypes": 65536,
    "dino.head_bottleneck_dim": 256,
    "dino.head_nlayers": 3,
    "dino.head_hidden_dim": 2048,
    "dino.koleo_loss_weight": 0.1,
    "ibot.mask_sample_probability": 0.5,
    "ibot.mask_ratio_min_max": [0.1, 0.5],
    "ibot.separate_head": False,
    "train.batch_size_per_gpu": 64,
    "train.OFFICIAL_EPOCH_LENGTH": 1250,
    "train.centering": "centering",
    "student.arch": "vit_large",
    "student.patch_size": 16,
    "student.drop_path_rate": 0.3,
    "student.layerscale": 1.0e-05,
    "student.block_chunks": 0,
    "student.interpolate_offset": 0.1,
    "teacher.momentum_teacher": 0.992,
    "teacher.warmup_teacher_temp": 0.04,
    "teacher.teacher_temp": 0.07,
    "teacher.warmup_teacher_temp_epochs": 30,
    "optim.epochs": 100,
    "optim.weight_decay": 0.04,
    "optim.weight_decay_end": 0.4,
    "optim.base_lr": 0.004,
    "optim.warmup_epochs": 10,
    "optim.min_lr": 1.0e-06,
    "optim.clip_grad": 3.0,
    "optim.freeze_last_layer_epochs": 1,
    "optim.scaling_rule": "sqrt_wrt_1024",
    "optim.patch_embed_lr_mult": 0.2,
    "optim.layerwise_decay": 0.9,
    "crops.global_crops_scale": [0.32, 1.0],
    "crops.local_crops_number": 8,
    "crops.local_crops_scale": [0.05, 0.32],
    "crops.global_crops_size": 224,
    "crops.local_crops_size": 96,
    "evaluation.eval_period_iterations": 12500,
}

ALL_CONFIGS = sorted(
    str(p.relative_to(CONFIGS_DIR).with_suffix("")) for p in CONFIGS_DIR.glob("*/*.yaml")
)


@pytest.mark.parametrize("key", sorted(UPSTREAM_DEFAULTS))
def test_default_config_keeps_upstream_values(key):
    value = OmegaConf.select(dinov2_default_config, key)
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        value = list(value)
    assert value == UPSTREAM_DEFAULTS[key]


def test_blur_probabilities_default_to_the_documented_values():
    assert list(dinov2_default_config.crops.blur_probs) == [1.0, 0.1, 0.5]


def test_every_shipped_config_merges_with_the_default():
    expected = {
        "eval/vits14_pretrain", "eval/vitb14_pretrain", "eval/vitl14_pretrain", "eval/vitg14_pretrain",
        "eval/vits14_reg4_pretrain", "eval/vitb14_reg4_pretrain", "eval/vitl14_reg4_pretrain",
        "eval/vitg14_reg4_pretrain", "train/vitl16_short", "train/vitl14", "train/vitg14",
        "train/bbu_sample", "train/bbu_vits14", "train/bbu_vitb14", "train/bbu_distill_vits14",
    }
    assert expected <= set(ALL_CONFIGS)
    for name in ALL_CONFIGS:
        cfg = load_and_merge_config(name)
        assert set(cfg.keys()) == set(dinov2_default_config.keys()), name


def test_eval_configs_match_upstream_architectures():
    reg4 = load_and_merge_config("eval/vitg14_reg4_pretrain")
    assert (reg4.student.arch, reg4.student.ffn_layer, reg4.student.num_register_tokens) == ("vit_giant2", "swiglufused", 4)
    assert (reg4.student.interpolate_antialias, reg4.student.interpolate_offset) == (True, 0.0)
    assert reg4.crops.global_crops_size == 518
    small = load_and_merge_config("eval/vits14_pretrain")
    assert (small.student.arch, small.student.patch_size, small.student.num_register_tokens) == ("vit_small", 14, 0)


def test_vitg14_only_differs_from_vitl14_by_arch_and_batch():
    l14 = OmegaConf.to_container(load_and_merge_config("train/vitl14"))
    g14 = OmegaConf.to_container(load_and_merge_config("train/vitg14"))
    l14["student"]["arch"], l14["train"]["batch_size_per_gpu"] = "vit_giant2", 12
    assert l14 == g14


def test_unknown_key_in_a_file_is_named(tmp_path: pathlib.Path):
    with pytest.raises(ConfigError, match=r"'optim\.lerning_rate'.*bad\.yaml"):
        merge_configs(OmegaConf.create(dinov2_default_config), OmegaConf.create({"optim": {"lerning_rate": 1}}), source="bad.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.epochs.warmup=5", r"Unknown config key\(s\) optim\.epochs\.warmup in cli: optim\.epochs takes a value"),
        ("student.img_size.h=518", r"student\.img_size\.h in cli: student\.img_size takes a value, not a mapping"),
        ("compute_precision.teacher=3", r"compute_precision\.teacher=3 in cli: compute_precision\.teacher is a "
                                        r"section \(backbone, dino_head, ibot_head\), set its keys instead"),
    ],
)
def test_a_mapping_for_a_value_or_a_value_for_a_section_is_named(override, message):
    """OmegaConf's struct mode alone accepts both, turning a number into a mapping or dropping a section."""
    with pytest.raises(ConfigError, match=message):
        merge_configs(OmegaConf.create(dinov2_default_config), OmegaConf.from_dotlist([override]), source="cli")


def test_merge_does_not_modify_the_default():
    before = OmegaConf.to_container(dinov2_default_config)
    merge_configs(OmegaConf.create(dinov2_default_config), OmegaConf.create({"optim": {"epochs": 3}}))
    assert OmegaConf.to_container(dinov2_default_config) == before


def test_missing_packaged_config_is_named():
    with pytest.raises(FileNotFoundError, match="train/nope"):
        load_and_merge_config("train/nope")
