"""iBOT loss on masked patch tokens: per-token cross-entropy, averaged per image, then over images."""

from typing import Optional

import torch

from dinov2.loss.dino_clstoken_loss import TeacherCentering, _all_reduce_sum, _sinkhorn


class iBOTPatchLoss(TeacherCentering):
    """Centre (EMA over all ranks' patch tokens, applied lazily, see `TeacherCentering`) and Sinkhorn-Knopp teacher
    targets.

    Every torch.distributed call is guarded: world size 1 without a process group works (upstream's Sinkhorn
    all-reduces the masked-patch count unconditionally and crashes there).
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, 1, patch_out_dim), center_momentum)
        self.student_temp = student_temp

    def batch_center_sum(self, teacher_output: torch.Tensor) -> torch.Tensor:
        """`teacher_output`: (B, N, K); the mean over patches, summed over images (for a flat list of n masked tokens
        pass `tokens[:n].unsqueeze(0)`), then one more element: the number of those images that have tokens.

        The centre is thus averaged over all ranks' images, as upstream, except that an image without tokens (a
        batch where nothing was masked) is left out: upstream's mean over 0 tokens turns the centre into NaN for
        good."""
        n_tokens = teacher_output.shape[1]
        means = teacher_output.sum(1) / max(n_tokens, 1)
        counted = means.new_full((1, 1), float(teacher_output.shape[0] if n_tokens else 0))
        return torch.cat([means.sum(0, keepdim=True), counted], dim=-1)

    def next_center(self, reduced: torch.Tensor) -> torch.Tensor:
        """The EMA with the mean of the counted images; unchanged when no rank had tokens (no host synchronisation:
        the choice is made on the device)."""
        sums, counted = reduced[..., :-1], reduced[..., -1:]
        updated = self.center * self.center_momentum + sums / counted.clamp(min=1) * (1 - self.center_momentum)
        return torch.where(counted > 0, updated, self.center)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp over all ranks' masked tokens; `n_masked_patches_tensor` (local count) is not modified."""
        teacher_output = teacher_output.float()
        Q = torch.exp(teacher_output / teacher_temp).t()  # K x B_local
        B = n_masked_patches_tensor.detach().clone().to(device=Q.device, dtype=torch.float32)
        _all_reduce_sum(B)
        K = Q.shape[0]
        return _sinkhorn(Q, B, K, n_iterations).t()

    def forward(
        self, student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor, student_masks_flat: torch.Tensor
    ) -> torch.Tensor:
        """Dense variant (B x N x K tokens, B x N masks): mean over images of the per-image mean masked CE."""
        loss = self.kernels.lossfunc(teacher_patch_tokens, student_patch_tokens, self.student_temp)
        mask = student_masks_flat.float()
        loss = torch.sum(loss * mask, dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: Optional[int] = None,
        masks_weight: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """CE per masked token, weighted by `masks_weight` (default 1 / #masked tokens of its image), summed and
        divided by the number of images: the mean over images of each image's mean masked-token CE."""
        s, t = student_patch_tokens_masked, teacher_patch_tokens_masked
        if n_masked_patches is not None:
            s, t = s[:n_masked_patches], t[:n_masked_patches]
        loss = self.kernels.lossfunc(t, s, self.student_temp)
        if masks_weight is None:
            per_image = student_masks_flat.sum(dim=-1).clamp(min=1.0)
            masks_weight = (1 / per_image).unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]
