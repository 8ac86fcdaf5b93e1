import pytest
import torch

from dinov2.layers import PatchEmbed


def test_patch_embed_matches_unfolded_projection():
    torch.manual_seed(0)
    embed = PatchEmbed(img_size=28, patch_size=14, in_chans=3, embed_dim=16)
    assert embed.num_patches == 4
    x = torch.randn(2, 3, 28, 42)
    patches = x.unfold(2, 14, 14).unfold(3, 14, 14)  # (B, C, 2, 3, 14, 14)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 6, 3 * 14 * 14)
    expected = patches @ embed.proj.weight.reshape(16, -1).T + embed.proj.bias
    torch.testing.assert_close(embed(x), expected, atol=1e-4, rtol=1e-4)
    grid = PatchEmbed(img_size=28, patch_size=14, embed_dim=16, flatten_embedding=False)(x)
    assert grid.shape == (2, 2, 3, 16)


def test_patch_embed_error_names_sizes():
    embed = PatchEmbed(img_size=28, patch_size=14, embed_dim=8)
    with pytest.raises(ValueError, match=r"Image size 30x28 \(HxW\) is not a multiple of the patch size 14x14"):
        embed(torch.zeros(1, 3, 30, 28))
