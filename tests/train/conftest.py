import pytest

from dinov2.data.sample_bbu import make_sample_bbu


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> str:
    """A small sample BBU dataset (12 groups x 3 views, 64x48 px): 21 training images."""
    root = str(tmp_path_factory.mktemp("bbu_sample"))
    make_sample_bbu(root, groups=12, size=64, seed=0)
    return root
