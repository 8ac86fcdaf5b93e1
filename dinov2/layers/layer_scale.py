"""LayerScale: a learnable per-channel scale on a residual branch (CaiT), parameter `gamma`."""

import torch
from torch import nn


class LayerScale(nn.Module):
    """Multiply the last dimension by `gamma`, initialised to `init_values`."""

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma
