"""KoLeo regulariser (Sablayrolles et al., "Spreading vectors for similarity search"): -mean log(NN distance)."""

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """`-mean_i log(||x_i - x_nn(i)|| + eps)` on L2-normalised rows, nearest neighbour by cosine (self excluded).

    Always computed in float32 with autocast disabled: upstream computes in the input dtype, where eps=1e-8 underflows
    in fp16 and identical samples give log(0) = -inf (issues #143, #307, #314). Here:
    - duplicates give a finite loss: distance 0 -> -log(eps) = log(1e8) ~ 18.4 (and a finite gradient);
    - a batch of one has no neighbour and returns 0 (a finite value carrying a zero gradient);
    - the result is a float32 scalar whatever the input dtype (fp16/bf16/fp32).
    Applied per rank (local batch only), as upstream.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    @torch.no_grad()
    def pairwise_NNs_inner(self, x: torch.Tensor) -> torch.Tensor:
        """Index of each row's nearest neighbour by inner product (x is L2-normalised), excluding itself."""
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)  # the diagonal: a normalised row cannot be its own neighbour
        return torch.argmax(dots, dim=1)

    def forward(self, student_output: torch.Tensor) -> torch.Tensor:
        """student_output: (B, D) in any float dtype; returns a float32 scalar."""
        device_type = student_output.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            x = student_output.float()
            if x.shape[0] < 2:
                return x.new_zeros(()) + 0.0 * x.sum()  # keeps the graph connected
            x = F.normalize(x, p=2, dim=-1, eps=self.eps)
            indices = self.pairwise_NNs_inner(x)
            distances = torch.linalg.vector_norm(x - x[indices], ord=2, dim=-1)
            return -torch.log(distances + self.eps).mean()
