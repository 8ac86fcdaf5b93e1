"""DINO / iBOT projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototype layer.

The last layer keeps the released/upstream state-dict keys `last_layer.weight_g` (K, 1) and
`last_layer.weight_v` (K, bottleneck). It is a small explicit module rather than a `torch.nn.utils.weight_norm`
hook: same math and keys, but it can be deep-copied (teacher = copy of student), needs no state-dict key
remapping and gives no deprecation warnings across PyTorch versions.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight `weight_g * weight_v / ||weight_v||` (norm per output row)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight_v as PyTorch's default Linear init, weight_g = 1 (unit-norm prototypes, as upstream DINOv2)."""
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool = False, bias: bool = True
) -> nn.Module:
    """Linear layers with GELU (and optional BatchNorm) between them; keys `mlp.0/2/4` without BN."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    for _ in range(nlayers - 2):
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim, bias=bias)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim, bias=bias)]
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection head producing `out_dim` prototype scores from backbone features."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn=use_bn, bias=mlp_bias)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    @classmethod
    def from_cfg(cls, in_dim: int, head_cfg: Any) -> "DINOHead":
        """The head a config's `dino` or `ibot` section describes (`head_n_prototypes`, `head_hidden_dim`,
        `head_bottleneck_dim`, `head_nlayers`)."""
        return cls(
            in_dim=in_dim,
            out_dim=head_cfg.head_n_prototypes,
            hidden_dim=head_cfg.head_hidden_dim,
            bottleneck_dim=head_cfg.head_bottleneck_dim,
            nlayers=head_cfg.head_nlayers,
        )

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
