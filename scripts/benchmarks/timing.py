"""Timing helpers shared by the benchmarks: untimed warm-up, then the wall time of the timed calls, with the device
waited for on CUDA so that the time covers the work and not only its launch."""

import time
from typing import Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(step: Callable[[int], object], warmup: int, iters: int, device: torch.device) -> float:
    """Seconds taken by `step(warmup)`, ..., `step(warmup + iters - 1)` after the untimed `step(0)`, ...,
    `step(warmup - 1)`; on CUDA the peak-memory statistics are reset after the warm-up."""
    for it in range(warmup):
        step(it)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for it in range(warmup, warmup + iters):
        step(it)
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_mib(device: torch.device) -> Optional[float]:
    """`torch.cuda.max_memory_allocated` in MiB on CUDA, else None."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
