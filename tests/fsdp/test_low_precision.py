"""dinov2/fsdp/low_precision.py: the one-process mixed precision against a module cast by hand."""

import copy

import pytest
import torch
from torch import nn

from dinov2.fsdp.low_precision import LowPrecisionCopy, cast_forward_inputs


class Net(nn.Module):
    """Two linear layers, a fp32 buffer and a parameter that gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.unused = nn.Parameter(torch.randn(3))
        self.register_buffer("shift", torch.randn(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, self.fc2(torch.relu(self.fc1(x))) + self.shift, 0.0)


def _reference(master: Net, dtype: torch.dtype) -> Net:
    net = copy.deepcopy(master)
    for p in net.parameters():
        p.data = p.data.to(dtype)
    return net


def test_forward_and_gradients_are_those_of_the_cast_module():
    torch.manual_seed(0)
    master = Net()
    low = LowPrecisionCopy(master, torch.bfloat16, torch.float32)
    assert {p.dtype for p in low.module.parameters()} == {torch.bfloat16} and low.module.shift.dtype == torch.float32
    assert {p.dtype for p in master.parameters()} == {torch.float32}
    x, mask = torch.randn(5, 8), torch.rand(5, 4) > 0.3
    reference = _reference(master, torch.bfloat16)
    expected = reference(x.bfloat16(), mask)
    out = low.module(x, mask)  # fp32 input, cast by the forward pre-hook; the bool mask is left alone
    assert out.dtype == expected.dtype == torch.float32  # the fp32 buffer promotes the bf16 product
    assert torch.equal(out, expected)
    expected.float().square().sum().backward()
    out.float().square().sum().backward()
    low.grads_to_master()
    for (name, p), ref in zip(master.named_parameters(), reference.parameters()):
        if name == "unused":
            assert p.grad is None
            continue
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, ref.grad.float()), name
    assert all(p.grad is None for p in low.module.parameters())

    # a second backward adds to the master's gradients, as autograd accumulation would
    first = {n: p.grad.clone() for n, p in master.named_parameters() if p.grad is not None}
    low.module(x, mask).float().square().sum().backward()
    low.grads_to_master()
    for name, grad in first.items():
        assert torch.equal(master.get_parameter(name).grad, 2 * grad), name


def test_refresh_casts_the_updated_master():
    torch.manual_seed(0)
    master = Net()
    low = LowPrecisionCopy(master, torch.float16, torch.bfloat16)
    assert low.module.shift.dtype == torch.bfloat16
    with torch.no_grad():
        master.fc1.weight.add_(1.0)
        master.shift.mul_(3.0)
    assert not torch.equal(low.module.fc1.weight, master.fc1.weight.half())
    low.refresh()
    for (name, p), q in zip(master.named_parameters(), low.module.parameters()):
        assert q.dtype == torch.float16 and torch.equal(q, p.half()), name
    assert torch.equal(low.module.shift, master.shift.bfloat16())


def test_parameters_of_several_dtypes_are_refused():
    master = Net()
    master.fc2.half()
    with pytest.raises(ValueError, match=r"one dtype, got \['torch.float16', 'torch.float32'\]"):
        LowPrecisionCopy(master, torch.bfloat16, torch.float32)


def test_cast_forward_inputs_reaches_into_lists():
    seen = {}

    class Probe(nn.Module):
        def forward(self, xs, masks=None, scale=1.0):
            seen.update(xs=[x.dtype for x in xs], masks=[m.dtype for m in masks], scale=scale)
            return xs

    probe = Probe()
    cast_forward_inputs(probe, torch.float16)
    probe([torch.zeros(1), torch.zeros(1, dtype=torch.float64)], masks=(torch.ones(1, dtype=torch.bool),), scale=2.0)
    assert seen == {"xs": [torch.float16, torch.float16], "masks": [torch.bool], "scale": 2.0}
