import torch
import torch.nn.functional as F

from dinov2.loss import iBOTPatchLoss


def _masks():
    # 3 images x 4 patches; image 0 has 1 masked patch, image 1 has 3, image 2 none
    return torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)


def test_forward_masked_is_mean_over_images_of_per_image_mean_ce():
    g = torch.Generator().manual_seed(0)
    masks = _masks()
    n = int(masks.sum())
    s = torch.randn(n, 7, generator=g)
    t = torch.softmax(torch.randn(n, 7, generator=g), dim=-1)
    loss = iBOTPatchLoss(7, student_temp=0.1).forward_masked(s, t, masks)
    ce = -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1)  # per masked token, image order: [img0 | img1 x3]
    expected = (ce[0] / 1 + ce[1:4].sum() / 3) / 3  # image 2 (nothing masked) contributes 0, still counted
    torch.testing.assert_close(loss, expected)


def test_forward_masked_with_padding_and_explicit_weights():
    g = torch.Generator().manual_seed(1)
    masks = _masks()
    n = int(masks.sum())
    s = torch.randn(n + 2, 7, generator=g)  # padded buffer: rows beyond n are ignored via n_masked_patches
    t = torch.softmax(torch.randn(n + 2, 7, generator=g), dim=-1)
    weights = torch.tensor([0.5, 1.0, 2.0, 0.25])
    loss = iBOTPatchLoss(7).forward_masked(s, t, masks, n_masked_patches=n, masks_weight=weights)
    ce = -(t[:n] * F.log_softmax(s[:n] / 0.1, dim=-1)).sum(-1)
    torch.testing.assert_close(loss, (ce * weights).sum() / 3)


def test_dense_forward_matches_masked_forward():
    g = torch.Generator().manual_seed(2)
    masks = _masks()
    s = torch.randn(3, 4, 7, generator=g)
    t = torch.softmax(torch.randn(3, 4, 7, generator=g), dim=-1)
    loss_module = iBOTPatchLoss(7)
    dense = loss_module(s, t, masks)
    masked = loss_module.forward_masked(s[masks], t[masks], masks)
    torch.testing.assert_close(dense, masked)


def test_center_ema_over_patch_means():
    g = torch.Generator().manual_seed(3)
    t1, t2 = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    loss = iBOTPatchLoss(3, center_momentum=0.9)
    loss.update_center(t1)
    out = loss.softmax_center_teacher(t2, teacher_temp=0.1)
    c1 = 0.1 * t1.mean(dim=(0, 1)).view(1, 1, 3)
    torch.testing.assert_close(loss.center, c1)
    torch.testing.assert_close(out, torch.softmax((t2 - c1) / 0.1, dim=-1))


def test_center_is_kept_through_a_batch_without_masked_tokens():
    """No masked token in a batch (int(2B * mask_sample_probability) crops masked can be 0): the centre stays as it
    was and finite, where upstream's mean over 0 tokens makes it NaN for the rest of the run."""
    g = torch.Generator().manual_seed(5)
    t1, t2 = torch.randn(7, 3, generator=g), torch.randn(4, 3, generator=g)
    loss = iBOTPatchLoss(3, center_momentum=0.9)
    loss.update_center(t1.unsqueeze(0))
    loss.softmax_center_teacher(t1.unsqueeze(0), teacher_temp=0.1)
    c1 = 0.1 * t1.mean(0).view(1, 1, 3)
    torch.testing.assert_close(loss.center, c1)
    loss.update_center(t1[:0].unsqueeze(0))  # nothing masked
    assert loss.softmax_center_teacher(t1[:0].unsqueeze(0), teacher_temp=0.1).shape == (1, 0, 3)
    assert torch.equal(loss.center, c1)
    loss.update_center(t2.unsqueeze(0))
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.9 * c1 + 0.1 * t2.mean(0).view(1, 1, 3))


def test_sinkhorn_without_process_group_uses_local_count_and_keeps_it():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(6, 4, generator=g)
    count = torch.tensor(6)
    out = iBOTPatchLoss(4).sinkhorn_knopp_teacher(t, 0.3, count, n_iterations=3)
    assert count.item() == 6  # the caller's tensor is not reduced in place
    Q = torch.exp(t.double() / 0.3).t()
    Q = Q / Q.sum()
    for _ in range(3):
        Q = Q / Q.sum(dim=1, keepdim=True) / 4
        Q = Q / Q.sum(dim=0, keepdim=True) / 6
    torch.testing.assert_close(out.double(), (Q * 6).t(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(6))
