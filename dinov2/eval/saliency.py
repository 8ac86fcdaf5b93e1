"""Per-image maps that explain a saved probe's decision, on the backbone's patch grid.

For a batch of eval-transformed images, `Explainer` runs the backbone once with gradients and gives:
- `probabilities`: the probe's class probabilities, computed as `dinov2.eval.predictor.Predictor` does (the same
  blocks, final norm and head), so the maps belong to the decision the line sees;
- `evidence` (N, h, w): gradient x input of the positive log-odds (`positive_log_odds`) on the patch embeddings (each
  patch's content, before the position embedding is added), summed over channels: the first-order change of the
  log-odds if the patch's content were removed, so positive patches push the photo towards "positive" (not class 0),
  negative ones towards class 0. (Taken on the tokens between blocks instead, it would miss what passes through
  attention: the blocks' LayerNorms do not see a token's scale.)
- `attention` (N, h, w): the class token's attention to each patch in the last block, mean over heads: where the
  backbone looks, whatever the classifier;
- `pca` (N, h, w, 3): the first three principal components of the last block's patch tokens, fitted on the batch
  (one device's photos) and scaled to [0, 1]: the parts the backbone tells apart, shown as colours;
- `patch_tokens` (N, h * w, D): those tokens, for `PatchBank.anomaly`: the cosine distance of each patch to the
  nearest patch of reference photos (good devices), high where the photo is unlike all of them, whatever the
  classifier learnt.
"""

import dataclasses
import math
from typing import Iterable
from contextlib import nullcontext
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinov2.eval.knn import KnnHead

PROBABILITY_FLOOR = 1e-300  # float64: keeps the log-odds finite where a probability underflows to 0
PCA_COMPONENTS = 3
RANK_TOLERANCE = 1e-6  # singular values below this fraction of the largest are the data's null space


@dataclasses.dataclass
class Explanation:
    """Scores and maps of a batch of N images on an h x w patch grid (see the module docstring)."""

    probabilities: np.ndarray  # (N, C) float64
    log_odds: np.ndarray  # (N,) float64, what `evidence` explains
    cls: torch.Tensor  # (N, n, D) float32 class tokens of the last n blocks the head reads
    evidence: np.ndarray  # (N, h, w) float32
    attention: np.ndarray  # (N, h, w) float32
    pca: np.ndarray  # (N, h, w, 3) float32 in [0, 1]
    patch_tokens: torch.Tensor  # (N, h * w, D) float32, the last block's, normalised by the final norm


def positive_log_odds(head: nn.Module, cls: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """(N,) float64 log(P(not class 0) / P(class 0)) from a probe head's `probabilities` (N, C) of class tokens `cls`;
    for the k-NN head its smooth form over every training image (`KnnHead.soft_log_odds`), as its top-k vote is flat
    where all k neighbours share a class."""
    if isinstance(head, KnnHead):
        return head.soft_log_odds(cls)
    positive = probabilities[:, 1:].sum(dim=1).clamp_min(PROBABILITY_FLOOR)
    return torch.log(positive) - torch.log(probabilities[:, 0].clamp_min(PROBABILITY_FLOOR))


def class_token_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, N) attention of the class token (token 0) to every token in `block`'s attention for its input tokens
    `x` (B, N, D), mean over heads: the softmax that `F.scaled_dot_product_attention` applies in the block."""
    attn = block.attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, heads, 1, hd), (B, heads, N, hd)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
    return torch.softmax(logits, dim=-1)[:, :, 0].mean(dim=1)


def pca_rgb(patch_tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens (N, P, D) -> (N, P, 3) projections on the first three principal components of all N * P tokens,
    each scaled to [0, 1] over them. Each component's sign makes its projections' third moment non-negative (the
    rarer side bright), so the colours do not flip between runs; components beyond the data's rank (singular value
    at most RANK_TOLERANCE of the largest) are 0."""
    n, p, d = patch_tokens.shape
    flat = patch_tokens.reshape(n * p, d).double()
    flat = flat - flat.mean(dim=0)
    _, singular, vh = torch.linalg.svd(flat, full_matrices=False)
    kept = int((singular[:PCA_COMPONENTS] > RANK_TOLERANCE * singular[0]).sum()) if singular[0] > 0 else 0
    projections = flat @ vh[:kept].T
    projections = projections * torch.where((projections**3).mean(dim=0) < 0, -1.0, 1.0)
    low, high = projections.min(dim=0).values, projections.max(dim=0).values
    scaled = (projections - low) / torch.where(high > low, high - low, 1.0)
    rgb = torch.zeros(n * p, PCA_COMPONENTS, dtype=torch.float64)
    rgb[:, : scaled.shape[1]] = scaled
    return rgb.reshape(n, p, PCA_COMPONENTS).float()


class Explainer:
    """A backbone (`DinoVisionTransformer`, eval mode) and a probe head (`SavedProbe.head`) -> `Explanation`s of
    batches of eval-transformed images, under `autocast_ctx` (the predictor's precision)."""

    def __init__(self, backbone: nn.Module, head: nn.Module,
                 autocast_ctx: Callable[[], ContextManager] = nullcontext) -> None:
        self.backbone, self.head, self.autocast_ctx = backbone, head, autocast_ctx
        self.blocks = backbone.flat_blocks()
        if not 1 <= head.n_blocks <= len(self.blocks):
            raise ValueError(f"the classifier reads {head.n_blocks} blocks, the backbone has {len(self.blocks)}")
        self.first_read = len(self.blocks) - head.n_blocks  # the first block whose output the classifier reads
        self.n_prefix = 1 + backbone.num_register_tokens  # class token + registers before the patch tokens

    def __call__(self, images: torch.Tensor) -> Explanation:
        batch, _, height, width = images.shape
        grid = (height // self.backbone.patch_size, width // self.backbone.patch_size)
        images = images.to(next(self.backbone.parameters()).dtype)
        contents = []

        def take_content(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            contents.append(output.detach().requires_grad_(True))  # the leaf the evidence is taken on
            return contents[-1]

        with torch.enable_grad(), self.autocast_ctx():
            handle = self.backbone.patch_embed.register_forward_hook(take_content)
            try:
                x = self.backbone.prepare_tokens_with_masks(images)
            finally:
                handle.remove()
            outputs = []
            for i, block in enumerate(self.blocks):
                if i == len(self.blocks) - 1:
                    with torch.no_grad():
                        attention = class_token_attention(block, x)[:, self.n_prefix :]
                x = block(x)
                if i >= self.first_read:
                    outputs.append(self.backbone.norm(x))
            cls = torch.stack([out[:, 0].float() for out in outputs], dim=1)
            patch_tokens = outputs[-1][:, self.n_prefix :].float()
            patch_mean = patch_tokens.mean(dim=1)
            probabilities = self.head(cls, patch_mean)
            log_odds = positive_log_odds(self.head, cls, probabilities)
            (gradient,) = torch.autograd.grad(log_odds.sum(), contents[0])
        evidence = (gradient.float() * contents[0].detach().float()).sum(dim=-1)
        if evidence.shape[1] != math.prod(grid):
            raise RuntimeError(f"{evidence.shape[1]} patch tokens for a {grid} patch grid")
        return Explanation(
            probabilities=probabilities.detach().cpu().double().numpy(),
            log_odds=log_odds.detach().cpu().double().numpy(),
            cls=cls.detach().cpu(),
            evidence=evidence.reshape(batch, *grid).cpu().numpy(),
            attention=attention.float().reshape(batch, *grid).cpu().numpy(),
            pca=pca_rgb(patch_tokens.detach().cpu()).reshape(batch, *grid, PCA_COMPONENTS).numpy(),
            patch_tokens=patch_tokens.detach().cpu(),
        )


def map_peak(grid_map: np.ndarray, patch_size: int) -> dict:
    """The patch of an (h, w) map with the highest value (for the evidence: the one that pushes most towards
    positive): its row, column, value and pixel box [x0, y0, x1, y1] in the eval crop."""
    row, col = np.unravel_index(int(np.argmax(grid_map)), grid_map.shape)
    return {"row": int(row), "col": int(col), "value": float(grid_map[row, col]),
            "box": [int(col * patch_size), int(row * patch_size), int((col + 1) * patch_size),
                    int((row + 1) * patch_size)]}



class PatchBank:
    """L2-normalised patch tokens (M, D) of reference photos (good devices, `sample`): a patch's anomaly is its cosine
    distance to the nearest of them, 1 - max_j cos(x, b_j), in [0, 2]; 0 for a patch the bank holds."""

    chunk = 65536  # bank rows compared at once: bounds the (patches x rows) similarity matrix

    def __init__(self, tokens: torch.Tensor) -> None:
        if tokens.ndim != 2 or not len(tokens):
            raise ValueError(f"a patch bank needs (M >= 1, D) tokens, got shape {tuple(tokens.shape)}")
        self.tokens = F.normalize(tokens.float(), dim=1)

    @classmethod
    def sample(cls, token_batches: Iterable[torch.Tensor], n_images: int, max_patches: int, seed: int) -> "PatchBank":
        """A bank of at most about `max_patches` tokens from batches (n, P, D) of `n_images` photos' patch tokens:
        the same number drawn at random from each photo (ceil(max_patches / n_images), all P if fewer), seeded."""
        per_image = max(1, math.ceil(max_patches / max(n_images, 1)))
        generator = torch.Generator().manual_seed(seed)
        kept = []
        for batch in token_batches:
            for tokens in batch:
                take = torch.randperm(len(tokens), generator=generator)[:per_image]
                kept.append(tokens[take.sort().values].float())
        if not kept:
            raise ValueError("no reference photos for the patch bank")
        return cls(torch.cat(kept))

    def __len__(self) -> int:
        return len(self.tokens)

    def anomaly(self, patch_tokens: torch.Tensor) -> np.ndarray:
        """(N, P, D) patch tokens -> (N, P) float32 cosine distance of each to its nearest bank token."""
        n, p, d = patch_tokens.shape
        query = F.normalize(patch_tokens.reshape(n * p, d).float(), dim=1)
        nearest = torch.full((n * p,), -1.0)
        for start in range(0, len(self.tokens), self.chunk):
            similarity = query @ self.tokens[start : start + self.chunk].T
            nearest = torch.maximum(nearest, similarity.max(dim=1).values)
        return (1.0 - nearest).clamp_min(0.0).reshape(n, p).numpy()
