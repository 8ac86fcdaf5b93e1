"""The row-wise maths of the DINO and iBOT losses over the K prototypes, as pure functions that `torch.compile` fuses.

On a GPU these rows are large: a ViT-B/14 iteration of the anchor's protocol has about 5000 masked tokens x 65536
prototypes, and each eager op below (teacher: subtract the centre, divide, softmax; student: divide, log-softmax,
product, sum, and their backward) reads and writes the whole logit matrix once or more. Compiled
(`train.compile_loss`), each function becomes one or two fused passes that keep the intermediates in registers.

`LossKernels` holds the two functions, eager (the reference maths, unchanged from upstream) or compiled. The compiled
ones take every dimension but the prototypes' as dynamic (the masked-token count changes every iteration) and the
temperature as a 0-d tensor on the logits' device (the teacher temperature changes every iteration during its
warm-up), so neither recompiles.
"""

from typing import Callable, Union

import torch
import torch.nn.functional as F

Temperature = Union[float, torch.Tensor]
KernelFn = Callable[[torch.Tensor, torch.Tensor, Temperature], torch.Tensor]


def centered_softmax(teacher_output: torch.Tensor, center: torch.Tensor, temp: Temperature) -> torch.Tensor:
    """Teacher targets `softmax((teacher_output - center) / temp)` over the last dimension (float32 with a float32
    centre)."""
    return F.softmax((teacher_output - center) / temp, dim=-1)


def lossfunc(t: torch.Tensor, s: torch.Tensor, temp: Temperature) -> torch.Tensor:
    """`sum_k t * log_softmax(s / temp)` over the last dim (a negative cross-entropy, as upstream)."""
    return torch.sum(t * F.log_softmax(s / temp, dim=-1), dim=-1)


def compile_kernel(fn: KernelFn, backend: Union[str, Callable] = "inductor") -> KernelFn:
    """`fn` compiled with `backend`, called with dynamic leading dimensions and the temperature as a device tensor."""
    compiled = torch.compile(fn, backend=backend)

    def call(a: torch.Tensor, b: torch.Tensor, temp: Temperature) -> torch.Tensor:
        for x in (a, b):
            for dim in range(x.dim() - 1):
                torch._dynamo.maybe_mark_dynamic(x, dim)
        if not torch.is_tensor(temp):
            temp = torch.full((), temp, dtype=torch.float32, device=a.device)
        return compiled(a, b, temp)

    return call


class LossKernels:
    """`centered_softmax` and `lossfunc`, eager until `compile` is called."""

    def __init__(self) -> None:
        self.centered_softmax: KernelFn = centered_softmax
        self.lossfunc: KernelFn = lossfunc

    def compile(self, backend: Union[str, Callable] = "inductor") -> None:
        self.centered_softmax = compile_kernel(centered_softmax, backend)
        self.lossfunc = compile_kernel(lossfunc, backend)
