"""Patch embedding: non-overlapping `patch_size` patches projected by a strided convolution (`proj`)."""

from typing import Callable

import torch
from torch import nn


def make_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    """`x` as (height, width)."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"Expected an int or a pair of ints, got {x!r}")
        return x
    return (x, x)


class PatchEmbed(nn.Module):
    """(B, C, H, W) images -> (B, H/p * W/p, D) patch tokens, or (B, H/p, W/p, D) with `flatten_embedding=False`."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = make_2tuple(img_size)
        self.patch_size = make_2tuple(patch_size)
        self.patches_resolution = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        patch_h, patch_w = self.patch_size
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"Image size {height}x{width} (HxW) is not a multiple of the patch size {patch_h}x{patch_w}: "
                f"resize or crop the input to a multiple of {patch_h}x{patch_w}"
            )
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, HW, D)
        x = self.norm(x)
        if not self.flatten_embedding:
            x = x.reshape(-1, height // patch_h, width // patch_w, self.embed_dim)
        return x
