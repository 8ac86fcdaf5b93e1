import math

import pytest
import torch

from dinov2.layers import Attention, MemEffAttention
from dinov2.layers import attention as attention_module


def explicit_attention(attn: Attention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, then the output projection."""
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1) / math.sqrt(dim // heads)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return attn.proj(out)


@pytest.fixture
def attn() -> Attention:
    torch.manual_seed(0)
    return Attention(32, num_heads=4, qkv_bias=True).eval()


def test_sdpa_matches_explicit_softmax_attention(attn):
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(attn(x), explicit_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_boolean_attn_bias_matches_masked_softmax(attn):
    x = torch.randn(2, 5, 32)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True  # every query attends to at least one key
    torch.testing.assert_close(attn(x, attn_bias=mask), explicit_attention(attn, x, mask), atol=1e-5, rtol=1e-5)


def test_forward_list_equals_separate_forwards(attn):
    xs = [torch.randn(2, 9, 32), torch.randn(5, 4, 32), torch.randn(1, 6, 32)]
    flat = torch.cat([x.flatten(0, 1) for x in xs])
    out = attn.forward_list(flat, [tuple(x.shape[:2]) for x in xs])
    expected = torch.cat([attn(x).flatten(0, 1) for x in xs])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_xformers_path_uses_batch_tokens_heads_layout(attn, monkeypatch):
    calls = []

    def fake_memory_efficient_attention(q, k, v, p=0.0):
        calls.append(q.shape)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, H, d) -> (B, H, N, d)
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        return (weights @ v).transpose(1, 2)

    x = torch.randn(2, 6, 32)
    expected = attn(x)
    monkeypatch.setattr(attention_module, "memory_efficient_attention", fake_memory_efficient_attention)
    monkeypatch.setattr(attention_module, "use_xformers", lambda tensor: True)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    assert calls == [torch.Size([2, 6, 4, 8])]


def test_xformers_gating_on_cpu_and_env(monkeypatch):
    monkeypatch.setattr(attention_module, "XFORMERS_AVAILABLE", True)
    monkeypatch.delenv("XFORMERS_DISABLED", raising=False)
    assert not attention_module.use_xformers(torch.zeros(1))  # CPU tensors always use SDPA
    cuda_like = torch.zeros(1, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert attention_module.use_xformers(cuda_like)
    monkeypatch.setenv("XFORMERS_DISABLED", "1")
    assert not attention_module.use_xformers(cuda_like)


def test_memeff_attention_has_attention_keys_and_output(attn):
    memeff = MemEffAttention(32, num_heads=4, qkv_bias=True).eval()
    memeff.load_state_dict(attn.state_dict())
    assert list(memeff.state_dict()) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(memeff(x), attn(x))


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible by num_heads 5"):
        Attention(32, num_heads=5)
