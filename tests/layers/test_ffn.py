import torch
import torch.nn.functional as F

from dinov2.layers import Mlp, SwiGLUFFN, SwiGLUFFNFused
from dinov2.layers.swiglu_ffn import swiglu_hidden_features


def test_mlp_keys_and_output():
    torch.manual_seed(0)
    mlp = Mlp(8, 20, 6)
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {
        "fc1.weight": (20, 8), "fc1.bias": (20,), "fc2.weight": (6, 20), "fc2.bias": (6,),
    }  # fmt: skip
    x = torch.randn(3, 8)
    torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))))
    assert Mlp(8, 20, bias=False).fc1.bias is None


def test_swiglu_output():
    torch.manual_seed(0)
    ffn = SwiGLUFFN(8, 12)
    x = torch.randn(4, 8)
    w12 = ffn.w12.weight
    gate = x @ w12[:12].T + ffn.w12.bias[:12]
    value = x @ w12[12:].T + ffn.w12.bias[12:]
    expected = (gate * torch.sigmoid(gate) * value) @ ffn.w3.weight.T + ffn.w3.bias
    torch.testing.assert_close(ffn(x), expected)


def test_swiglu_fused_hidden_rounding_for_giant():
    assert swiglu_hidden_features(6144) == 4096  # ViT-g: 1536 * 4 -> 4096
    assert swiglu_hidden_features(4 * 384) == 1024
    assert swiglu_hidden_features(100) == 72  # int(66.67) = 66 -> rounded up to 72
    with torch.device("meta"):
        ffn = SwiGLUFFNFused(in_features=1536, hidden_features=6144)
    assert {k: tuple(v.shape) for k, v in ffn.state_dict().items()} == {
        "w12.weight": (8192, 1536), "w12.bias": (8192,), "w3.weight": (1536, 4096), "w3.bias": (1536,),
    }  # fmt: skip
