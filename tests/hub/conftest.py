"""Hub test fixtures: released-layout ViT-S/14 weight files, and an isolated offline environment."""

import os
import urllib.error

import pytest
import torch
from hub_helpers import build_released_vits14, run_make_fake_official_weights


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    """A directory written by `scripts/make_fake_official_weights.py`: random weights under the official names,
    `dinov2_vits14_pretrain.pth` (raw state dict, released layout) and its two ImageNet linear heads."""
    out = tmp_path_factory.mktemp("dinov2_weights")
    written = run_make_fake_official_weights([str(out), "--models", "dinov2_vits14", "--linear-heads"])
    expected = ["dinov2_vits14_pretrain.pth", "dinov2_vits14_linear_head.pth", "dinov2_vits14_linear4_head.pth"]
    assert written == [str(out / name) for name in expected]
    assert sorted(os.listdir(out)) == sorted(expected)  # no temporary files left
    return out


@pytest.fixture(scope="session")
def reference_vits14(weights_dir):
    """The model `dinov2_vits14_pretrain.pth` was saved from, restored with plain `load_state_dict`."""
    model = build_released_vits14()
    state_dict = torch.load(weights_dir / "dinov2_vits14_pretrain.pth", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """Empty torch hub cache, no DINOV2_WEIGHTS_DIR, and downloads that fail like an offline machine's.
    Yields the list of (url, dst) download attempts."""
    attempts = []

    def offline_download(url, dst, *args, **kwargs):
        attempts.append((url, dst))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("DINOV2_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline_download)
    assert torch.hub.get_dir() == os.path.join(str(tmp_path / "torch_home"), "hub")
    yield attempts
