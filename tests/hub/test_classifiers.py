"""dinov2.hub.classifiers: linear-head shapes, file names, input composition against a manual computation."""

import pytest
import torch
from torch import nn

from dinov2.hub import classifiers
from dinov2.models.vision_transformer import DinoVisionTransformer

BASE = "https://dl.fbaipublicfiles.com/dinov2"


def manual_linear_input(backbone: DinoVisionTransformer, x: torch.Tensor, layers: int) -> torch.Tensor:
    """[normalised cls token of each of the last `layers` blocks, mean normalised patch token of the last block],
    computed block by block (registers excluded from the mean)."""
    tokens = backbone.prepare_tokens_with_masks(x)
    outputs = []
    for block in backbone.blocks:
        tokens = block(tokens)
        outputs.append(backbone.norm(tokens))
    last = outputs[-layers:]
    patch_mean = last[-1][:, 1 + backbone.num_register_tokens :].mean(dim=1)
    return torch.cat([out[:, 0] for out in last] + [patch_mean], dim=1)


@pytest.mark.parametrize("layers", [1, 4])
def test_wrapper_input_composition(layers):
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(
        img_size=28, patch_size=14, embed_dim=16, depth=5, num_heads=2, init_values=1.0,
        num_register_tokens=2, block_chunks=0,
    ).eval()  # fmt: skip
    head = nn.Linear((1 + layers) * 16, 1000)
    model = classifiers._LinearClassifierWrapper(backbone=backbone, linear_head=head, layers=layers)
    x = torch.randn(3, 3, 42, 28)
    with torch.no_grad():
        expected_input = manual_linear_input(backbone, x, layers)
        assert expected_input.shape == (3, (1 + layers) * 16)
        torch.testing.assert_close(model(x), head(expected_input), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers, suffix", [(4, "4"), (1, "")])
def test_vits14_lc_from_weights_dir(monkeypatch, weights_dir, reference_vits14, offline_hub, layers, suffix):
    monkeypatch.setenv("DINOV2_WEIGHTS_DIR", str(weights_dir))
    model = classifiers.dinov2_vits14_lc(layers=layers).eval()
    head_state = torch.load(weights_dir / f"dinov2_vits14_linear{suffix}_head.pth", weights_only=True)
    assert (model.linear_head.in_features, model.linear_head.out_features) == ((1 + layers) * 384, 1000)
    torch.testing.assert_close(model.linear_head.weight, head_state["weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.linear_head.bias, head_state["bias"], rtol=0, atol=0)
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        logits = model(x)
        expected = nn.functional.linear(manual_linear_input(reference_vits14, x, layers), **head_state)
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert offline_hub == []


@pytest.mark.parametrize(
    "arch, embed_dim, registers, layers, file_name",
    [
        ("vit_small", 384, 0, 4, "dinov2_vits14/dinov2_vits14_linear4_head.pth"),
        ("vit_base", 768, 0, 1, "dinov2_vitb14/dinov2_vitb14_linear_head.pth"),
        ("vit_large", 1024, 4, 4, "dinov2_vitl14/dinov2_vitl14_reg4_linear4_head.pth"),
        ("vit_giant2", 1536, 4, 1, "dinov2_vitg14/dinov2_vitg14_reg4_linear_head.pth"),
    ],
)
def test_head_file_names_and_urls(monkeypatch, arch, embed_dim, registers, layers, file_name):
    requested = []

    def record(name, url):
        requested.append((name, url))
        raise LookupError("stop before loading")

    monkeypatch.setattr(classifiers, "get_weights_file", record)
    with pytest.raises(LookupError):
        classifiers._make_dinov2_linear_classification_head(
            arch_name=arch, patch_size=14, embed_dim=embed_dim, layers=layers, num_register_tokens=registers
        )
    assert requested == [(file_name.split("/")[1], f"{BASE}/{file_name}")]
    head = classifiers._make_dinov2_linear_classification_head(
        arch_name=arch, embed_dim=embed_dim, layers=layers, pretrained=False
    )
    assert (head.in_features, head.out_features) == ((1 + layers) * embed_dim, 1000)


@pytest.mark.parametrize("name", ["dinov2_vitg14_lc", "dinov2_vitg14_reg_lc", "dinov2_vits14_reg_lc"])
def test_lc_factories_build_the_matching_backbone(name):
    with torch.device("meta"):
        model = getattr(classifiers, name)(layers=1, pretrained=False)
    backbone = model.backbone
    assert model.linear_head.in_features == 2 * backbone.embed_dim
    assert backbone.num_register_tokens == (4 if "_reg" in name else 0)
    assert ("mlp.w12.weight" in dict(backbone.blocks[0].named_parameters())) == ("vitg" in name)


def test_unsupported_layers():
    with pytest.raises(ValueError, match="layers must be 1 or 4"):
        classifiers.dinov2_vits14_lc(layers=2, pretrained=False)
