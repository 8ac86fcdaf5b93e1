"""Mixed precision in one process without FSDP: a low-precision copy of a module runs the forward and backward, and
the module itself keeps the fp32 ("master") parameters that the optimizer, the EMA, state dicts and checkpoints see.

This is the maths of FSDP's `MixedPrecision` at world size 1 (parameters cast to `param_dtype` for the forward,
gradients computed in `param_dtype` and given to the optimizer in the parameters' dtype, floating-point inputs cast
to `param_dtype`), without FSDP's per-unit parameter swapping: FSDP points every original parameter at a view of its
flat parameter before and after each unit's forward and backward, about 45 ms of host time per ViT-S/14 iteration on
the H100 machine, where the whole iteration takes 60 ms without it (the GPU then waits for the host half the time).
Here one foreach copy casts all parameters per iteration and one copy hands the gradients back. With one process
nothing is reduced, so `reduce_dtype` does not apply. A copy made `releasable` (the teacher's) keeps its tensors in
flat buffers whose memory `release()` frees between its forward and the next `refresh()`, as FSDP frees its
unsharded parameters after a forward.
"""

import copy
from typing import Any, Dict, List, Tuple

import torch
from torch import nn


def _cast_floating(x: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast_floating(v, dtype) for v in x)
    return x


def cast_forward_inputs(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point tensors among `module`'s forward arguments (also inside lists and tuples) to `dtype`,
    as FSDP's mixed precision does for its root modules; boolean masks and other values pass unchanged."""

    def hook(_module: nn.Module, args: Tuple, kwargs: Dict[str, Any]) -> Tuple[Tuple, Dict[str, Any]]:
        return _cast_floating(args, dtype), {k: _cast_floating(v, dtype) for k, v in kwargs.items()}

    module.register_forward_pre_hook(hook, with_kwargs=True)


def _floating_tensors(module: nn.Module) -> List[torch.Tensor]:
    return [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]


ALIGNMENT_BYTES = 256  # where each tensor starts in a flat buffer: vectorised kernels and cuBLAS want aligned inputs


def flatten_into_buffers(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """Move `tensors` into one flat buffer per (dtype, device), each starting on an `ALIGNMENT_BYTES` boundary: the
    tensors' `.data` become views of the buffers (the tensor objects, hence module attributes, stay the same), so
    resizing a buffer's storage frees or restores all of them at once. Returns the buffers."""
    groups: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    buffers = []
    for (dtype, device), group in groups.items():
        step = max(ALIGNMENT_BYTES // group[0].element_size(), 1)
        offsets = [0]
        for t in group:
            offsets.append(offsets[-1] + -(-t.numel() // step) * step)
        flat = torch.zeros(offsets[-1], dtype=dtype, device=device)
        for t, offset in zip(group, offsets):
            view = flat[offset : offset + t.numel()].view(t.shape)
            view.copy_(t)
            t.data = view
        buffers.append(flat)
    return buffers


class LowPrecisionCopy:
    """`module`: a copy of `master` with parameters in `param_dtype` and floating-point buffers in `buffer_dtype`
    (made before any `torch.compile` of `master`'s blocks: compile the copy's). Call `refresh()` before a forward
    (after the optimizer step, the EMA or a checkpoint load changed `master`) and `grads_to_master()` after the
    backward. With `releasable`, `release()` frees the copy's memory until the next `refresh()`."""

    def __init__(
        self, master: nn.Module, param_dtype: torch.dtype, buffer_dtype: torch.dtype, releasable: bool = False
    ) -> None:
        dtypes = {p.dtype for p in master.parameters()}
        if len(dtypes) != 1:
            raise ValueError(f"LowPrecisionCopy needs parameters of one dtype, got {sorted(map(str, dtypes))}")
        self.master = master
        self.module = copy.deepcopy(master)
        with torch.no_grad():
            for p in self.module.parameters():
                p.data = p.data.to(param_dtype)
            for b in self.module.buffers():
                if b.is_floating_point():
                    b.data = b.data.to(buffer_dtype)
        self._master_tensors = _floating_tensors(master)
        self._tensors = _floating_tensors(self.module)
        self._trainable = [(m, p) for m, p in zip(master.parameters(), self.module.parameters()) if p.requires_grad]
        self.releasable = releasable
        self._flat = flatten_into_buffers(self._tensors) if releasable else []
        self.released = False
        cast_forward_inputs(self.module, param_dtype)

    @torch.no_grad()
    def refresh(self) -> None:
        """The copy's parameters and floating-point buffers <- the master's, cast (one foreach copy), in memory
        allocated again if `release()` freed it."""
        if self.released:
            for flat in self._flat:
                flat.untyped_storage().resize_(flat.numel() * flat.element_size())
            self.released = False
        torch._foreach_copy_(self._tensors, self._master_tensors)

    def release(self) -> None:
        """Free the memory of the copy's parameters and floating-point buffers (resize their flat storages to 0)
        until the next `refresh()` (a forward in between is an error: the tensors have no memory). Kernels already
        queued on the device still read it safely: the caching allocator hands it out again only in stream order."""
        if not self.releasable:
            raise RuntimeError("release() needs a LowPrecisionCopy made with releasable=True")
        for flat in self._flat:
            flat.untyped_storage().resize_(0)
        self.released = True

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """Add the copy's gradients, cast to the master's dtype, to the master's (set them where they are None) and
        clear the copy's. Parameters without a gradient are left alone."""
        pairs = [(m, p.grad) for m, p in self._trainable if p.grad is not None]
        for _, p in self._trainable:
            p.grad = None
        if not pairs:
            return
        masters = [m for m, _ in pairs]
        flat = torch.empty(sum(m.numel() for m in masters), dtype=masters[0].dtype, device=masters[0].device)
        views = [v.view_as(m) for v, m in zip(flat.split([m.numel() for m in masters]), masters)]
        torch._foreach_copy_(views, [g for _, g in pairs])
        for m, v in zip(masters, views):
            if m.grad is None:
                m.grad = v
            else:
                m.grad.add_(v)
