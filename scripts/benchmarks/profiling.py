"""PyTorch-profiler helpers of the benchmarks: a Chrome trace, an operator table and per-call counts of what ran.

On CUDA the record gives kernels per call and the fraction of wall time during which a kernel was running (below 1:
the GPU waited for the host); on the CPU, aten operators per call.
"""

import os
import time
from typing import Callable, Dict, List, Tuple

import torch


def busy_fraction(intervals: List[Tuple[float, float]], wall_us: float) -> float:
    """Length of the union of [start, end) intervals over `wall_us`."""
    busy, current_end = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= current_end:
            continue
        busy += end - max(start, current_end)
        current_end = end
    return busy / wall_us if wall_us > 0 else 0.0


def profile_iterations(step: Callable[[int], object], first_it: int, iterations: int, out_dir: str, tag: str) -> Dict:
    """Profile `iterations` calls of `step` (with `first_it`, `first_it + 1`, ...), then wait for the device; write
    `<tag>.trace.json` and `<tag>.ops.txt` (sorted by device time on CUDA, CPU time otherwise) to `out_dir`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    os.makedirs(out_dir, exist_ok=True)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for it in range(first_it, first_it + iterations):
            step(it)
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    trace = os.path.join(out_dir, f"{tag}.trace.json")
    table = os.path.join(out_dir, f"{tag}.ops.txt")
    prof.export_chrome_trace(trace)
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with open(table, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort_by, row_limit=40) + "\n")
    events = prof.events()
    result: Dict[str, object] = {"trace": trace, "table": table, "iterations": iterations}
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        result["kernels_per_iter"] = round(len(kernels) / iterations, 1)
        intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
        result["gpu_busy_fraction"] = round(busy_fraction(intervals, wall_us), 3)
    else:
        aten = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
        result["aten_ops_per_iter"] = round(len(aten) / iterations, 1)
    return result
