"""scripts/benchmarks/timing.py: warm-up calls are not timed; every call gets its index."""

import time

import torch


def test_timed_calls_time_only_the_calls_after_the_warm_up(load_benchmark):
    timing = load_benchmark("timing")
    calls = []

    def step(it: int) -> None:
        calls.append(it)
        time.sleep(0.5 if it < 2 else 0.01)  # warm-up calls are slow, as compiling ones are

    seconds = timing.timed_calls(step, warmup=2, iters=3, device=torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4]
    assert 0.03 <= seconds < 0.5
    assert timing.peak_memory_mib(torch.device("cpu")) is None
