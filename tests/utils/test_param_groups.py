"""dinov2.utils.param_groups: layer-wise lr decay, patch-embed multiplier, weight-decay exclusions, last-layer flag,
chunked and FSDP parameter names, group fusion."""

import pytest
import torch
from torch import nn

from dinov2.layers import DINOHead
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay, get_vit_lr_decay_rate

DECAY, PATCH_MULT = 0.9, 0.2


def tiny_vit(block_chunks: int = 0) -> DinoVisionTransformer:
    """3 blocks (L = 3), LayerScale, 2 registers: every kind of backbone parameter."""
    return DinoVisionTransformer(
        img_size=28, patch_size=14, embed_dim=16, depth=3, num_heads=2, init_values=1.0,
        num_register_tokens=2, block_chunks=block_chunks,
    )  # fmt: skip


def expected_vit_multipliers() -> dict:
    """name -> (lr_multiplier, wd_multiplier) written out for L = 3, decay 0.9, patch-embed multiplier 0.2."""
    embed = DECAY**4  # layer 0
    expected = {
        "cls_token": (embed, 1.0),
        "pos_embed": (embed, 1.0),
        "register_tokens": (embed, 1.0),
        "mask_token": (embed, 1.0),
        "patch_embed.proj.weight": (embed * PATCH_MULT, 1.0),
        "patch_embed.proj.bias": (embed * PATCH_MULT, 0.0),
    }
    for i, lr in enumerate([0.729, 0.81, 0.9]):  # block i -> layer i + 1 -> 0.9 ** (3 - i)
        for name, wd in [
            ("norm1.weight", 0.0), ("norm1.bias", 0.0), ("attn.qkv.weight", 1.0), ("attn.qkv.bias", 0.0),
            ("attn.proj.weight", 1.0), ("attn.proj.bias", 0.0), ("ls1.gamma", 0.0),
            ("norm2.weight", 0.0), ("norm2.bias", 0.0), ("mlp.fc1.weight", 1.0), ("mlp.fc1.bias", 0.0),
            ("mlp.fc2.weight", 1.0), ("mlp.fc2.bias", 0.0), ("ls2.gamma", 0.0),
        ]:  # fmt: skip
            expected[f"blocks.{i}.{name}"] = (lr, wd)
    expected["norm.weight"] = (1.0, 0.0)
    expected["norm.bias"] = (1.0, 0.0)
    return expected


def multipliers(groups: list) -> dict:
    return {g["name"]: (g["lr_multiplier"], g["wd_multiplier"]) for g in groups}


def assert_multipliers(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, (lr, wd) in expected.items():
        assert got[name][0] == pytest.approx(lr, rel=1e-12), name
        assert got[name][1] == wd, name


def test_flat_backbone_multipliers():
    model = tiny_vit()
    groups = get_params_groups_with_decay(model, lr_decay_rate=DECAY, patch_embed_lr_mult=PATCH_MULT)
    assert [g["name"] for g in groups] == [name for name, _ in model.named_parameters()]
    assert all(g["params"] is p for g, (_, p) in zip(groups, model.named_parameters()))
    assert not any(g["is_last_layer"] for g in groups)
    assert_multipliers(multipliers(groups), expected_vit_multipliers())


def test_chunked_backbone_uses_global_block_index():
    model = tiny_vit(block_chunks=3)  # one block per chunk: blocks.<i>.<i>.*
    groups = get_params_groups_with_decay(model, lr_decay_rate=DECAY, patch_embed_lr_mult=PATCH_MULT)
    expected = {}
    for name, value in expected_vit_multipliers().items():
        if name.startswith("blocks."):
            index = name.split(".")[1]
            name = name.replace(f"blocks.{index}.", f"blocks.{index}.{index}.", 1)
        expected[name] = value
    assert_multipliers(multipliers(groups), expected)

    model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=16, depth=4, num_heads=2, block_chunks=2)
    got = multipliers(get_params_groups_with_decay(model, lr_decay_rate=DECAY))
    assert got["blocks.0.1.attn.qkv.weight"][0] == pytest.approx(DECAY ** (4 - 1))  # block 1 -> layer 2
    assert got["blocks.1.2.attn.qkv.weight"][0] == pytest.approx(DECAY ** (4 - 2))  # block 2 -> layer 3
    assert got["blocks.1.3.mlp.fc2.weight"][0] == pytest.approx(DECAY)  # block 3 -> layer 4


def test_backbone_inside_module_dict_and_heads():
    backbone = tiny_vit()
    head = DINOHead(16, 7, hidden_dim=8, bottleneck_dim=4)
    student = nn.ModuleDict({"backbone": backbone, "dino_head": head})
    got = multipliers(get_params_groups_with_decay(student, lr_decay_rate=DECAY, patch_embed_lr_mult=PATCH_MULT))
    expected = {f"backbone.{k}": v for k, v in expected_vit_multipliers().items()}
    expected.update({f"dino_head.{k}": v for k, v in [
        ("mlp.0.weight", (1.0, 1.0)), ("mlp.0.bias", (1.0, 0.0)), ("mlp.2.weight", (1.0, 1.0)),
        ("mlp.2.bias", (1.0, 0.0)), ("mlp.4.weight", (1.0, 1.0)), ("mlp.4.bias", (1.0, 0.0)),
        ("last_layer.weight_g", (1.0, 1.0)), ("last_layer.weight_v", (1.0, 1.0)),
    ]})  # fmt: skip
    assert_multipliers(got, expected)

    head_groups = get_params_groups_with_decay(head, lr_decay_rate=DECAY, patch_embed_lr_mult=PATCH_MULT)
    assert {g["name"] for g in head_groups if g["is_last_layer"]} == {"last_layer.weight_g", "last_layer.weight_v"}
    assert all(g["lr_multiplier"] == 1.0 for g in head_groups)


def test_frozen_parameters_are_skipped():
    model = tiny_vit()
    model.mask_token.requires_grad_(False)
    names = [g["name"] for g in get_params_groups_with_decay(model)]
    assert "mask_token" not in names and len(names) == len(list(model.parameters())) - 1


def test_wrapper_names_fsdp_and_checkpointing():
    # names as seen with FSDP(use_orig_params=True) wrapping BlockChunks, and with activation checkpointing
    assert get_vit_lr_decay_rate(
        "_fsdp_wrapped_module.blocks.1._fsdp_wrapped_module.2.attn.qkv.weight", DECAY, 3, True, True
    ) == pytest.approx(DECAY)
    assert get_vit_lr_decay_rate(
        "backbone._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.mlp.fc1.weight", DECAY, 3
    ) == pytest.approx(DECAY**3)
    assert get_vit_lr_decay_rate("_fsdp_wrapped_module.pos_embed", DECAY, 3, True) == pytest.approx(DECAY**4)
    assert get_vit_lr_decay_rate("dino_head.mlp.0.weight", DECAY, 3) == 1.0  # not backbone
    with pytest.raises(ValueError, match="blocks.0.2.attn.qkv.weight.*chunked_blocks=False"):
        get_vit_lr_decay_rate("blocks.0.2.attn.qkv.weight", DECAY, 3, True, False)


def test_fuse_params_groups():
    student = nn.ModuleDict({"backbone": tiny_vit(), "dino_head": DINOHead(16, 7, hidden_dim=8, bottleneck_dim=4)})
    groups = get_params_groups_with_decay(student, lr_decay_rate=DECAY, patch_embed_lr_mult=PATCH_MULT)
    fused = fuse_params_groups(groups)
    keys = ("lr_multiplier", "wd_multiplier", "is_last_layer")
    expected = {}
    for g in groups:
        expected.setdefault(tuple(g[k] for k in keys), []).append(g["params"])
    assert [tuple(f[k] for k in keys) for f in fused] == list(expected)  # order of first appearance
    for f, params in zip(fused, expected.values()):
        assert set(f) == {"params", *keys}
        assert len(f["params"]) == len(params) and all(a is b for a, b in zip(f["params"], params))
    # embeddings: tokens, patch weight, patch bias; blocks: (wd 0, wd 1) x 3; final norm and head biases (1, 0);
    # head weights (1, 1); last layer (1, 1, last)
    assert len(fused) == 3 + 6 + 1 + 1 + 1
    optimizer = torch.optim.AdamW(fused, lr=1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(student.parameters()))
