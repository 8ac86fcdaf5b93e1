"""Batch collation for SSL training: stacks multi-crop views and draws the iBOT patch masks."""

import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .masking import MaskingGenerator

# The iBOT mask entries of a training batch (`collate_masks`).
MASK_KEYS = ("collated_masks", "mask_indices_list", "masks_weight", "upperbound", "n_masked_patches")


def mask_args_from_cfg(cfg: Any) -> Dict[str, Any]:
    """The iBOT mask arguments of the collate functions from a training config: ratios and probability from `ibot`,
    the patch grid of the global crops, and a `MaskingGenerator` masking at most half of it."""
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    return dict(
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid),
    )


def collate_data_and_cast(
    samples_list: List[Tuple[Dict[str, Any], Any]],
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: Optional[int] = None,
    mask_generator: Optional[Callable[[int], Any]] = None,
) -> Dict[str, Any]:
    """Collate `(DataAugmentationDINO output, target)` pairs into one training batch.

    Crops are stacked crop-major: `[crop 0 of every sample, crop 1 of every sample, ...]`. Of the B global crops,
    `int(B * mask_probability)` get a mask; masked crop i draws its ratio uniformly in the i-th interval of
    `linspace(min, max, n_masked + 1)`, the others get an empty mask, and the mask list is shuffled.
    Randomness comes from Python's `random` module (as upstream): seed it for a reproducible batch.

    Returns `collated_global_crops` (B, 3, H, W) and `collated_local_crops` cast to `dtype`, `collated_masks`
    (B, n_tokens) bool, `mask_indices_list` (flat indices of masked tokens), `masks_weight` (1 / masked tokens of
    the owning crop, one per masked token), `upperbound` (sum of int(n_tokens * ratio_max) over masked crops: a
    static bound on the number of masked tokens) and `n_masked_patches` (long tensor of shape [1]).
    """
    n_global_crops = len(samples_list[0][0]["global_crops"])
    n_local_crops = len(samples_list[0][0]["local_crops"])
    collated_global_crops = torch.stack(
        [sample[0]["global_crops"][i] for i in range(n_global_crops) for sample in samples_list]
    )
    local_crops = [sample[0]["local_crops"][i] for i in range(n_local_crops) for sample in samples_list]
    # crops.local_crops_number 0: an empty batch of local crops (torch.stack refuses an empty list)
    collated_local_crops = torch.stack(local_crops) if local_crops else collated_global_crops.new_empty(0, 3, 0, 0)
    masks = collate_masks(len(collated_global_crops), mask_ratio_tuple, mask_probability, n_tokens, mask_generator)
    return {
        "collated_global_crops": collated_global_crops.to(dtype),
        "collated_local_crops": collated_local_crops.to(dtype),
        **masks,
    }


def collate_masks(
    n_crops: int,
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    n_tokens: Optional[int],
    mask_generator: Optional[Callable[[int], Any]],
) -> Dict[str, Any]:
    """The iBOT mask entries of a batch with `n_crops` global crops (see `collate_data_and_cast`)."""
    if mask_generator is None or n_tokens is None:
        raise ValueError("collate_data_and_cast needs n_tokens and mask_generator")
    n_masked_crops = int(n_crops * mask_probability)
    ratios = torch.linspace(*mask_ratio_tuple, n_masked_crops + 1)
    upperbound = 0
    masks_list = []
    for i in range(n_masked_crops):
        ratio_min, ratio_max = ratios[i], ratios[i + 1]
        n_masked = int(n_tokens * random.uniform(ratio_min, ratio_max))
        masks_list.append(torch.as_tensor(mask_generator(n_masked), dtype=torch.bool))
        upperbound += int(n_tokens * ratio_max)
    for _ in range(n_masked_crops, n_crops):
        masks_list.append(torch.as_tensor(mask_generator(0), dtype=torch.bool))
    random.shuffle(masks_list)

    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop_weight = 1.0 / collated_masks.sum(-1).clamp(min=1.0)
    masks_weight = per_crop_weight.unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    n_masked_patches = torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long)
    return dict(zip(MASK_KEYS, (collated_masks, mask_indices_list, masks_weight, upperbound, n_masked_patches)))
