import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinov2.layers import DropPath, MemEffAttention, NestedTensorBlock
from dinov2.models.vision_transformer import BlockChunk, DinoVisionTransformer, vit_large, vit_tiny

DIM, DEPTH, HEADS, PATCH, IMG = 32, 4, 4, 4, 16  # 4x4 stored position grid


def make_vit(**kwargs) -> DinoVisionTransformer:
    torch.manual_seed(0)
    defaults = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, init_values=1.0,
                    block_chunks=0, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention))  # fmt: skip
    defaults.update(kwargs)
    model = DinoVisionTransformer(**defaults)
    with torch.no_grad():  # non-trivial tokens so that masking/ordering errors show
        model.mask_token.normal_()
        model.cls_token.normal_()
        if model.register_tokens is not None:
            model.register_tokens.normal_()
    return model.eval()


def assert_outputs_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("registers", [0, 2])
def test_forward_features_shapes_and_token_order(registers):
    model = make_vit(num_register_tokens=registers)
    x = torch.randn(2, 3, 16, 24)
    out = model.forward_features(x)
    assert out["x_norm_clstoken"].shape == (2, DIM)
    assert out["x_norm_regtokens"].shape == (2, registers, DIM)
    assert out["x_norm_patchtokens"].shape == (2, 4 * 6, DIM)
    assert out["x_prenorm"].shape == (2, 1 + registers + 24, DIM)
    assert out["masks"] is None
    normed = model.norm(out["x_prenorm"])
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0])
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 1 + registers :])
    tokens = model.prepare_tokens_with_masks(x)
    pos = model.interpolate_pos_encoding(torch.zeros(1, 1 + 24, DIM), 16, 24)
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + pos[:, :1]).expand(2, 1, DIM)[:, 0])
    if registers:  # registers follow cls and get no position embedding
        torch.testing.assert_close(tokens[:, 1 : 1 + registers], model.register_tokens.expand(2, -1, -1))
    torch.testing.assert_close(tokens[:, 1 + registers :], model.patch_embed(x) + pos[:, 1:])


def test_forward_returns_cls_token_or_dict():
    model = make_vit()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), model.forward_features(x)["x_norm_clstoken"])
    assert isinstance(model(x, is_training=True), dict)
    assert isinstance(model.head, nn.Identity)


def test_masks_replace_patch_tokens_by_mask_token():
    model = make_vit()
    x = torch.randn(2, 3, 16, 16)
    masks = torch.rand(2, 16) > 0.5
    masks[0, 0], masks[1, 0] = True, False
    tokens = model.prepare_tokens_with_masks(x, masks)
    pos = model.pos_embed[0, 1:]
    patches = model.patch_embed(x)
    expected = torch.where(masks[..., None], model.mask_token + pos, patches + pos)
    torch.testing.assert_close(tokens[:, 1:], expected)
    out = model.forward_features(x, masks=masks)
    assert out["masks"] is masks
    assert not torch.allclose(out["x_prenorm"], model.forward_features(x)["x_prenorm"])


@pytest.mark.parametrize("registers", [0, 2])
def test_list_forward_equals_separate_forwards(registers):
    model = make_vit(num_register_tokens=registers, drop_path_rate=0.4)
    global_crops = torch.randn(4, 3, 16, 16)
    local_crops = torch.randn(6, 3, 8, 8)
    masks = torch.rand(4, 16) > 0.6
    outs = model([global_crops, local_crops], masks=[masks, None], is_training=True)
    assert isinstance(outs, list) and len(outs) == 2
    assert_outputs_close(outs[0], model.forward_features(global_crops, masks=masks))
    assert_outputs_close(outs[1], model.forward_features(local_crops))
    assert outs[0]["masks"] is masks and outs[1]["masks"] is None
    with pytest.raises(ValueError, match="needs a list of 2 masks"):
        model.forward_features([global_crops, local_crops], masks=masks)
    cls_list = model([global_crops, local_crops])
    torch.testing.assert_close(cls_list[1], outs[1]["x_norm_clstoken"], atol=1e-5, rtol=1e-5)


def test_list_forward_in_training_with_stochastic_depth():
    model = make_vit(drop_path_rate=0.5, drop_path_uniform=True).train()
    outs = model([torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 8)], masks=[None, None], is_training=True)
    assert [o["x_norm_patchtokens"].shape for o in outs] == [(4, 16, DIM), (6, 4, DIM)]
    sum(o["x_norm_clstoken"].sum() for o in outs).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def _grid(model: DinoVisionTransformer) -> torch.Tensor:
    side = IMG // PATCH
    return model.pos_embed[:, 1:].reshape(1, side, side, DIM).permute(0, 3, 1, 2)


def _flatten_grid(grid: torch.Tensor) -> torch.Tensor:
    return grid.permute(0, 2, 3, 1).flatten(1, 2)


def test_pos_embed_interpolation_offset_uses_scale_factor():
    model = make_vit()  # interpolate_offset=0.1, no antialias
    tokens = torch.zeros(1, 1 + 6 * 8, DIM)
    pos = model.interpolate_pos_encoding(tokens, 24, 32)  # h0=6, w0=8 from a 4x4 grid
    expected = F.interpolate(_grid(model), scale_factor=(6.1 / 4, 8.1 / 4), mode="bicubic", antialias=False)
    torch.testing.assert_close(pos[:, 1:], _flatten_grid(expected))
    torch.testing.assert_close(pos[:, :1], model.pos_embed[:, :1])
    by_size = F.interpolate(_grid(model), size=(6, 8), mode="bicubic", antialias=False)
    assert not torch.allclose(pos[:, 1:], _flatten_grid(by_size), atol=1e-4)  # the two rules differ


def test_pos_embed_interpolation_without_offset_uses_size_and_antialias():
    model = make_vit(interpolate_offset=0.0, interpolate_antialias=True)
    pos = model.interpolate_pos_encoding(torch.zeros(1, 1 + 2 * 3, DIM), 8, 12)  # downsample 4x4 -> 2x3
    expected = F.interpolate(_grid(model), size=(2, 3), mode="bicubic", antialias=True)
    torch.testing.assert_close(pos[:, 1:], _flatten_grid(expected))
    plain = F.interpolate(_grid(model), size=(2, 3), mode="bicubic", antialias=False)
    assert not torch.allclose(pos[:, 1:], _flatten_grid(plain), atol=1e-4)


def test_pos_embed_stored_grid_returned_and_low_precision_computed_in_float32():
    model = make_vit()
    assert model.interpolate_pos_encoding(torch.zeros(1, 17, DIM), 16, 16) is model.pos_embed
    pos16 = model.interpolate_pos_encoding(torch.zeros(1, 1 + 6 * 8, DIM, dtype=torch.bfloat16), 24, 32)
    pos32 = model.interpolate_pos_encoding(torch.zeros(1, 1 + 6 * 8, DIM), 24, 32)
    assert pos16.dtype == torch.bfloat16
    torch.testing.assert_close(pos16, pos32.to(torch.bfloat16))


def test_get_intermediate_layers_matches_forward_features():
    model = make_vit(num_register_tokens=1)
    x = torch.randn(2, 3, 16, 12)
    features = model.forward_features(x)
    (last,) = model.get_intermediate_layers(x, n=1)
    torch.testing.assert_close(last, features["x_norm_patchtokens"])
    layers = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert len(layers) == 2
    patches, cls = layers[1]
    assert patches.shape == (2, DIM, 4, 3)
    torch.testing.assert_close(patches, features["x_norm_patchtokens"].reshape(2, 4, 3, DIM).permute(0, 3, 1, 2))
    torch.testing.assert_close(cls, features["x_norm_clstoken"])
    # indices select blocks; norm=False gives raw block outputs
    tokens = model.prepare_tokens_with_masks(x)
    first = model.blocks[0](tokens)
    third = model.blocks[2](model.blocks[1](first))
    raw = model.get_intermediate_layers(x, n=[0, 2], norm=False)
    torch.testing.assert_close(raw[0], first[:, 2:])
    torch.testing.assert_close(raw[1], third[:, 2:])
    with pytest.raises(ValueError, match="selects no valid block"):
        model.get_intermediate_layers(x, n=[4])


def test_chunked_blocks_keys_and_outputs_equal_flat():
    flat = make_vit()
    chunked = make_vit(block_chunks=2)
    assert isinstance(chunked.blocks[0], BlockChunk)
    padding = [type(m).__name__ for m in chunked.blocks[1]]
    assert padding == ["Identity", "Identity", "NestedTensorBlock", "NestedTensorBlock"]
    block_prefixes = sorted({".".join(k.split(".")[:3]) for k in chunked.state_dict() if k.startswith("blocks.")})
    assert block_prefixes == ["blocks.0.0", "blocks.0.1", "blocks.1.2", "blocks.1.3"]
    renamed = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in chunked.state_dict().items()}
    assert list(renamed) == list(flat.state_dict())
    flat.load_state_dict(renamed, strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert_outputs_close(chunked.forward_features(x), flat.forward_features(x))
    for a, b in zip(chunked.get_intermediate_layers(x, n=3), flat.get_intermediate_layers(x, n=3)):
        torch.testing.assert_close(a, b)
    global_crops, local_crops = torch.randn(2, 3, 16, 16), torch.randn(3, 3, 8, 8)
    chunked_outs = chunked([global_crops, local_crops], is_training=True)
    for a, b in zip(chunked_outs, flat([global_crops, local_crops], is_training=True)):
        assert_outputs_close(a, b)


def test_vit_large_four_chunks_keep_global_indices():
    with torch.device("meta"):
        model = vit_large(patch_size=14, block_chunks=4, init_values=1.0)
    prefixes = []
    for key in model.state_dict():
        if key.startswith("blocks.") and key.endswith(".norm1.weight"):
            prefixes.append(tuple(int(p) for p in key.split(".")[1:3]))
    assert prefixes == [(i // 6, i) for i in range(24)]


def test_init_and_layerscale_and_drop_path_schedule():
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                  init_values=1e-5, drop_path_rate=0.3, num_register_tokens=2)  # fmt: skip
    assert model.chunked_blocks and len(model.blocks) == 1  # upstream constructor default block_chunks=1
    assert torch.count_nonzero(model.mask_token) == 0
    assert model.cls_token.abs().max() < 1e-4 and model.register_tokens.abs().max() < 1e-4
    assert 0.015 < model.pos_embed.std() < 0.025
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert torch.count_nonzero(module.bias) == 0, name
            assert 0.01 < module.weight.std() < 0.03, name
    torch.testing.assert_close(model.flat_blocks()[0].ls1.gamma.data, torch.full((DIM,), 1e-5))
    assert [b.sample_drop_ratio for b in model.flat_blocks()] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert isinstance(model.flat_blocks()[0].drop_path1, nn.Identity)
    assert isinstance(model.flat_blocks()[3].drop_path2, DropPath)
    uniform = DinoVisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                    drop_path_rate=0.3, drop_path_uniform=True)  # fmt: skip
    assert [b.sample_drop_ratio for b in uniform.flat_blocks()] == [0.3] * DEPTH
    assert not any(".ls" in k for k in uniform.state_dict())  # init_values=None -> no LayerScale


def test_ffn_layer_choices():
    swiglu = make_vit(ffn_layer="swiglufused")
    assert swiglu.blocks[0].mlp.w12.weight.shape == (2 * 88, DIM)  # (int(128 * 2 / 3) + 7) // 8 * 8 = 88
    assert not any(".mlp." in k for k in make_vit(ffn_layer="identity").state_dict())
    with pytest.raises(ValueError, match="Unknown ffn_layer 'gelu'"):
        make_vit(ffn_layer="gelu")


def test_vit_tiny_factory():
    model = vit_tiny(patch_size=16, img_size=32, block_chunks=0)
    assert (model.embed_dim, model.n_blocks, model.num_heads) == (192, 12, 3)
    assert model.pos_embed.shape == (1, 5, 192)
    assert model.forward_features(torch.randn(1, 3, 32, 48))["x_norm_patchtokens"].shape == (1, 6, 192)
