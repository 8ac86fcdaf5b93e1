"""dinov2.hub.utils: official model names and CenterPadding."""

import pytest
import torch

from dinov2.hub.utils import CenterPadding, _make_dinov2_model_name


@pytest.mark.parametrize(
    "arch, patch, registers, expected",
    [
        ("vit_small", 14, 0, "dinov2_vits14"), ("vit_base", 14, 0, "dinov2_vitb14"),
        ("vit_large", 14, 4, "dinov2_vitl14_reg4"), ("vit_giant2", 14, 4, "dinov2_vitg14_reg4"),
        ("vit_large", 16, 0, "dinov2_vitl16"),
    ],
)  # fmt: skip
def test_model_names(arch, patch, registers, expected):
    assert _make_dinov2_model_name(arch, patch, registers) == expected


def test_center_padding_places_input_in_the_middle():
    x = torch.arange(2 * 15 * 20, dtype=torch.float32).reshape(1, 2, 15, 20) + 1
    padded = CenterPadding(14)(x)
    assert padded.shape == (1, 2, 28, 28)
    # height 15 -> 28: 6 rows above, 7 below; width 20 -> 28: 4 columns each side
    torch.testing.assert_close(padded[:, :, 6:21, 4:24], x, rtol=0, atol=0)
    assert padded.abs().sum() == x.sum()
    assert CenterPadding(14)(torch.ones(1, 3, 28, 14)).shape == (1, 3, 28, 14)
