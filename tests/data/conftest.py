import shutil

import pytest

from dinov2 import distributed

from dinov2.data.sample_bbu import make_sample_bbu

SAMPLE_GROUPS = 10  # 6 train / 2 val / 2 test
SAMPLE_SIZE = 64


@pytest.fixture(scope="session")
def bbu_sample(tmp_path_factory):
    """A small generated BBU dataset (read-only: tests that modify it use `bbu_copy`) and its summary."""
    root = str(tmp_path_factory.mktemp("bbu") / "bbu_sample")
    summary = make_sample_bbu(root, groups=SAMPLE_GROUPS, size=SAMPLE_SIZE, seed=3)
    return root, summary


@pytest.fixture
def bbu_copy(bbu_sample, tmp_path):
    """A private copy of the sample that a test may corrupt."""
    root = str(tmp_path / "bbu")
    shutil.copytree(bbu_sample[0], root)
    return root


@pytest.fixture
def world(monkeypatch):
    """`world(rank, size)`: pretend to be that rank through dinov2.distributed (what the samplers consult)."""

    def set_world(rank, size):
        monkeypatch.setattr(distributed, "get_global_rank", lambda: rank, raising=False)
        monkeypatch.setattr(distributed, "get_global_size", lambda: size, raising=False)

    return set_world
