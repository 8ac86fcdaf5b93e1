"""MaskingGenerator: BEiT block masking semantics, bounds and determinism."""

import math
import random

import numpy as np
import pytest

from dinov2.data import MaskingGenerator


def _beit_reference(height, width, target, min_patches=4, max_patches=None, min_aspect=0.3):
    """Cell-by-cell restatement of BEiT's block masking, drawing random numbers in the same order."""
    max_patches = target if max_patches is None else max_patches
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < target:
        cap = min(target - count, max_patches)
        added = 0
        for _ in range(10):
            area = random.uniform(min_patches, cap)
            aspect = math.exp(random.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                new = sum(1 for i in range(top, top + h) for j in range(left, left + w) if not mask[i, j])
                if 0 < new <= cap:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            mask[i, j] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


@pytest.mark.parametrize("size,max_patches", [((14, 14), 98), ((16, 16), 128), ((6, 9), None)])
def test_matches_reference_algorithm(size, max_patches):
    generator = MaskingGenerator(size, max_num_patches=max_patches)
    n = size[0] * size[1]
    for seed, target in enumerate([0, 1, 5, n // 4, n // 2]):
        random.seed(seed)
        ours = generator(target)
        random.seed(seed)
        # max_num_patches=None without num_masking_patches: no per-block cap (upstream fails on min(cap, None))
        reference = _beit_reference(*size, target, max_patches=max_patches or n)
        assert np.array_equal(ours, reference), (seed, target)


def test_shape_dtype_and_count_bounds():
    generator = MaskingGenerator((14, 14), max_num_patches=98)
    assert generator.get_shape() == (14, 14)
    random.seed(0)
    exact = 0
    trials = 0
    for target in range(0, 99, 7):
        for _ in range(20):
            mask = generator(target)
            assert mask.shape == (14, 14) and mask.dtype == bool
            assert mask.sum() <= target
            exact += int(mask.sum() == target)
            trials += 1
    assert generator(0).sum() == 0
    assert exact >= 0.8 * trials  # the generator stops early only when 10 draws in a row fail


def test_blocks_respect_max_num_patches():
    # with a cap of 4 patches per block, every connected masked region is built from blocks of <= 4 patches; the
    # total still reaches the target
    generator = MaskingGenerator((10, 10), num_masking_patches=30, min_num_patches=1, max_num_patches=4)
    random.seed(1)
    sizes = []
    original = generator._add_block
    generator._add_block = lambda mask, cap: sizes.append(original(mask, cap)) or sizes[-1]
    mask = generator(30)
    assert max(sizes) <= 4 and sum(sizes) == mask.sum() <= 30


def test_rectangular_grid_and_repr():
    generator = MaskingGenerator((4, 6), num_masking_patches=10, max_num_patches=8)
    random.seed(3)
    assert generator(10).shape == (4, 6)
    text = repr(generator)
    assert text.startswith("Generator(4, 6 -> [4 ~ 8], max = 10,")
    assert generator.num_patches == 24
    assert generator.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))


def test_deterministic_given_python_seed():
    generator = MaskingGenerator((14, 14), max_num_patches=98)
    random.seed(42)
    first = [generator(60) for _ in range(5)]
    random.seed(42)
    second = [generator(60) for _ in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
