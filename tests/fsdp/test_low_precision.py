"""dinov2/fsdp/low_precision.py: the one-process mixed precision against a module cast by hand."""

import copy

import pytest
import torch
from torch import nn

from dinov2.fsdp.low_precision import ALIGNMENT_BYTES, LowPrecisionCopy, cast_forward_inputs


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


def _floating(module: nn.Module):
    return [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]


def test_release_frees_the_copy_until_refresh():
    """A releasable copy keeps its tensors as aligned views of one flat buffer per dtype; `release()` frees them all
    (a forward in between is an error), `refresh()` brings back the master's current values; the master and a
    non-releasable copy, which refuses `release()`, are untouched."""
    torch.manual_seed(0)
    master = Net()
    low = LowPrecisionCopy(master, torch.float16, torch.bfloat16, releasable=True)
    plain = LowPrecisionCopy(master, torch.float16, torch.bfloat16)
    x, mask = torch.randn(5, 8), torch.rand(5, 4) > 0.3
    assert torch.equal(low.module(x, mask), plain.module(x, mask))
    storages = {t.untyped_storage().data_ptr() for t in _floating(low.module)}
    assert len(storages) == 2  # fp16 parameters, bf16 buffer
    assert all((t.data_ptr() - t.untyped_storage().data_ptr()) % ALIGNMENT_BYTES == 0 for t in _floating(low.module))
    assert len({t.untyped_storage().data_ptr() for t in _floating(plain.module)}) == 6
    with pytest.raises(RuntimeError, match="releasable=True"):
        plain.release()

    low.release()
    assert low.released and {t.untyped_storage().nbytes() for t in _floating(low.module)} == {0}
    with pytest.raises(RuntimeError, match="out of bounds for storage of size 0"):
        low.module(x, mask)
    with torch.no_grad():
        master.fc2.bias.add_(1.0)
        master.shift.mul_(2.0)
    low.refresh()
    plain.refresh()
    assert not low.released
    for t, reference in zip(_floating(low.module), _floating(plain.module)):
        assert t.dtype == reference.dtype and torch.equal(t, reference)
    assert torch.equal(low.module(x, mask), plain.module(x, mask))
    assert all(p.dtype == torch.float32 and p.untyped_storage().nbytes() > 0 for p in _floating(master))


def test_compiled_copy_reads_the_refreshed_memory():
    """Inductor-compiled forwards of a releasable copy across release/refresh cycles: each gives the eager result of
    the master's current values, and nothing is compiled after the first call (storage resizes do not recompile)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    master = Net()
    low = LowPrecisionCopy(master, torch.bfloat16, torch.float32, releasable=True)
    reference = LowPrecisionCopy(master, torch.bfloat16, torch.float32)
    compiled = torch.compile(low.module, backend="inductor")
    x, mask = torch.randn(5, 8), torch.rand(5, 4) > 0.3
    counters = torch._dynamo.utils.counters
    counters.clear()
    graphs = []
    for step in range(3):
        low.refresh()
        reference.refresh()
        with torch.no_grad():
            out = compiled(x, mask)
        graphs.append(counters["stats"]["unique_graphs"])
        low.release()
        torch.testing.assert_close(out, reference.module(x, mask), rtol=0, atol=0, msg=f"step {step}")
        with torch.no_grad():
            master.fc1.weight.mul_(0.5)
    assert graphs[0] > 0 and graphs == graphs[:1] * 3


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
