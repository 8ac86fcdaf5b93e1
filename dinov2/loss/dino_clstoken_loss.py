"""DINO loss on class tokens: cross-entropy between teacher targets (centred softmax or Sinkhorn-Knopp) and student."""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dinov2 import distributed
from dinov2.loss.kernels import LossKernels


class TeacherCentering(nn.Module):
    """EMA centre of teacher outputs over all ranks, shared by `DINOLoss` and `iBOTPatchLoss`.

    As upstream, `update_center` starts an async all-reduce of the batch sum and the new centre is applied lazily at
    the next `softmax_center_teacher` call (or before a `state_dict()` is taken, so a checkpoint never misses a
    pending update). Subclasses say how a batch is summed in `batch_center_sum` and how the all-reduced sum becomes
    the new centre in `next_center`. Works with and without a process group. The row-wise maths (centred softmax,
    cross-entropy) runs through `self.kernels`, eager unless `self.kernels.compile()` was called (see
    `dinov2/loss/kernels.py`).
    """

    def __init__(self, center_shape: Tuple[int, ...], center_momentum: float) -> None:
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(*center_shape))
        self.updated = True
        self.reduce_handle: Optional[dist.Work] = None
        self.len_teacher_output: Optional[int] = None
        self.async_batch_center: Optional[torch.Tensor] = None
        self.kernels = LossKernels()
        self.register_state_dict_pre_hook(_apply_pending_center_update)

    def batch_center_sum(self, teacher_output: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's batch (dim 0) of what is averaged into the centre; shape of `center`."""
        return torch.sum(teacher_output, dim=0, keepdim=True)

    def next_center(self, reduced: torch.Tensor) -> torch.Tensor:
        """The centre after the update with `reduced`, the all-ranks sum of `batch_center_sum`: the EMA with the
        mean over all ranks' batches."""
        batch_center = reduced / (self.len_teacher_output * distributed.get_global_size())
        return self.center * self.center_momentum + batch_center * (1 - self.center_momentum)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        self.apply_center_update()
        return self.kernels.centered_softmax(teacher_output, self.center, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output: torch.Tensor) -> None:
        self.updated = False
        self.len_teacher_output = len(teacher_output)
        self.async_batch_center = self.batch_center_sum(teacher_output)
        self.reduce_handle = _all_reduce_sum(self.async_batch_center, async_op=True)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        if self.updated:
            return
        if self.reduce_handle is not None:
            self.reduce_handle.wait()
        self.center = self.next_center(self.async_batch_center)
        self.updated = True
        self.reduce_handle = None
        self.async_batch_center = None


class DINOLoss(TeacherCentering):
    """`loss = -sum_{student s, teacher t} mean_b sum_k t * log_softmax(s / student_temp)`.

    Computed as `-sum_s mean_b sum_k (sum_t t) * log_softmax(s)`: one product per student tensor instead of one per
    (student, teacher) pair. A student tensor may carry leading crop dimensions, (S, B, K): its S crops count as S
    students (one log-softmax and one product for all local crops). The centre is an EMA of the batch mean of teacher
    logits over all ranks, updated lazily (see `TeacherCentering`).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, out_dim), center_momentum)
        self.student_temp = student_temp

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp over the global batch (rows of the result sum to 1), computed in float32."""
        teacher_output = teacher_output.float()
        Q = torch.exp(teacher_output / teacher_temp).t()  # K x B
        B = Q.shape[1] * distributed.get_global_size()
        K = Q.shape[0]
        return _sinkhorn(Q, B, K, n_iterations).t()

    def forward(
        self, student_output_list: List[torch.Tensor], teacher_out_softmaxed_centered_list: List[torch.Tensor]
    ) -> torch.Tensor:
        teachers = list(teacher_out_softmaxed_centered_list)
        teacher_sum = teachers[0] if len(teachers) == 1 else torch.stack(teachers).sum(dim=0)
        total_loss = 0
        for s in student_output_list:
            total_loss = total_loss - self.kernels.lossfunc(teacher_sum, s, self.student_temp).mean(dim=-1).sum()
        return total_loss


def _all_reduce_sum(tensor: torch.Tensor, async_op: bool = False) -> Optional[dist.Work]:
    """In-place sum over ranks; returns the async handle if any. The identity without a process group and with one
    process (where a collective would only add host time and, with NCCL, a wait)."""
    if not distributed.is_multi_process():
        return None
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=async_op)


def _apply_pending_center_update(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """state_dict pre-hook: fold a pending (lazily applied) centre update into the buffer before it is saved."""
    module.apply_center_update()


def _sinkhorn(Q: torch.Tensor, B, K: int, n_iterations: int) -> torch.Tensor:
    """Alternate row/column normalisation of Q (K x B_local); B is the global column count (int or tensor).

    Row sums are all-reduced (rows span all ranks' columns); columns are local. Returns Q scaled so columns sum to 1.
    """
    sum_Q = torch.sum(Q)
    _all_reduce_sum(sum_Q)
    Q = Q / sum_Q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        _all_reduce_sum(sum_of_rows)
        Q = Q / sum_of_rows
        Q = Q / K
        Q = Q / torch.sum(Q, dim=0, keepdim=True)
        Q = Q / B
    return Q * B
