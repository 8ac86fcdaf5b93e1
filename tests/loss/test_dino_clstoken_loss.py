import math

import torch
from references import sinkhorn_reference

from dinov2.loss import DINOLoss


def _ce_reference(students, teachers, temp):
    """-sum_{s,t} mean_b sum_k t[b,k] * log softmax(s[b]/temp)[k], with explicit loops."""
    total = 0.0
    for s in students:
        for t in teachers:
            per_sample = []
            for b in range(s.shape[0]):
                logits = [v / temp for v in s[b].tolist()]
                log_z = math.log(sum(math.exp(v) for v in logits))
                per_sample.append(sum(tk * (lk - log_z) for tk, lk in zip(t[b].tolist(), logits)))
            total -= sum(per_sample) / len(per_sample)
    return total


def test_forward_is_cross_entropy_over_all_pairs():
    g = torch.Generator().manual_seed(0)
    students = [torch.randn(4, 6, generator=g) for _ in range(3)]
    teachers = [torch.softmax(torch.randn(4, 6, generator=g), dim=-1) for _ in range(2)]
    loss = DINOLoss(6, student_temp=0.1)(students, teachers)
    assert math.isclose(loss.item(), _ce_reference(students, teachers, 0.1), rel_tol=1e-5)
    stacked = DINOLoss(6, student_temp=0.1)([torch.stack(students[:2]), students[2]], teachers)  # (S, B, K) form
    assert math.isclose(stacked.item(), _ce_reference(students, teachers, 0.1), rel_tol=1e-5)
    single = DINOLoss(6, student_temp=0.1)(students, teachers[:1])
    assert math.isclose(single.item(), _ce_reference(students, teachers[:1], 0.1), rel_tol=1e-5)


def test_center_is_ema_of_batch_means_applied_lazily():
    g = torch.Generator().manual_seed(1)
    t1, t2, t3 = (torch.randn(5, 4, generator=g) for _ in range(3))
    loss = DINOLoss(4, center_momentum=0.9)
    loss.update_center(t1)
    assert torch.equal(loss.center, torch.zeros(1, 4))  # pending until the next softmax_center_teacher
    out = loss.softmax_center_teacher(t2, teacher_temp=0.07)
    c1 = 0.1 * t1.mean(0, keepdim=True)
    torch.testing.assert_close(loss.center, c1)
    torch.testing.assert_close(out, torch.softmax((t2 - c1) / 0.07, dim=-1))
    loss.update_center(t2)
    loss.softmax_center_teacher(t3, teacher_temp=0.07)
    torch.testing.assert_close(loss.center, 0.9 * c1 + 0.1 * t2.mean(0, keepdim=True))


def test_state_dict_includes_a_pending_center_update():
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    loss = DINOLoss(4)
    loss.update_center(t)
    torch.testing.assert_close(loss.state_dict()["center"], 0.1 * t.mean(0, keepdim=True))


def test_sinkhorn_knopp_teacher_matches_reference_and_normalises():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(8, 5, generator=g)
    out = DINOLoss(5).sinkhorn_knopp_teacher(t, teacher_temp=0.5, n_iterations=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), sinkhorn_reference(t, 0.5, 3), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(8))  # each sample a distribution
    # prototypes almost equipartitioned after enough iterations: column sums -> B / K
    out_many = DINOLoss(5).sinkhorn_knopp_teacher(t, teacher_temp=0.5, n_iterations=50)
    torch.testing.assert_close(out_many.sum(dim=0), torch.full((5,), 8 / 5), rtol=1e-4, atol=1e-4)


def test_one_process_group_issues_no_collective(single_cpu_process, monkeypatch):
    """With a process group of one, the centre update needs no all-reduce (it would only add host time)."""

    def no_collective(*args, **kwargs):
        raise AssertionError("all_reduce called with one process")

    monkeypatch.setattr(torch.distributed, "all_reduce", no_collective)
    g = torch.Generator().manual_seed(2)
    t1, t2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    loss = DINOLoss(4, center_momentum=0.9)
    loss.update_center(t1)
    out = loss.softmax_center_teacher(t2, teacher_temp=0.07)
    center = 0.1 * t1.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss.center, center)
    torch.testing.assert_close(out, torch.softmax((t2 - center) / 0.07, dim=-1))
