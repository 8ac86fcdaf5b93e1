import pytest
from omegaconf import OmegaConf

from dinov2.configs import dinov2_default_config
from dinov2.layers import DropPath
from dinov2.models import build_model, build_model_from_cfg


def tiny_cfg(**student):
    cfg = OmegaConf.create(dinov2_default_config)
    cfg.student.update({"arch": "vit_tiny", "patch_size": 16, "drop_path_rate": 0.3, "layerscale": 1e-5, **student})
    cfg.crops.global_crops_size = 32
    return cfg


def test_build_model_from_cfg_student_and_teacher():
    student, teacher, embed_dim = build_model_from_cfg(tiny_cfg())
    assert embed_dim == 192
    assert student.pos_embed.shape == teacher.pos_embed.shape == (1, 1 + 2 * 2, 192)  # global_crops_size 32
    assert [b.sample_drop_ratio for b in student.blocks] == [0.3] * 12  # drop_path_uniform: true by default
    assert all(b.sample_drop_ratio == 0.0 for b in teacher.blocks)
    assert not any(isinstance(m, DropPath) for m in teacher.modules())
    assert list(student.state_dict()) == list(teacher.state_dict())
    assert student.blocks[0].ls1.gamma[0].item() == pytest.approx(1e-5)


def test_build_model_only_teacher_memeff_suffix_and_img_size():
    cfg = tiny_cfg(arch="vit_tiny_memeff", num_register_tokens=2, block_chunks=3, img_size=64)
    teacher, embed_dim = build_model_from_cfg(cfg, only_teacher=True)
    assert embed_dim == 192
    assert teacher.pos_embed.shape == (1, 1 + 4 * 4, 192)  # student.img_size overrides global_crops_size
    assert teacher.register_tokens.shape == (1, 2, 192)
    assert len(teacher.blocks) == 3 and "blocks.2.11.norm1.weight" in teacher.state_dict()
    assert cfg.student.arch == "vit_tiny_memeff"  # the config is not modified


def test_build_model_default_img_size_and_unknown_arch():
    teacher, _ = build_model(tiny_cfg().student, only_teacher=True)
    assert teacher.pos_embed.shape == (1, 1 + 14 * 14, 192)  # img_size=224 by default
    with pytest.raises(ValueError, match="Unknown student.arch 'vit_huge'"):
        build_model(tiny_cfg(arch="vit_huge").student)
