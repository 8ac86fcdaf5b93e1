"""DINOv2 vision transformer with upstream constructor arguments, factories and state-dict keys.

Token sequence: `[cls, register_1..R, patch_1..P]`; the position embedding covers cls and patches only (registers
get none) and is interpolated to the input resolution. `block_chunks > 0` groups the blocks into `BlockChunk`s
(FSDP wrap units) that keep global block indices in their keys (`blocks.<chunk>.<index>.*`).
"""

import math
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.layers import MemEffAttention, Mlp, NestedTensorBlock, PatchEmbed, SwiGLUFFNFused

FFN_LAYERS = ("mlp", "swiglu", "swiglufused", "identity")


def _identity_ffn(*args, **kwargs) -> nn.Module:
    """`ffn_layer="identity"`: blocks without a feed-forward network."""
    return nn.Identity()


def _make_ffn_layer(ffn_layer: str) -> Callable[..., nn.Module]:
    if ffn_layer == "mlp":
        return Mlp
    if ffn_layer in ("swiglu", "swiglufused"):
        return SwiGLUFFNFused
    if ffn_layer == "identity":
        return _identity_ffn
    raise ValueError(f"Unknown ffn_layer {ffn_layer!r}; expected one of {FFN_LAYERS}")


def init_weights_vit_timm(module: nn.Module) -> None:
    """ViT weight init of timm: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class BlockChunk(nn.ModuleList):
    """A run of consecutive blocks (an FSDP wrap unit); leading `nn.Identity` entries keep global indices."""

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        for block in self:
            x = block(x)
        return x


class DinoVisionTransformer(nn.Module):
    """Vision transformer backbone of DINOv2 (see module docstring)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = NestedTensorBlock,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ) -> None:
        """Arguments as upstream; `init_values` enables LayerScale iff truthy; `drop_path_uniform` gives every
        block `drop_path_rate` instead of a linear ramp from 0; `interpolate_offset` > 0 selects upstream's
        scale-factor interpolation of the position embedding, 0 the size-based one (register models)."""
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        if drop_path_uniform:
            dpr = [drop_path_rate] * depth
        else:
            dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]

        ffn = _make_ffn_layer(ffn_layer)
        blocks_list = [
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                ffn_layer=ffn,
                init_values=init_values,
            )
            for i in range(depth)
        ]
        if block_chunks > 0:
            self.chunked_blocks = True
            chunksize = depth // block_chunks
            if chunksize == 0:
                raise ValueError(f"block_chunks={block_chunks} exceeds depth={depth}")
            self.blocks = nn.ModuleList(
                BlockChunk([nn.Identity()] * start + blocks_list[start : start + chunksize])
                for start in range(0, depth, chunksize)
            )
        else:
            self.chunked_blocks = False
            self.blocks = nn.ModuleList(blocks_list)

        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Upstream init: pos_embed trunc-normal 0.02, cls/register tokens normal 1e-6, linears timm-style."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        self.apply(init_weights_vit_timm)

    def flat_blocks(self) -> list[nn.Module]:
        """The transformer blocks in order, without the Identity padding of chunks."""
        if not self.chunked_blocks:
            return list(self.blocks)
        return [block for chunk in self.blocks for block in chunk if not isinstance(block, nn.Identity)]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of storing them (`train.activation_checkpointing`):
        activation memory drops to one block's input per block, at the cost of a second forward of the blocks."""
        for block in self.flat_blocks():
            block.activation_checkpointing = bool(enabled)

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None) -> None:
        """`torch.compile` every block in place (`nn.Module.compile`, so parameter names and state-dict keys are
        unchanged and FSDP wraps the compiled blocks as before). Shapes are static (`dynamic=False`); blocks share
        their graphs (one for the list of crop sets in training, one for a single tensor), compiled on first use.
        """
        for block in self.flat_blocks():
            block.compile(backend=backend, mode=mode, dynamic=False)

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position embedding for tokens `x` (cls + patches) of an `h` x `w` pixel input, in x's dtype.

        The stored square grid is resized bicubically in float32: with `interpolate_offset` > 0 by
        `scale_factor=((h0 + offset) / M, (w0 + offset) / M)` (upstream's historic choice, which the released
        non-register weights expect), else to `size=(h0, w0)`; `interpolate_antialias` is passed through.
        """
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        num_stored = self.pos_embed.shape[1] - 1
        if npatch == num_stored and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, :1]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        h0 = h // self.patch_size
        w0 = w // self.patch_size
        side = math.isqrt(num_stored)
        if side * side != num_stored:
            raise ValueError(f"pos_embed holds {num_stored} patch positions, not a square grid")
        if self.interpolate_offset:
            size_kwargs = {
                "scale_factor": ((h0 + self.interpolate_offset) / side, (w0 + self.interpolate_offset) / side)
            }
        else:
            size_kwargs = {"size": (h0, w0)}
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **size_kwargs,
        )
        if patch_pos_embed.shape[-2:] != (h0, w0):
            raise RuntimeError(
                f"Interpolated pos_embed grid {tuple(patch_pos_embed.shape[-2:])} != patch grid {(h0, w0)}"
            )
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + R + P, D); patches where `masks` (B, P) is True become mask_token."""
        batch, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(batch, -1, -1), x[:, 1:]), dim=1)
        return x

    def _output_dict(self, x_prenorm: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        x_norm = self.norm(x_prenorm)
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : self.num_register_tokens + 1],
            "x_norm_patchtokens": x_norm[:, self.num_register_tokens + 1 :],
            "x_prenorm": x_prenorm,
            "masks": masks,
        }

    def forward_features_list(
        self, x_list: Sequence[torch.Tensor], masks_list: Sequence[torch.Tensor | None]
    ) -> list[dict[str, torch.Tensor | None]]:
        """One output dict per crop set; the blocks process all crop sets together."""
        if not isinstance(masks_list, (list, tuple)) or len(x_list) != len(masks_list):
            raise ValueError(
                f"A list of {len(x_list)} crop sets needs a list of {len(x_list)} masks (tensor or None each), "
                f"got {type(masks_list).__name__}"
            )
        x = [self.prepare_tokens_with_masks(images, masks) for images, masks in zip(x_list, masks_list)]
        for block in self.blocks:
            x = block(x)
        return [self._output_dict(tokens, masks) for tokens, masks in zip(x, masks_list)]

    def forward_features(
        self, x: torch.Tensor | Sequence[torch.Tensor], masks: torch.Tensor | Sequence | None = None
    ) -> dict[str, torch.Tensor | None] | list[dict[str, torch.Tensor | None]]:
        """Normalised cls/register/patch tokens, the pre-norm tokens and the masks; a list input gives a list."""
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, [None] * len(x) if masks is None else masks)
        x = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            x = block(x)
        return self._output_dict(x, masks)

    def _get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int]) -> list[torch.Tensor]:
        x = self.prepare_tokens_with_masks(x)
        blocks = self.flat_blocks()
        total = len(blocks)
        take = set(range(total - n, total) if isinstance(n, int) else n)
        if not take or min(take) < 0 or max(take) >= total:
            raise ValueError(f"get_intermediate_layers: n={n!r} selects no valid block among {total}")
        output = []
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take:
                output.append(x)
        return output

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[torch.Tensor, ...] | tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Patch tokens after the last `n` blocks (or the blocks with indices `n`), in block order.

        `norm` applies the final LayerNorm; `reshape` gives (B, D, H/p, W/p); `return_class_token` pairs each
        output with its cls token (B, D).
        """
        outputs = self._get_intermediate_layers(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, h, w = x.shape
            outputs = [
                out.reshape(batch, h // self.patch_size, w // self.patch_size, -1).permute(0, 3, 1, 2).contiguous()
                for out in outputs
            ]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def forward(self, *args: Any, is_training: bool = False, **kwargs: Any) -> Any:
        """Training: the `forward_features` dict(s). Otherwise: `head` of the normalised cls token (B, D)."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        if isinstance(ret, list):
            return [self.head(r["x_norm_clstoken"]) for r in ret]
        return self.head(ret["x_norm_clstoken"])


def _vit(
    embed_dim: int, depth: int, num_heads: int, patch_size: int, num_register_tokens: int, **kwargs
) -> DinoVisionTransformer:
    return DinoVisionTransformer(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
        num_register_tokens=num_register_tokens,
        **kwargs,
    )


def vit_tiny(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-Ti: 192 dim, 12 blocks, 3 heads (not released by DINOv2; for CPU demos and tests)."""
    return _vit(192, 12, 3, patch_size, num_register_tokens, **kwargs)


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-S: 384 dim, 12 blocks, 6 heads (21M parameters)."""
    return _vit(384, 12, 6, patch_size, num_register_tokens, **kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-B: 768 dim, 12 blocks, 12 heads (86M parameters)."""
    return _vit(768, 12, 12, patch_size, num_register_tokens, **kwargs)


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-L: 1024 dim, 24 blocks, 16 heads (300M parameters)."""
    return _vit(1024, 24, 16, patch_size, num_register_tokens, **kwargs)


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-g: 1536 dim, 40 blocks, 24 heads (1.1B parameters; released with `ffn_layer="swiglufused"`)."""
    return _vit(1536, 40, 24, patch_size, num_register_tokens, **kwargs)
