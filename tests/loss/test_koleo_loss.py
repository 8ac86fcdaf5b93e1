import math

import pytest
import torch

from dinov2.loss import KoLeoLoss


def _brute_force(x, eps=1e-8):
    """-mean_i log(min_{j != i} ||u_i - u_j|| + eps) with u = x / ||x||, by explicit loops in float64."""
    rows = x.double().tolist()
    units = []
    for row in rows:
        norm = max(math.sqrt(sum(v * v for v in row)), eps)
        units.append([v / norm for v in row])
    total = 0.0
    for i, ui in enumerate(units):
        nearest = min(math.dist(ui, uj) for j, uj in enumerate(units) if j != i)
        total += math.log(nearest + eps)
    return -total / len(units)


def test_matches_brute_force_nearest_neighbours():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g)
    assert math.isclose(KoLeoLoss()(x).item(), _brute_force(x), rel_tol=1e-5)


def test_duplicates_are_finite_with_finite_gradient():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 5, generator=g)
    x = torch.cat([base, base[:1]]).requires_grad_()  # rows 0 and 3 identical: distance 0
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert math.isclose(loss.item(), _brute_force(x.detach()), rel_tol=1e-5)


def test_batch_of_one_is_zero_and_differentiable():
    x = torch.randn(1, 5, requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros(1, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_fp32(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 8, generator=g).to(dtype)
    dup = torch.cat([x, x[:2]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, loss_dup = KoLeoLoss()(x), KoLeoLoss()(dup)
    assert loss.dtype == torch.float32 and loss_dup.dtype == torch.float32
    assert math.isclose(loss.item(), _brute_force(x.float()), rel_tol=1e-5)
    assert torch.isfinite(loss_dup)
    assert math.isclose(loss_dup.item(), _brute_force(dup.float()), rel_tol=1e-5)
