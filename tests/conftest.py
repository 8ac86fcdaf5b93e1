"""Suite-wide isolation: a test that starts a process group or exports distributed variables leaves none behind."""

import os

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
