import copy

import torch
import torch.nn.functional as F

from dinov2.layers import DINOHead


def make_head() -> DINOHead:
    torch.manual_seed(0)
    return DINOHead(in_dim=16, out_dim=40, hidden_dim=24, bottleneck_dim=8)


def test_state_dict_keys_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in make_head().state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (24, 16), "mlp.0.bias": (24,),
        "mlp.2.weight": (24, 24), "mlp.2.bias": (24,),
        "mlp.4.weight": (8, 24), "mlp.4.bias": (8,),
        "last_layer.weight_g": (40, 1), "last_layer.weight_v": (40, 8),
    }  # fmt: skip
    assert list(shapes)[-2:] == ["last_layer.weight_g", "last_layer.weight_v"]


def test_weight_g_is_one_and_prototypes_unit_norm():
    head = make_head()
    torch.testing.assert_close(head.last_layer.weight_g.data, torch.ones(40, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))
    for name in ("mlp.0", "mlp.2", "mlp.4"):
        assert torch.count_nonzero(head.get_submodule(name).bias) == 0


def test_output_matches_explicit_computation():
    head = make_head()
    x = torch.randn(5, 16)
    hidden = F.gelu(head.mlp[0](x))
    hidden = F.gelu(head.mlp[2](hidden))
    z = F.normalize(head.mlp[4](hidden), dim=-1)
    v = head.last_layer.weight_v
    expected = z @ (head.last_layer.weight_g * v / v.norm(dim=1, keepdim=True)).T
    out = head(x)
    torch.testing.assert_close(out, expected)
    # unit bottleneck and unit prototypes: cosine similarities
    assert out.abs().max() <= 1.0 + 1e-5


def test_weight_g_scales_output_and_gets_gradients():
    head = make_head()
    x = torch.randn(3, 16)
    base = head(x)
    with torch.no_grad():
        head.last_layer.weight_g.fill_(2.0)
    torch.testing.assert_close(head(x), 2 * base)
    head(x).sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_v.grad is not None


def test_deepcopy_and_state_dict_round_trip():
    head = make_head()
    clone = copy.deepcopy(head)
    other = DINOHead(in_dim=16, out_dim=40, hidden_dim=24, bottleneck_dim=8)
    other.load_state_dict(head.state_dict(), strict=True)
    x = torch.randn(2, 16)
    torch.testing.assert_close(clone(x), head(x))
    torch.testing.assert_close(other(x), head(x))


def test_single_layer_and_batchnorm_variants():
    assert list(DINOHead(16, 4, nlayers=1, bottleneck_dim=8).state_dict())[:2] == ["mlp.weight", "mlp.bias"]
    bn_head = DINOHead(16, 4, use_bn=True, hidden_dim=12, bottleneck_dim=8)
    assert [type(m).__name__ for m in bn_head.mlp] == [
        "Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear",
    ]  # fmt: skip
