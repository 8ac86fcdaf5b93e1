"""Suite-wide isolation (a test that starts a process group or exports distributed variables leaves none behind)
and the loading of the benchmark modules of scripts/benchmarks."""

import argparse
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Callable, List

import pytest
import torch

import dinov2.distributed as distributed


@pytest.fixture(autouse=True)
def _isolate_distributed_state():
    environ_before = dict(os.environ)
    yield
    if distributed.is_enabled():
        distributed.disable()
    if dict(os.environ) != environ_before:
        os.environ.clear()
        os.environ.update(environ_before)


@pytest.fixture
def single_cpu_process(monkeypatch):
    """A one-process gloo group on the CPU path (also on GPU machines), taken down afterwards."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    distributed.enable()
    yield
    distributed.disable()


@pytest.fixture
def load_benchmark(monkeypatch) -> Callable[[str], ModuleType]:
    """`load_benchmark(name)`: the module scripts/benchmarks/<name>.py (scripts/ is on sys.path for the test)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    return lambda name: importlib.import_module(f"benchmarks.{name}")


@pytest.fixture
def benchmark_args() -> Callable[[ModuleType, List[str]], argparse.Namespace]:
    """`benchmark_args(module, argv)`: `argv` parsed with the benchmark module's `add_arguments`."""

    def parse(module: ModuleType, argv: List[str]) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        return parser.parse_args(argv)

    return parse
