"""BEiT-style block-wise masking of the patch grid, used for the iBOT masked-image loss."""

import math
import random
from typing import Optional, Tuple, Union

import numpy as np


class MaskingGenerator:
    """Places random rectangles on a `height x width` patch grid until a requested number of patches is masked.

    Each rectangle has an area drawn uniformly in [min_num_patches, cap] (cap = patches still to mask, at most
    `max_num_patches`) and a log-uniform aspect ratio in [min_aspect, max_aspect]. A rectangle is kept only if it
    adds between 1 and `cap` new patches; after 10 failed draws in a row the generator stops, so the mask count is
    at most the request and usually equal to it. Randomness comes from Python's `random` module (seed it for
    reproducible masks; DataLoader workers seed it per worker).
    """

    def __init__(
        self,
        input_size: Union[int, Tuple[int, int]],
        num_masking_patches: Optional[int] = None,
        min_num_patches: int = 4,
        max_num_patches: Optional[int] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
    ) -> None:
        if not isinstance(input_size, tuple):
            input_size = (input_size, input_size)
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"Generator({self.height}, {self.width} -> [{self.min_num_patches} ~ {self.max_num_patches}], "
            f"max = {self.num_masking_patches}, {self.log_aspect_ratio[0]:.3f} ~ {self.log_aspect_ratio[1]:.3f})"
        )

    def get_shape(self) -> Tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, cap: int) -> int:
        """Try up to 10 rectangles; mask the first one that adds 1..cap new patches. Returns patches added."""
        for _ in range(10):
            area = random.uniform(self.min_num_patches, cap)
            aspect = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w >= self.width or h >= self.height:
                continue
            top = random.randint(0, self.height - h)
            left = random.randint(0, self.width - w)
            block = mask[top : top + h, left : left + w]
            added = h * w - int(block.sum())
            if 0 < added <= cap:
                block[...] = True
                return added
        return 0

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        """Boolean (height, width) mask with at most `num_masking_patches` True entries."""
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            cap = num_masking_patches - count
            if self.max_num_patches is not None:  # None (no num_masking_patches given either): no per-block cap
                cap = min(cap, self.max_num_patches)
            added = self._add_block(mask, cap)
            if added == 0:
                break
            count += added
        return mask
