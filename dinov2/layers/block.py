"""Pre-norm transformer block with LayerScale and stochastic depth (keys `norm1, attn, ls1, norm2, mlp, ls2`).

Stochastic depth in training follows upstream DINOv2: the residual branch is computed only for a random subset of
`max(int(batch * (1 - rate)), 1)` samples and added back scaled by batch/subset (saves compute in proportion to the
rate). Upstream does so for a list of crop sets (multi-crop training) at any rate above 0, and for a single tensor at
rates above 0.1; a single tensor at a rate in (0, 0.1] gets per-sample DropPath. In eval mode the residuals are
added unchanged.

`NestedTensorBlock` also takes a list of (B_i, N_i, D) tensors (multi-crop: global and local crops): norms, linear
layers and the FFN run once on all tokens concatenated, attention runs per crop set.

Activation checkpointing (`activation_checkpointing = True`, set from `train.activation_checkpointing`): in training
with autograd on, a block keeps only its input for backward and recomputes its activations there (non-reentrant
`torch.utils.checkpoint` with the RNG state preserved, so stochastic depth redraws the same subsets and the
gradients are those of the plain block).
"""

from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp

ListResidual = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


def drop_add_residual_stochastic_depth_list(
    x_list: Sequence[torch.Tensor], residual_func: ListResidual, sample_drop_ratio: float = 0.0
) -> list[torch.Tensor]:
    """`x + residual(x)` per crop set, with the residual computed on a random kept subset of each batch.

    For each (B, N, D) tensor, `max(int(B * (1 - ratio)), 1)` samples are drawn without replacement; their
    residual is scaled by B / subset so that the expectation over draws equals the full residual.
    """
    subsets = []
    for x in x_list:
        batch = x.shape[0]
        subset_size = max(int(batch * (1 - sample_drop_ratio)), 1)
        subsets.append(torch.randperm(batch, device=x.device)[:subset_size])
    residuals = residual_func([x[index] for x, index in zip(x_list, subsets)])
    outputs = []
    for x, index, residual in zip(x_list, subsets, residuals):
        scale = x.shape[0] / index.numel()
        added = torch.index_add(x.flatten(1), 0, index, residual.flatten(1).to(x.dtype), alpha=scale)
        outputs.append(added.view_as(x))
    return outputs


def drop_add_residual_stochastic_depth(
    x: torch.Tensor, residual_func: Callable[[torch.Tensor], torch.Tensor], sample_drop_ratio: float = 0.0
) -> torch.Tensor:
    """Single-tensor form of `drop_add_residual_stochastic_depth_list`."""
    return drop_add_residual_stochastic_depth_list([x], lambda xs: [residual_func(xs[0])], sample_drop_ratio)[0]


class Block(nn.Module):
    """`x + ls1(attn(norm1(x)))`, then `x + ls2(mlp(norm2(x)))`, with stochastic depth `drop_path` in training."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., Attention] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, bias=ffn_bias
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path
        self.activation_checkpointing = False

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.forward_impl, x, use_reentrant=False)
        return self.forward_impl(x)

    def forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        """The block without activation checkpointing."""
        if self.training and self.sample_drop_ratio > 0.1:
            x = drop_add_residual_stochastic_depth(x, self.attn_residual, self.sample_drop_ratio)
            return drop_add_residual_stochastic_depth(x, self.ffn_residual, self.sample_drop_ratio)
        if self.training and self.sample_drop_ratio > 0.0:
            x = x + self.drop_path1(self.attn_residual(x))
            return x + self.drop_path2(self.ffn_residual(x))
        x = x + self.attn_residual(x)
        return x + self.ffn_residual(x)


def _cat_tokens(x_list: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(B_i, N_i, D) tensors -> (sum_i B_i*N_i, D) and the list of (B_i, N_i)."""
    shapes = [(x.shape[0], x.shape[1]) for x in x_list]
    return torch.cat([x.flatten(0, 1) for x in x_list]), shapes


def _split_tokens(x: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of `_cat_tokens`."""
    parts = x.split([b * n for b, n in shapes])
    return [part.view(b, n, -1) for part, (b, n) in zip(parts, shapes)]


class NestedTensorBlock(Block):
    """`Block` that also accepts a list of crop sets with different token counts (multi-crop training)."""

    def attn_residual_list(self, x_list: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x, shapes = _cat_tokens(x_list)
        return _split_tokens(self.ls1(self.attn.forward_list(self.norm1(x), shapes)), shapes)

    def ffn_residual_list(self, x_list: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x, shapes = _cat_tokens(x_list)
        return _split_tokens(self.ls2(self.mlp(self.norm2(x))), shapes)

    def forward_nested(self, x_list: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The block applied to each crop set, sharing the norm/linear/FFN calls across crop sets."""
        if self.training and self.sample_drop_ratio > 0.0:
            x_list = drop_add_residual_stochastic_depth_list(x_list, self.attn_residual_list, self.sample_drop_ratio)
            return drop_add_residual_stochastic_depth_list(x_list, self.ffn_residual_list, self.sample_drop_ratio)
        x_list = [x + r for x, r in zip(x_list, self.attn_residual_list(x_list))]
        return [x + r for x, r in zip(x_list, self.ffn_residual_list(x_list))]

    def forward_impl(self, x_or_x_list: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(x_or_x_list, torch.Tensor):
            return super().forward_impl(x_or_x_list)
        if isinstance(x_or_x_list, (list, tuple)):
            return self.forward_nested(x_or_x_list)
        raise TypeError(f"NestedTensorBlock expects a tensor or a list of tensors, got {type(x_or_x_list).__name__}")
