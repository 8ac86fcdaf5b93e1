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


def test_patch_embed_is_the_strided_convolution_with_its_gradients():
    """The matrix-product projection against `proj` run as the convolution (upstream's forward), a non-square
    patch and image: outputs and the gradients of weight, bias and input."""
    torch.manual_seed(0)
    embed = PatchEmbed(img_size=(24, 30), patch_size=(4, 6), in_chans=3, embed_dim=10)
    x = torch.randn(2, 3, 24, 30, requires_grad=True)
    out = embed(x)
    reference = embed.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (embed.proj.weight, embed.proj.bias, x))
    expected = torch.autograd.grad((reference * weights).sum(), (embed.proj.weight, embed.proj.bias, x))
    for grad, ref in zip(grads, expected):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5)
