"""Hub entry points of the released DINOv2 backbones (ViT-S/B/L/g with patch 14, with and without registers)."""

from enum import Enum
from typing import Union

from torch import nn

from dinov2.models import vision_transformer as vits
from dinov2.utils.utils import load_pretrained_weights

from .utils import _make_dinov2_model_name, _make_weights_url, get_weights_file


class Weights(Enum):
    LVD142M = "LVD142M"


def _as_weights(weights: Union[Enum, str], enum_type: type) -> Union[Enum, str]:
    """`weights` as a member of `enum_type` when it is one (or names one, e.g. "LVD142M"); else a path or URL."""
    if isinstance(weights, enum_type):
        return weights
    if isinstance(weights, str):
        return enum_type.__members__.get(weights, weights)
    raise TypeError(f"weights must be a {enum_type.__name__} or a file path/URL, got {weights!r}")


def _make_dinov2_model(
    *,
    arch_name: str = "vit_large",
    img_size: int = 518,
    patch_size: int = 14,
    init_values: float = 1.0,
    ffn_layer: str = "mlp",
    block_chunks: int = 0,
    num_register_tokens: int = 0,
    interpolate_antialias: bool = False,
    interpolate_offset: float = 0.1,
    pretrained: bool = True,
    weights: Union[Weights, str] = Weights.LVD142M,
    **kwargs,
) -> nn.Module:
    """A `DinoVisionTransformer` as released; with `pretrained`, weights are loaded strictly from `weights` (a
    path/URL), or for `Weights.LVD142M` from `$DINOV2_WEIGHTS_DIR`, the torch hub cache or the official URL."""
    weights = _as_weights(weights, Weights)
    if arch_name not in ("vit_small", "vit_base", "vit_large", "vit_giant2"):
        raise ValueError(f"Unknown arch_name {arch_name!r}; expected vit_small, vit_base, vit_large or vit_giant2")
    vit_kwargs = dict(
        img_size=img_size,
        patch_size=patch_size,
        init_values=init_values,
        ffn_layer=ffn_layer,
        block_chunks=block_chunks,
        num_register_tokens=num_register_tokens,
        interpolate_antialias=interpolate_antialias,
        interpolate_offset=interpolate_offset,
    )
    vit_kwargs.update(**kwargs)
    model = getattr(vits, arch_name)(**vit_kwargs)

    if pretrained:
        if isinstance(weights, Weights):
            file_name = f"{_make_dinov2_model_name(arch_name, patch_size, num_register_tokens)}_pretrain.pth"
            weights = get_weights_file(file_name, _make_weights_url(arch_name, patch_size, file_name))
        load_pretrained_weights(model, weights, checkpoint_key="teacher", strict=True)
    return model


WeightsArg = Union[Weights, str]
# Register models: 4 register tokens; position embeddings resized to the exact grid with antialiasing.
_REG_KWARGS = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)


def dinov2_vits14(*, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs) -> nn.Module:
    """DINOv2 ViT-S/14 (21M parameters) pretrained on LVD-142M."""
    return _make_dinov2_model(arch_name="vit_small", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitb14(*, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs) -> nn.Module:
    """DINOv2 ViT-B/14 (86M parameters) pretrained on LVD-142M."""
    return _make_dinov2_model(arch_name="vit_base", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitl14(*, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs) -> nn.Module:
    """DINOv2 ViT-L/14 (300M parameters) pretrained on LVD-142M."""
    return _make_dinov2_model(arch_name="vit_large", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitg14(*, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs) -> nn.Module:
    """DINOv2 ViT-g/14 (1.1B parameters, SwiGLU FFN) pretrained on LVD-142M."""
    kwargs = {"ffn_layer": "swiglufused", **kwargs}
    return _make_dinov2_model(arch_name="vit_giant2", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vits14_reg(*, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs) -> nn.Module:
    """DINOv2 ViT-S/14 with 4 registers, pretrained on LVD-142M."""
    kwargs = {**_REG_KWARGS, **kwargs}
    return _make_dinov2_model(arch_name="vit_small", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitb14_reg(*, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs) -> nn.Module:
    """DINOv2 ViT-B/14 with 4 registers, pretrained on LVD-142M."""
    kwargs = {**_REG_KWARGS, **kwargs}
    return _make_dinov2_model(arch_name="vit_base", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitl14_reg(*, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs) -> nn.Module:
    """DINOv2 ViT-L/14 with 4 registers, pretrained on LVD-142M."""
    kwargs = {**_REG_KWARGS, **kwargs}
    return _make_dinov2_model(arch_name="vit_large", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitg14_reg(*, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs) -> nn.Module:
    """DINOv2 ViT-g/14 with 4 registers (SwiGLU FFN), pretrained on LVD-142M."""
    kwargs = {"ffn_layer": "swiglufused", **_REG_KWARGS, **kwargs}
    return _make_dinov2_model(arch_name="vit_giant2", pretrained=pretrained, weights=weights, **kwargs)
