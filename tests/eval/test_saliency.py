"""dinov2.eval.saliency: evidence, attention and PCA maps against reference computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2.eval.knn import KnnHead
from dinov2.eval.linear import LinearClassifier, LinearProbeHead
from dinov2.eval.log_regression import LogRegressionHead
from dinov2.eval.saliency import (
    Explainer, PatchBank, class_token_attention, map_peak, pca_rgb, positive_log_odds,
)
from dinov2.eval.utils import make_autocast_ctx
from dinov2.models.vision_transformer import DinoVisionTransformer

DIM, REGISTERS = 16, 2
N_PREFIX = 1 + REGISTERS


def tiny_backbone() -> DinoVisionTransformer:
    """A float64 ViT with 3 blocks, 2 registers and LayerScale on 32 x 24 px images (4 x 3 patches of 8 px)."""
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=DIM, depth=3, num_heads=2,
                                  num_register_tokens=REGISTERS, init_values=1.0)
    with torch.no_grad():  # weights large enough for the class token to depend on the patches visibly
        for parameter in (model.cls_token, model.pos_embed, model.register_tokens):
            parameter.normal_(std=0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=0.3)
    return model.double().eval()


def linear_head(num_classes: int) -> LinearProbeHead:
    torch.manual_seed(1)
    classifier = LinearClassifier(DIM * 3, use_n_blocks=2, use_avgpool=True, num_classes=num_classes)
    classifier.linear.weight.data.normal_(std=0.5)
    classifier.linear.bias.data.normal_(std=0.5)
    return LinearProbeHead(classifier)


def log_regression_head() -> LogRegressionHead:
    rng = np.random.default_rng(2)
    params = {"coef": rng.normal(size=(1, DIM)).tolist(), "intercept": [0.3], "classes": [0, 1]}
    return LogRegressionHead(params, num_classes=2)


def knn_head() -> KnnHead:
    torch.manual_seed(3)
    return KnnHead(F.normalize(torch.randn(10, DIM), dim=1), torch.tensor([0, 1] * 5), k=3, temperature=0.2,
                   num_classes=2)


def reference_log_odds(head, cls: torch.Tensor, patch_mean: torch.Tensor) -> np.ndarray:
    """log P(not class 0) - log P(class 0) of each head's maths, written out in numpy float64."""
    cls, patch_mean = cls.detach().double().numpy(), patch_mean.detach().double().numpy()
    if isinstance(head, LinearProbeHead):
        weight = head.classifier.linear.weight.detach().double().numpy()
        bias = head.classifier.linear.bias.detach().double().numpy()
        x = np.concatenate([cls[:, -2:].reshape(len(cls), -1), patch_mean], axis=1).astype(np.float32)
        logits = x.astype(np.float64) @ weight.T + bias
        return np.log(np.exp(logits[:, 1:]).sum(axis=1)) - logits[:, 0]
    query = cls[:, -1] / np.linalg.norm(cls[:, -1], axis=1, keepdims=True)
    if isinstance(head, LogRegressionHead):
        return query @ head.coef.numpy()[0] + head.intercept.numpy()[0]
    logits = query @ head.train_features.numpy().T / head.temperature
    positive = head.one_hot.numpy()[:, 0] == 0
    return np.log(np.exp(logits[:, positive]).sum(axis=1)) - np.log(np.exp(logits[:, ~positive]).sum(axis=1))


def reference_log_odds_of_images(model, head, images: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """The reference log-odds of images whose patch embeddings are multiplied by `scale` (B, P, 1), through the
    backbone's `get_intermediate_layers` (the probes' features: class tokens and mean patch token in float32)."""
    handle = model.patch_embed.register_forward_hook(lambda module, inputs, output: output * scale)
    try:
        outputs = model.get_intermediate_layers(images, n=head.n_blocks, return_class_token=True, norm=True)
    finally:
        handle.remove()
    cls = torch.stack([class_token.float() for _, class_token in outputs], dim=1)
    return reference_log_odds(head, cls, outputs[-1][0].float().mean(dim=1))


@pytest.mark.parametrize("make_head", [lambda: linear_head(2), lambda: linear_head(3), log_regression_head, knn_head],
                         ids=["linear", "linear_3class", "log_regression", "knn"])
def test_evidence_is_the_derivative_along_each_patch_content(make_head):
    model, head = tiny_backbone(), make_head()
    torch.manual_seed(4)
    images = torch.randn(2, 3, 24, 32, dtype=torch.float64)
    explanation = Explainer(model, head)(images)
    with torch.no_grad():
        ones = torch.ones(2, 12, 1, dtype=torch.float64)
        np.testing.assert_allclose(explanation.log_odds, reference_log_odds_of_images(model, head, images, ones),
                                   rtol=1e-5, atol=1e-6)
        eps = 1e-2  # the features are float32, as the probes': a smaller step would measure their rounding
        reference = np.zeros((2, 12))
        for i in range(12):  # d/dt log-odds with patch i's embedding scaled by (1 + t), at t = 0
            step = torch.zeros_like(ones)
            step[:, i] = eps
            reference[:, i] = (reference_log_odds_of_images(model, head, images, ones + step)
                               - reference_log_odds_of_images(model, head, images, ones - step)) / (2 * eps)
    assert explanation.evidence.shape == (2, 3, 4)
    scale = np.abs(reference).max()
    assert scale > 1e-2
    np.testing.assert_allclose(explanation.evidence.reshape(2, 12), reference, atol=1e-3 * scale)


def test_attention_is_the_softmax_the_block_applies():
    model = tiny_backbone()
    block = model.flat_blocks()[-1]
    torch.manual_seed(5)
    x = torch.randn(2, N_PREFIX + 12, DIM, dtype=torch.float64)
    attention = class_token_attention(block, x)
    qkv = block.attn.qkv(block.norm1(x)).reshape(2, N_PREFIX + 12, 3, 2, DIM // 2)
    per_head = []
    for h in range(2):
        q, k, v = qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h]
        weights = torch.softmax(q[:, 0:1] @ k.transpose(1, 2) / np.sqrt(DIM // 2), dim=-1)  # (2, 1, N)
        per_head.append((weights, weights @ v))
    torch.testing.assert_close(attention, torch.stack([w[:, 0] for w, _ in per_head]).mean(dim=0).float())
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(2))
    # those weights are the ones the block's attention uses: they give its output for the class token
    attended = block.attn.attend(block.attn.qkv(block.norm1(x)))[:, 0]
    torch.testing.assert_close(torch.cat([out[:, 0] for _, out in per_head], dim=1), attended)
    # the explainer takes it in the last block, on its input tokens, over the patches only
    images = torch.randn(1, 3, 24, 32, dtype=torch.float64)
    explanation = Explainer(model, log_regression_head())(images)
    with torch.no_grad():
        tokens = model.prepare_tokens_with_masks(images)
        for b in model.flat_blocks()[:-1]:
            tokens = b(tokens)
        expected = class_token_attention(block, tokens)[:, N_PREFIX:].reshape(1, 3, 4)
    np.testing.assert_allclose(explanation.attention, expected.numpy(), rtol=1e-6)


def test_pca_rgb_is_the_scaled_projection_on_the_first_components():
    rng = np.random.default_rng(6)
    tokens = rng.normal(size=(2, 12, 8)) * np.array([5.0, 3.0, 2.0, 0.1, 0.1, 0.1, 0.1, 0.1])
    rgb = pca_rgb(torch.from_numpy(tokens)).numpy()
    flat = tokens.reshape(24, 8) - tokens.reshape(24, 8).mean(axis=0)
    _, _, vh = np.linalg.svd(flat, full_matrices=False)
    projections = flat @ vh[:3].T
    projections *= np.where((projections**3).mean(axis=0) < 0, -1, 1)
    expected = (projections - projections.min(axis=0)) / (projections.max(axis=0) - projections.min(axis=0))
    assert rgb.shape == (2, 12, 3)
    np.testing.assert_allclose(rgb.reshape(24, 3), expected, atol=1e-6)
    # rank 1 (every token on one line): one colour channel, the others 0; constant tokens: all 0
    line = np.outer(rng.normal(size=24), rng.normal(size=8)).reshape(2, 12, 8) + 1.0
    rank_one = pca_rgb(torch.from_numpy(line)).numpy().reshape(24, 3)
    assert (rank_one[:, 1:] == 0).all() and rank_one[:, 0].min() == 0 and rank_one[:, 0].max() == 1
    assert (pca_rgb(torch.ones(1, 4, 8)).numpy() == 0).all()


def test_knn_log_odds_is_the_vote_over_every_training_image():
    head = knn_head()
    cls = torch.randn(4, 1, DIM)
    np.testing.assert_allclose(positive_log_odds(head, cls, head(cls, torch.zeros(4, DIM))).numpy(),
                               reference_log_odds(head, cls, torch.zeros(4, DIM)), rtol=1e-6)
    one_sided = KnnHead(F.normalize(torch.randn(4, DIM), dim=1), torch.zeros(4), k=2, temperature=0.1, num_classes=2)
    with pytest.raises(ValueError, match="training images are all of one side"):
        one_sided.soft_log_odds(cls)


def test_map_peak_is_the_highest_patch_in_crop_pixels():
    evidence = np.array([[0.1, -2.0, 0.3], [0.2, 0.9, -0.5]])
    assert map_peak(evidence, 14) == {"row": 1, "col": 1, "value": 0.9, "box": [14, 14, 28, 28]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_maps_follow_the_float32_ones(dtype):
    """Under autocast (the predictor's precision on CUDA; here the CPU's) the maps are float32's to rounding."""
    model, head = tiny_backbone().float(), linear_head(2)
    torch.manual_seed(7)
    images = torch.randn(2, 3, 24, 32)
    reference = Explainer(model, head)(images)
    mixed = Explainer(model, head, make_autocast_ctx(dtype, torch.device("cpu")))(images)
    for name in ("evidence", "attention"):
        assert np.corrcoef(getattr(reference, name).ravel(), getattr(mixed, name).ravel())[0, 1] > 0.999, name
    np.testing.assert_allclose(mixed.log_odds, reference.log_odds, atol=0.1)


def test_patch_bank_anomaly_is_the_cosine_distance_to_the_nearest_reference_patch():
    torch.manual_seed(8)
    reference = torch.randn(50, 8)
    bank = PatchBank(reference)
    bank.chunk = 16  # several chunks of the bank
    query = torch.randn(2, 6, 8)
    query[0, 2] = 3.0 * reference[7]  # a reference patch, scaled: the same direction
    anomaly = bank.anomaly(query)
    q = query.reshape(12, 8).numpy()
    r = reference.numpy()
    cosine = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (r / np.linalg.norm(r, axis=1, keepdims=True)).T
    np.testing.assert_allclose(anomaly, (1.0 - cosine.max(axis=1)).reshape(2, 6), atol=1e-6)
    assert anomaly[0, 2] == pytest.approx(0.0, abs=1e-6) and anomaly.shape == (2, 6)
    with pytest.raises(ValueError, match=r"needs \(M >= 1, D\) tokens, got shape \(0, 4\)"):
        PatchBank(torch.zeros(0, 4))


def test_patch_bank_draws_evenly_from_every_photo_and_reproducibly():
    torch.manual_seed(9)
    batches = [torch.randn(3, 10, 4), torch.randn(2, 10, 4)]
    bank = PatchBank.sample(iter(batches), n_images=5, max_patches=12, seed=0)  # ceil(12 / 5) = 3 per photo
    assert len(bank) == 15
    photos = torch.cat(batches)
    for i, photo in enumerate(photos):
        drawn = bank.tokens[3 * i : 3 * i + 3]
        similarity = drawn @ F.normalize(photo, dim=1).T  # each drawn token is one of the photo's, all different
        assert torch.allclose(similarity.max(dim=1).values, torch.ones(3))
        assert len(set(similarity.argmax(dim=1).tolist())) == 3
    again = PatchBank.sample(iter(batches), n_images=5, max_patches=12, seed=0)
    other = PatchBank.sample(iter(batches), n_images=5, max_patches=12, seed=1)
    assert torch.equal(again.tokens, bank.tokens) and not torch.equal(other.tokens, bank.tokens)
    everything = PatchBank.sample(iter(batches), n_images=5, max_patches=1000, seed=0)
    assert len(everything) == 50
    with pytest.raises(ValueError, match="no reference photos"):
        PatchBank.sample(iter([]), n_images=0, max_patches=10, seed=0)
