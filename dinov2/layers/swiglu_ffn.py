"""SwiGLU feed-forward networks (keys `w12`, `w3`), used by ViT-g/14.

`w12` computes both the gate and the value in one matmul; the output is `w3(silu(gate) * value)`.
`SwiGLUFFNFused` shrinks the hidden size to 2/3 rounded up to a multiple of 8, as the released ViT-g does
(6144 -> 4096). Both are plain PyTorch, so they run on CPU; the state-dict keys equal xFormers' `SwiGLU`.
"""

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUFFN(nn.Module):
    """SwiGLU FFN with hidden size `hidden_features` (default: `in_features`)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden_features(hidden_features: int) -> int:
    """Hidden size of the fused SwiGLU: 2/3 of the MLP hidden size, rounded up to a multiple of 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFNFused(SwiGLUFFN):
    """SwiGLU FFN whose hidden size is derived from an MLP hidden size (`ffn_layer="swiglufused"`); the other
    arguments are those of `SwiGLUFFN`."""

    def __init__(self, in_features: int, hidden_features: int | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(in_features, swiglu_hidden_features(hidden_features or in_features), *args, **kwargs)
