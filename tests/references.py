"""Reference computations shared by the test packages (importable from every test: tests/ holds the root
conftest.py)."""

import torch


def sinkhorn_reference(logits: torch.Tensor, temp: float, n_iterations: int = 3,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sinkhorn-Knopp targets of (samples x prototypes) logits as the DINOv2 code defines them, in `dtype`: rows
    alternately normalised over prototypes and samples, each sample's row summing to 1 at the end."""
    q = torch.exp(logits.to(dtype) / temp).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()
