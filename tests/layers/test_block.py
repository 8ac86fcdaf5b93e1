import pytest
import torch
from torch import nn

from dinov2.layers import Block, DropPath, LayerScale, NestedTensorBlock, drop_add_residual_stochastic_depth
from dinov2.layers.block import drop_add_residual_stochastic_depth_list


def make_block(drop_path: float = 0.0) -> NestedTensorBlock:
    torch.manual_seed(0)
    block = NestedTensorBlock(32, num_heads=4, qkv_bias=True, init_values=0.5, drop_path=drop_path)
    with torch.no_grad():
        block.ls1.gamma.uniform_(0.5, 1.5)
        block.ls2.gamma.uniform_(0.5, 1.5)
    return block


def test_block_keys():
    keys = list(make_block().state_dict())
    assert keys == [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias", "ls2.gamma",
    ]  # fmt: skip
    assert not any("ls" in k for k in Block(32, 4, init_values=None).state_dict())
    assert not any("ls" in k for k in Block(32, 4, init_values=0).state_dict())


def test_block_eval_is_prenorm_residual():
    block = make_block(drop_path=0.4).eval()
    x = torch.randn(2, 5, 32)
    y = x + block.ls1(block.attn(block.norm1(x)))
    y = y + block.ls2(block.mlp(block.norm2(y)))
    torch.testing.assert_close(block(x), y)


def test_list_forward_equals_separate_forwards():
    block = make_block(drop_path=0.4).eval()
    xs = [torch.randn(2, 17, 32), torch.randn(6, 5, 32)]
    out = block(xs)
    assert isinstance(out, list) and len(out) == 2
    for x, y in zip(xs, out):
        torch.testing.assert_close(y, block(x), atol=1e-5, rtol=1e-5)


def test_efficient_stochastic_depth_subset_size_and_scale():
    x = torch.randn(8, 3, 4)
    seen = []

    def residual(sub):
        seen.append(sub.shape[0])
        return torch.ones_like(sub)

    out = drop_add_residual_stochastic_depth(x, residual, sample_drop_ratio=0.4)
    assert seen == [4]  # max(int(8 * 0.6), 1)
    changed = (out - x).abs().amax(dim=(1, 2))
    assert int((changed > 0).sum()) == 4
    torch.testing.assert_close(changed[changed > 0], torch.full((4,), 2.0))  # 8 / 4
    seen.clear()
    drop_add_residual_stochastic_depth(torch.randn(3, 2, 4), residual, sample_drop_ratio=0.9)
    assert seen == [1]  # at least one sample


def test_efficient_stochastic_depth_is_unbiased():
    torch.manual_seed(1)
    x = torch.randn(6, 2, 3)
    weight = torch.randn(3, 3)

    def residual(sub):
        return sub @ weight + 1.0

    num_draws = 4000
    draws = torch.stack([drop_add_residual_stochastic_depth(x, residual, 0.5) for _ in range(num_draws)])
    expected = x + residual(x)
    # each sample gets 2 * residual with probability 1/2: per-draw std = |residual|; allow 4 standard errors
    tolerance = 4 * residual(x).abs() / num_draws**0.5
    assert bool(((draws.mean(0) - expected).abs() <= tolerance).all())
    # only 3 of 6 samples per draw get a residual (scaled by 2): each draw differs from the mean
    assert (draws[0] - expected).abs().max() > 0.5


def test_list_stochastic_depth_subsets_per_crop_set():
    xs = [torch.randn(8, 3, 4), torch.randn(5, 2, 4)]
    seen = []

    def residual_list(subsets):
        seen.append([s.shape[0] for s in subsets])
        return [torch.ones_like(s) for s in subsets]

    outs = drop_add_residual_stochastic_depth_list(xs, residual_list, 0.5)
    assert seen == [[4, 2]]
    for x, out, kept, batch in zip(xs, outs, (4, 2), (8, 5)):
        delta = (out - x).abs().amax(dim=(1, 2))
        assert int((delta > 0).sum()) == kept
        torch.testing.assert_close(delta[delta > 0], torch.full((kept,), batch / kept))


def test_training_list_forward_with_stochastic_depth_differs_from_eval():
    block = make_block(drop_path=0.5).train()
    xs = [torch.randn(4, 9, 32), torch.randn(6, 4, 32)]
    torch.manual_seed(3)
    outs = block(xs)
    assert [o.shape for o in outs] == [x.shape for x in xs]
    block.eval()
    reference = block(xs)
    assert not torch.allclose(outs[0], reference[0])


def test_small_drop_rate_uses_drop_path1_for_attention_and_drop_path2_for_ffn():
    block = make_block(drop_path=0.1).train()
    assert isinstance(block.drop_path1, DropPath) and isinstance(block.drop_path2, DropPath)

    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    block.drop_path1 = nn.Identity()
    block.drop_path2 = Zero()  # drops the ffn residual only
    x = torch.randn(3, 4, 32)
    expected = x + block.ls1(block.attn(block.norm1(x)))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("rate", [0.05, 0.1])
def test_small_drop_rate_on_crop_lists_keeps_an_exact_subset_as_upstream(rate):
    """Upstream's multi-crop path uses subset stochastic depth at any rate above 0: exactly max(int(B(1-r)), 1)
    samples of each crop set get each residual, scaled by B/subset; DropPath's per-sample draws would vary."""
    block = make_block(drop_path=rate).train()
    block.ls1.gamma.data.fill_(1.0)
    block.mlp.fc2.weight.data.zero_()
    block.mlp.fc2.bias.data.zero_()  # the FFN residual is 0: the output shows the attention residual alone
    xs = [torch.randn(20, 5, 32), torch.randn(7, 3, 32)]
    full = [x + block.attn(block.norm1(x)) for x in xs]
    for seed in range(5):
        torch.manual_seed(seed)
        outs = block(xs)
        for x, out, ref in zip(xs, outs, full):
            batch = x.shape[0]
            kept = max(int(batch * (1 - rate)), 1)
            changed = (out - x).abs().amax(dim=(1, 2)) > 0
            assert int(changed.sum()) == kept
            torch.testing.assert_close(out[changed], x[changed] + (ref - x)[changed] * batch / kept)


def test_layerscale():
    scale = LayerScale(4, init_values=0.25)
    torch.testing.assert_close(scale.gamma.data, torch.full((4,), 0.25))
    x = torch.randn(2, 4)
    torch.testing.assert_close(scale(x), x * 0.25)
    y = x.clone()
    LayerScale(4, init_values=2.0, inplace=True)(y)
    torch.testing.assert_close(y, x * 2.0)


def _saved_elements(fn) -> int:
    """Elements of the tensors autograd keeps for backward while `fn` runs (outer saved-tensor hooks see only what is
    kept; some torch versions, 2.11 among them, show them the empty placeholder of a non-reentrant checkpoint)."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_activation_checkpointing_keeps_gradients_and_drops_saved_activations():
    """Same outputs and gradients with stochastic depth on (the recompute redraws the same subsets), and only the
    block inputs kept for backward."""
    xs = [torch.randn(8, 17, 32), torch.randn(16, 5, 32)]
    results = {}
    for checkpointing in (False, True):
        block = make_block(drop_path=0.4).train()
        block.activation_checkpointing = checkpointing
        inputs = [x.clone().requires_grad_() for x in xs]
        torch.manual_seed(3)
        outputs = []
        n_saved = _saved_elements(lambda: outputs.extend(block(inputs)))
        sum((o * o).sum() for o in outputs).backward()
        grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone() for x in inputs]
        results[checkpointing] = (outputs, grads, n_saved)
    plain, checkpointed = results[False], results[True]
    for a, b in zip(plain[0] + plain[1], checkpointed[0] + checkpointed[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # without checkpointing at least the activations of the MLP's hidden layer (4x the width) are kept
    assert (checkpointed[2], plain[2] > 4 * sum(x.numel() for x in xs)) == (0, True), (checkpointed[2], plain[2])
