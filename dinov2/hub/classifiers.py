"""Hub entry points of the released ImageNet-1k linear classifiers on top of the DINOv2 backbones."""

from enum import Enum
from typing import Union

import torch
from torch import nn

from dinov2.utils.utils import load_pretrained_weights

from .backbones import Weights as BackboneWeights
from .backbones import _REG_KWARGS, _as_weights, _make_dinov2_model
from .utils import _make_dinov2_model_name, _make_weights_url, get_weights_file

NUM_CLASSES = 1000


class Weights(Enum):
    IMAGENET1K = "IMAGENET1K"


WeightsArg = Union[Weights, str]
BackboneWeightsArg = Union[BackboneWeights, str]


def _make_dinov2_linear_classification_head(
    *,
    arch_name: str = "vit_large",
    patch_size: int = 14,
    embed_dim: int = 1024,
    layers: int = 4,
    pretrained: bool = True,
    weights: WeightsArg = Weights.IMAGENET1K,
    num_register_tokens: int = 0,
) -> nn.Linear:
    """`nn.Linear((1 + layers) * embed_dim, 1000)`; with `pretrained`, loaded strictly from `weights` (a path/URL)
    or, for `Weights.IMAGENET1K`, from `<model>_linear[4]_head.pth` (see `get_weights_file`)."""
    if layers not in (1, 4):
        raise ValueError(f"layers must be 1 or 4 (the released heads), got {layers}")
    weights = _as_weights(weights, Weights)
    linear_head = nn.Linear((1 + layers) * embed_dim, NUM_CLASSES)
    if pretrained:
        if isinstance(weights, Weights):
            model_name = _make_dinov2_model_name(arch_name, patch_size, num_register_tokens)
            file_name = f"{model_name}_linear{4 if layers == 4 else ''}_head.pth"
            weights = get_weights_file(file_name, _make_weights_url(arch_name, patch_size, file_name))
        load_pretrained_weights(linear_head, weights, checkpoint_key=None, strict=True)
    return linear_head


class _LinearClassifierWrapper(nn.Module):
    """Backbone + linear head on `[cls token(s), mean patch token]`: with `layers=1` the final normalised cls token
    and mean patch token; with `layers=4` the normalised cls tokens of the last 4 blocks and the mean patch token
    of the last block."""

    def __init__(self, *, backbone: nn.Module, linear_head: nn.Linear, layers: int = 4) -> None:
        super().__init__()
        if layers not in (1, 4):
            raise ValueError(f"layers must be 1 or 4, got {layers}")
        self.backbone = backbone
        self.linear_head = linear_head
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layers == 1:
            features = self.backbone.forward_features(x)
            cls_tokens = [features["x_norm_clstoken"]]
            patch_tokens = features["x_norm_patchtokens"]
        else:
            outputs = self.backbone.get_intermediate_layers(x, n=4, return_class_token=True)
            cls_tokens = [cls_token for _, cls_token in outputs]
            patch_tokens = outputs[-1][0]
        return self.linear_head(torch.cat([*cls_tokens, patch_tokens.mean(dim=1)], dim=1))


def _make_dinov2_linear_classifier(
    *,
    arch_name: str = "vit_large",
    layers: int = 4,
    pretrained: bool = True,
    weights: WeightsArg = Weights.IMAGENET1K,
    backbone_weights: BackboneWeightsArg = BackboneWeights.LVD142M,
    num_register_tokens: int = 0,
    interpolate_antialias: bool = False,
    interpolate_offset: float = 0.1,
    **kwargs,
) -> _LinearClassifierWrapper:
    """Released backbone (weights `backbone_weights`) + linear head (weights `weights`); `kwargs` go to the backbone."""
    backbone = _make_dinov2_model(
        arch_name=arch_name,
        pretrained=pretrained,
        weights=backbone_weights,
        num_register_tokens=num_register_tokens,
        interpolate_antialias=interpolate_antialias,
        interpolate_offset=interpolate_offset,
        **kwargs,
    )
    linear_head = _make_dinov2_linear_classification_head(
        arch_name=arch_name,
        patch_size=backbone.patch_size,
        embed_dim=backbone.embed_dim,
        layers=layers,
        pretrained=pretrained,
        weights=weights,
        num_register_tokens=num_register_tokens,
    )
    return _LinearClassifierWrapper(backbone=backbone, linear_head=linear_head, layers=layers)


def dinov2_vits14_lc(
    *, layers: int = 4, pretrained: bool = True, weights: WeightsArg = Weights.IMAGENET1K, **kwargs
) -> _LinearClassifierWrapper:
    """DINOv2 ViT-S/14 backbone + ImageNet-1k linear head."""
    return _make_dinov2_linear_classifier(
        arch_name="vit_small", layers=layers, pretrained=pretrained, weights=weights, **kwargs
    )


def dinov2_vitb14_lc(
    *, layers: int = 4, pretrained: bool = True, weights: WeightsArg = Weights.IMAGENET1K, **kwargs
) -> _LinearClassifierWrapper:
    """DINOv2 ViT-B/14 backbone + ImageNet-1k linear head."""
    return _make_dinov2_linear_classifier(
        arch_name="vit_base", layers=layers, pretrained=pretrained, weights=weights, **kwargs
    )


def dinov2_vitl14_lc(
    *, layers: int = 4, pretrained: bool = True, weights: WeightsArg = Weights.IMAGENET1K, **kwargs
) -> _LinearClassifierWrapper:
    """DINOv2 ViT-L/14 backbone + ImageNet-1k linear head."""
    return _make_dinov2_linear_classifier(
        arch_name="vit_large", layers=layers, pretrained=pretrained, weights=weights, **kwargs
    )


def dinov2_vitg14_lc(
    *, layers: int = 4, pretrained: bool = True, weights: WeightsArg = Weights.IMAGENET1K, **kwargs
) -> _LinearClassifierWrapper:
    """DINOv2 ViT-g/14 (SwiGLU FFN) backbone + ImageNet-1k linear head."""
    kwargs = {"ffn_layer": "swiglufused", **kwargs}
    return _make_dinov2_linear_classifier(
        arch_name="vit_giant2", layers=layers, pretrained=pretrained, weights=weights, **kwargs
    )


def dinov2_vits14_reg_lc(
    *, layers: int = 4, pretrained: bool = True, weights: WeightsArg = Weights.IMAGENET1K, **kwargs
) -> _LinearClassifierWrapper:
    """DINOv2 ViT-S/14 with 4 registers + ImageNet-1k linear head."""
    kwargs = {**_REG_KWARGS, **kwargs}
    return _make_dinov2_linear_classifier(
        arch_name="vit_small", layers=layers, pretrained=pretrained, weights=weights, **kwargs
    )


def dinov2_vitb14_reg_lc(
    *, layers: int = 4, pretrained: bool = True, weights: WeightsArg = Weights.IMAGENET1K, **kwargs
) -> _LinearClassifierWrapper:
    """DINOv2 ViT-B/14 with 4 registers + ImageNet-1k linear head."""
    kwargs = {**_REG_KWARGS, **kwargs}
    return _make_dinov2_linear_classifier(
        arch_name="vit_base", layers=layers, pretrained=pretrained, weights=weights, **kwargs
    )


def dinov2_vitl14_reg_lc(
    *, layers: int = 4, pretrained: bool = True, weights: WeightsArg = Weights.IMAGENET1K, **kwargs
) -> _LinearClassifierWrapper:
    """DINOv2 ViT-L/14 with 4 registers + ImageNet-1k linear head."""
    kwargs = {**_REG_KWARGS, **kwargs}
    return _make_dinov2_linear_classifier(
        arch_name="vit_large", layers=layers, pretrained=pretrained, weights=weights, **kwargs
    )


def dinov2_vitg14_reg_lc(
    *, layers: int = 4, pretrained: bool = True, weights: WeightsArg = Weights.IMAGENET1K, **kwargs
) -> _LinearClassifierWrapper:
    """DINOv2 ViT-g/14 with 4 registers (SwiGLU FFN) + ImageNet-1k linear head."""
    kwargs = {"ffn_layer": "swiglufused", **_REG_KWARGS, **kwargs}
    return _make_dinov2_linear_classifier(
        arch_name="vit_giant2", layers=layers, pretrained=pretrained, weights=weights, **kwargs
    )
