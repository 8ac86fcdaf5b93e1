"""collate_data_and_cast: crop-major stacking, mask ratios per masked crop, weights and bounds."""

import random

import numpy as np
import pytest
import torch

from dinov2.data import MaskingGenerator, collate_data_and_cast

N_TOKENS = 196  # 14 x 14 patch grid


def _samples(batch, n_global=2, n_local=3):
    """Sample b's crop c is filled with the value 10 * b + c (globals) or 100 + 10 * b + c (locals)."""
    return [
        (
            {
                "global_crops": [torch.full((3, 8, 8), 10.0 * b + c) for c in range(n_global)],
                "global_crops_teacher": None,
                "local_crops": [torch.full((3, 4, 4), 100.0 + 10 * b + c) for c in range(n_local)],
                "offsets": (),
            },
            (),
        )
        for b in range(batch)
    ]


def _first_k_patches(k):
    """Deterministic stand-in generator: masks exactly the first k patches of the 14 x 14 grid."""
    mask = np.zeros(N_TOKENS, dtype=bool)
    mask[:k] = True
    return mask.reshape(14, 14)


def test_crop_major_stacking_and_dtype():
    random.seed(0)
    out = collate_data_and_cast(_samples(3), (0.1, 0.5), 0.5, torch.half, N_TOKENS, _first_k_patches)
    glob, loc = out["collated_global_crops"], out["collated_local_crops"]
    assert glob.shape == (6, 3, 8, 8) and loc.shape == (9, 3, 4, 4)
    assert glob.dtype == torch.half and loc.dtype == torch.half
    assert glob[:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]
    assert loc[:, 0, 0, 0].tolist() == [100, 110, 120, 101, 111, 121, 102, 112, 122]
    assert out["collated_masks"].shape == (6, N_TOKENS) and out["collated_masks"].dtype == torch.bool


def test_no_local_crops_collate_to_an_empty_batch():
    """crops.local_crops_number 0 (the training step supports it) on the CPU paths."""
    random.seed(0)
    out = collate_data_and_cast(_samples(3, n_local=0), (0.1, 0.5), 0.5, torch.half, N_TOKENS, _first_k_patches)
    assert out["collated_global_crops"].shape == (6, 3, 8, 8)
    loc = out["collated_local_crops"]
    assert (loc.shape, loc.dtype) == ((0, 3, 0, 0), torch.half)


def test_mask_counts_within_linspace_intervals():
    # 4 samples -> B = 8 global crops, probability 0.5 -> 4 masked crops with ratios from
    # linspace(0.1, 0.5, 5) = [0.1, 0.2, 0.3, 0.4, 0.5]
    bounds = [(19, 39), (39, 58), (58, 78), (78, 98)]  # [int(196 * r_i), int(196 * r_(i+1))]
    for seed in range(20):
        random.seed(seed)
        out = collate_data_and_cast(_samples(4), (0.1, 0.5), 0.5, torch.float32, N_TOKENS, _first_k_patches)
        counts = out["collated_masks"].sum(-1)
        masked = sorted(c for c in counts.tolist() if c > 0)
        assert len(masked) == 4 and (counts == 0).sum() == 4
        for count, (low, high) in zip(masked, bounds):
            assert low <= count <= high
        assert out["upperbound"] == 39 + 58 + 78 + 98


def test_weights_indices_and_totals():
    random.seed(1)
    generator = MaskingGenerator((14, 14), max_num_patches=98)
    out = collate_data_and_cast(_samples(8), (0.1, 0.5), 0.5, torch.float32, N_TOKENS, generator)
    masks = out["collated_masks"]
    counts = masks.sum(-1)
    n_masked_crops = int((counts > 0).sum())
    assert n_masked_crops == 8  # int(16 * 0.5)
    expected_indices = [row * N_TOKENS + col for row in range(16) for col in range(N_TOKENS) if masks[row, col]]
    assert out["mask_indices_list"].tolist() == expected_indices
    assert out["n_masked_patches"].tolist() == [len(expected_indices)] and out["n_masked_patches"].dtype == torch.long
    # each masked token weighs 1 / (masked tokens of its crop): weights sum to the number of masked crops
    assert out["masks_weight"].shape == (len(expected_indices),)
    assert out["masks_weight"].sum().item() == pytest.approx(n_masked_crops, rel=1e-5)
    owners = out["mask_indices_list"] // N_TOKENS
    assert torch.allclose(out["masks_weight"], 1.0 / counts[owners].float())
    assert counts.sum().item() <= out["upperbound"]
    ratios = np.linspace(0.1, 0.5, 9)
    assert out["upperbound"] == sum(int(N_TOKENS * np.float32(r)) for r in ratios[1:])


def test_no_masks_when_probability_zero():
    random.seed(2)
    out = collate_data_and_cast(_samples(2), (0.1, 0.5), 0.0, torch.float32, N_TOKENS, _first_k_patches)
    assert out["collated_masks"].sum() == 0 and out["upperbound"] == 0
    assert out["mask_indices_list"].numel() == 0 and out["masks_weight"].numel() == 0
    assert out["n_masked_patches"].tolist() == [0]


def test_deterministic_given_python_seed():
    generator = MaskingGenerator((14, 14), max_num_patches=98)
    random.seed(7)
    first = collate_data_and_cast(_samples(4), (0.1, 0.5), 0.5, torch.float32, N_TOKENS, generator)
    random.seed(7)
    second = collate_data_and_cast(_samples(4), (0.1, 0.5), 0.5, torch.float32, N_TOKENS, generator)
    assert torch.equal(first["collated_masks"], second["collated_masks"])


def test_missing_generator_is_an_error():
    with pytest.raises(ValueError, match="mask_generator"):
        collate_data_and_cast(_samples(1), (0.1, 0.5), 0.5, torch.float32)
