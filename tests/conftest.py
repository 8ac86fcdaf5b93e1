"""Suite-wide isolation: a test that starts a process group or exports distributed variables leaves none behind."""

import os

import pytest

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
