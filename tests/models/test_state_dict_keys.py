"""The released checkpoint layout (keys, order, shapes) of the hub backbones, built on the meta device."""

import pytest
import torch

from dinov2.models import vision_transformer as vits

# arch -> (embed_dim, depth, ffn keys with shapes per block); hidden sizes as in the released files
ARCHS = {
    "vit_small": (384, 12, [("mlp.fc1.weight", (1536, 384)), ("mlp.fc1.bias", (1536,)),
                            ("mlp.fc2.weight", (384, 1536)), ("mlp.fc2.bias", (384,))]),
    "vit_base": (768, 12, [("mlp.fc1.weight", (3072, 768)), ("mlp.fc1.bias", (3072,)),
                           ("mlp.fc2.weight", (768, 3072)), ("mlp.fc2.bias", (768,))]),
    "vit_large": (1024, 24, [("mlp.fc1.weight", (4096, 1024)), ("mlp.fc1.bias", (4096,)),
                             ("mlp.fc2.weight", (1024, 4096)), ("mlp.fc2.bias", (1024,))]),
    "vit_giant2": (1536, 40, [("mlp.w12.weight", (8192, 1536)), ("mlp.w12.bias", (8192,)),
                              ("mlp.w3.weight", (1536, 4096)), ("mlp.w3.bias", (1536,))]),
}  # fmt: skip


def released_layout(arch: str, registers: int) -> list[tuple[str, tuple[int, ...]]]:
    dim, depth, ffn = ARCHS[arch]
    keys = [("cls_token", (1, 1, dim)), ("pos_embed", (1, 1370, dim))]
    if registers:
        keys.append(("register_tokens", (1, registers, dim)))
    keys += [("mask_token", (1, dim)), ("patch_embed.proj.weight", (dim, 3, 14, 14)), ("patch_embed.proj.bias", (dim,))]
    for i in range(depth):
        block = [("norm1.weight", (dim,)), ("norm1.bias", (dim,)),
                 ("attn.qkv.weight", (3 * dim, dim)), ("attn.qkv.bias", (3 * dim,)),
                 ("attn.proj.weight", (dim, dim)), ("attn.proj.bias", (dim,)), ("ls1.gamma", (dim,)),
                 ("norm2.weight", (dim,)), ("norm2.bias", (dim,)), *ffn, ("ls2.gamma", (dim,))]  # fmt: skip
        keys += [(f"blocks.{i}.{name}", shape) for name, shape in block]
    return keys + [("norm.weight", (dim,)), ("norm.bias", (dim,))]


def build_hub_layout(arch: str, registers: int) -> torch.nn.Module:
    """The model as the hub builds it for `dinov2_vit?14[_reg]`."""
    kwargs = dict(patch_size=14, img_size=518, init_values=1.0, block_chunks=0, num_register_tokens=registers)
    if arch == "vit_giant2":
        kwargs["ffn_layer"] = "swiglufused"
    if registers:
        kwargs.update(interpolate_antialias=True, interpolate_offset=0.0)
    with torch.device("meta"):
        return getattr(vits, arch)(**kwargs)


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_released_state_dict_layout(arch, registers):
    model = build_hub_layout(arch, registers)
    layout = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert layout == released_layout(arch, registers)


def test_vits14_literal_shapes():
    state = build_hub_layout("vit_small", 0).state_dict()
    assert len(state) == 5 + 12 * 14 + 2
    assert state["pos_embed"].shape == (1, 1370, 384)
    assert state["blocks.11.attn.qkv.weight"].shape == (1152, 384)
    assert sum(v.numel() for v in state.values()) == 22_056_576
