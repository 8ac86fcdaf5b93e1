"""Multi-head self-attention (keys `qkv`, `proj`).

The attention kernel is PyTorch's `F.scaled_dot_product_attention` on CPU and GPU. xFormers'
`memory_efficient_attention` replaces it only when xFormers is importable, the input is on CUDA and the
environment variable `XFORMERS_DISABLED` is unset; xFormers is optional and never required.

`forward_list` serves multi-crop training: the linear layers run once on the concatenated tokens of all crop
sets (global and local crops have different token counts) and attention runs per crop set, so tokens never
attend across crop sets.
"""

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:
    if os.environ.get("XFORMERS_DISABLED") is not None:
        raise ImportError("XFORMERS_DISABLED is set")
    from xformers.ops import memory_efficient_attention

    XFORMERS_AVAILABLE = True
except ImportError:
    memory_efficient_attention = None
    XFORMERS_AVAILABLE = False


def use_xformers(x: torch.Tensor) -> bool:
    """Whether the xFormers kernel handles `x`: importable, on CUDA and not disabled by `XFORMERS_DISABLED`."""
    return XFORMERS_AVAILABLE and x.is_cuda and os.environ.get("XFORMERS_DISABLED") is None


class Attention(nn.Module):
    """Multi-head self-attention on (B, N, D) tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, qkv: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of (B, N, 3*D) projected tokens -> (B, N, D), before the output projection.

        `attn_bias` (float added to the logits, or bool where True = attend), broadcastable to (B, heads, N, N),
        goes to `F.scaled_dot_product_attention`.
        """
        batch, tokens, _ = qkv.shape
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        dropout_p = self.attn_drop if self.training else 0.0
        if attn_bias is None and use_xformers(qkv):
            q, k, v = qkv.unbind(2)  # (B, N, heads, head_dim), xFormers' layout
            x = memory_efficient_attention(q, k, v, p=dropout_p)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, head_dim)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p)
            x = x.transpose(1, 2)
        return x.reshape(batch, tokens, self.num_heads * self.head_dim)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attend(self.qkv(x), attn_bias)
        return self.proj_drop(self.proj(x))

    def forward_list(self, x: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Attention of several crop sets given as concatenated flat tokens.

        `x` is (sum_i B_i*N_i, D): crop set i flattened from (B_i, N_i, D), in order. Returns the same layout.
        """
        qkv = self.qkv(x).split([b * n for b, n in shapes])
        x = torch.cat([self.attend(part.view(b, n, -1)).flatten(0, 1) for part, (b, n) in zip(qkv, shapes)])
        return self.proj_drop(self.proj(x))


class MemEffAttention(Attention):
    """Upstream's name for the attention of the released backbones (same parameters and computation).

    The kernel choice (xFormers on CUDA when available, else PyTorch SDPA) is made in `Attention.attend`.
    """
