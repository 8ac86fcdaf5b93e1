"""dinov2/loss/kernels.py: the eager loss maths against references, and the compiled functions against eager."""

import torch
import torch.nn.functional as F

from dinov2.loss import DINOLoss, iBOTPatchLoss
from dinov2.loss.kernels import LossKernels, centered_softmax, lossfunc

K = 33


def _rows(n: int, seed: int, *leading: int) -> torch.Tensor:
    return torch.randn(*leading, n, K, generator=torch.Generator().manual_seed(seed))


def test_eager_kernels_are_the_reference_maths():
    t, s, center = _rows(5, 0), _rows(5, 1), _rows(1, 2)
    e = torch.exp((t.double() - center.double()) / 0.04)  # float64: no overflow at this temperature
    torch.testing.assert_close(centered_softmax(t, center, 0.04), (e / e.sum(-1, keepdim=True)).float())
    targets = F.softmax(t, dim=-1)
    log_q = s / 0.1 - torch.logsumexp(s / 0.1, dim=-1, keepdim=True)
    torch.testing.assert_close(lossfunc(targets, s, 0.1), (targets * log_q).sum(-1))


def test_inductor_kernels_match_eager_values_and_gradients_as_rows_and_temperature_change():
    """The compiled (inductor, C++ on the CPU) functions over several masked-token counts and teacher temperatures,
    and over the (local crops, images, K) student layout of the DINO loss."""
    kernels = LossKernels()
    kernels.compile("inductor")
    shapes = [(7,), (12,), (20,), (3, 4)]
    for i, (shape, temp) in enumerate(zip(shapes, (0.04, 0.05, 0.06, 0.07))):
        *leading, n = shape
        logits, center = _rows(n, 10 + i, *leading), _rows(1, 20 + i)
        expected = centered_softmax(logits, center, temp)
        torch.testing.assert_close(kernels.centered_softmax(logits, center, temp), expected)
        targets = F.softmax(_rows(n, 30 + i), dim=-1)
        student = _rows(n, 40 + i, *leading).requires_grad_()
        student_ref = student.detach().clone().requires_grad_()
        weights = torch.linspace(0.5, 1.5, n)
        value, reference = kernels.lossfunc(targets, student, 0.1), lossfunc(targets, student_ref, 0.1)
        torch.testing.assert_close(value, reference)
        (value * weights).sum().backward()
        (reference * weights).sum().backward()
        torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-5, atol=1e-6)


def test_compiled_kernels_do_not_recompile_for_new_row_counts_or_temperatures():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    kernels = LossKernels()
    kernels.compile(counting_backend)
    for n, temp in ((6, 0.04), (9, 0.045), (15, 0.05), (11, 0.07)):
        targets = kernels.centered_softmax(_rows(n, n), _rows(1, 0), temp)
        student = _rows(n, n + 1).requires_grad_()
        kernels.lossfunc(targets, student, 0.1).sum().backward()
    assert len(graphs) == 2  # one graph per function: the first call's, dynamic in the rows


def test_losses_with_compiled_kernels_match_eager():
    """`DINOLoss` / `iBOTPatchLoss` with `kernels.compile()` (aot_eager) give the eager losses and centre updates."""
    masks = torch.zeros(3, 8, dtype=torch.bool)
    masks[0, :2], masks[1, 3:8] = True, True
    n = int(masks.sum())
    results = []
    for compiled in (False, True):
        dino, ibot = DINOLoss(K), iBOTPatchLoss(K)
        if compiled:
            dino.kernels.compile("aot_eager")
            ibot.kernels.compile("aot_eager")
        teacher_cls, teacher_patches = _rows(6, 1), _rows(n, 2)
        targets = dino.softmax_center_teacher(teacher_cls, teacher_temp=0.05).view(2, 3, K)
        dino.update_center(teacher_cls)
        patch_targets = ibot.softmax_center_teacher(teacher_patches.unsqueeze(0), teacher_temp=0.05).squeeze(0)
        ibot.update_center(teacher_patches.unsqueeze(0))
        local, glob, patches = _rows(3, 3, 4).requires_grad_(), _rows(6, 4).requires_grad_(), _rows(n, 5)
        patches.requires_grad_()
        loss = dino([local], list(targets)) + dino([glob], [targets.flatten(0, 1)])
        loss = loss + ibot.forward_masked(patches, patch_targets, masks)
        loss.backward()
        results.append([loss, local.grad, glob.grad, patches.grad, dino.state_dict()["center"], ibot.center])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compiled_cross_entropy_of_fp16_logits_is_closer_to_float64_than_eager():
    """Eager rounds `s / temp` and the log-softmax to fp16 (upstream's maths with fp16 heads); the compiled function
    rounds only its output, so values and gradients lie far closer to a float64 reference (the gradient of either is
    then rounded to fp16: compiled, that rounding is its whole error)."""
    kernels = LossKernels()
    kernels.compile("inductor")
    targets = F.softmax(3 * _rows(37, 1), dim=-1)
    logits = (3 * _rows(37, 2)).half()
    errors = {}
    reference = logits.double().requires_grad_()
    reference_value = lossfunc(targets.double(), reference, 0.1)
    reference_value.sum().backward()
    for name, fn in (("compiled", kernels.lossfunc), ("eager", lossfunc)):
        student = logits.clone().requires_grad_()
        value = fn(targets, student, 0.1)
        value.sum().backward()
        assert value.dtype == torch.float32 and student.grad.dtype == torch.float16
        errors[name] = ((value.detach() - reference_value.detach()).abs().max().item(),
                        (student.grad.double() - reference.grad).abs().max().item())  # fmt: skip
    assert errors["compiled"][0] < errors["eager"][0] / 100 and errors["compiled"][1] < errors["eager"][1] / 5
