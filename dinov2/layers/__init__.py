"""Building blocks of the DINOv2 vision transformer and its projection heads (upstream names and state-dict keys)."""

from .attention import Attention, MemEffAttention
from .block import Block, NestedTensorBlock, drop_add_residual_stochastic_depth
from .dino_head import DINOHead
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused

__all__ = [
    "Attention",
    "Block",
    "DINOHead",
    "DropPath",
    "LayerScale",
    "MemEffAttention",
    "Mlp",
    "NestedTensorBlock",
    "PatchEmbed",
    "SwiGLUFFN",
    "SwiGLUFFNFused",
    "drop_add_residual_stochastic_depth",
]
