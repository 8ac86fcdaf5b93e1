"""dinov2.hub.backbones and hubconf: architectures, official file names/URLs, weight resolution
(explicit path, DINOV2_WEIGHTS_DIR, torch hub cache, download) and the offline error."""

import os
import pathlib

import pytest
import torch
from hub_helpers import run_make_fake_official_weights

from dinov2.hub import backbones
from dinov2.hub.utils import WeightsNotFoundError
from dinov2.utils.utils import PretrainedWeightsError

REPO = str(pathlib.Path(__file__).resolve().parents[2])
BASE = "https://dl.fbaipublicfiles.com/dinov2"

# entry point -> (embed_dim, depth, registers, ffn weight key, released file, URL folder)
FACTORIES = {
    "dinov2_vits14": (384, 12, 0, "mlp.fc1.weight", "dinov2_vits14_pretrain.pth", "dinov2_vits14"),
    "dinov2_vitb14": (768, 12, 0, "mlp.fc1.weight", "dinov2_vitb14_pretrain.pth", "dinov2_vitb14"),
    "dinov2_vitl14": (1024, 24, 0, "mlp.fc1.weight", "dinov2_vitl14_pretrain.pth", "dinov2_vitl14"),
    "dinov2_vitg14": (1536, 40, 0, "mlp.w12.weight", "dinov2_vitg14_pretrain.pth", "dinov2_vitg14"),
    "dinov2_vits14_reg": (384, 12, 4, "mlp.fc1.weight", "dinov2_vits14_reg4_pretrain.pth", "dinov2_vits14"),
    "dinov2_vitb14_reg": (768, 12, 4, "mlp.fc1.weight", "dinov2_vitb14_reg4_pretrain.pth", "dinov2_vitb14"),
    "dinov2_vitl14_reg": (1024, 24, 4, "mlp.fc1.weight", "dinov2_vitl14_reg4_pretrain.pth", "dinov2_vitl14"),
    "dinov2_vitg14_reg": (1536, 40, 4, "mlp.w12.weight", "dinov2_vitg14_reg4_pretrain.pth", "dinov2_vitg14"),
}


def assert_same_model(model, reference) -> None:
    assert list(model.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    x = torch.randn(2, 3, 56, 56)  # 4x4 patches: pos_embed interpolated, cheap on CPU
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_architecture(name):
    dim, depth, registers, ffn_key, _, _ = FACTORIES[name]
    with torch.device("meta"):
        model = getattr(backbones, name)(pretrained=False)
    state = model.state_dict()
    assert (model.embed_dim, model.n_blocks, model.patch_size, model.chunked_blocks) == (dim, depth, 14, False)
    assert state["pos_embed"].shape == (1, 1370, dim)
    assert ("register_tokens" in state, model.num_register_tokens) == (registers > 0, registers)
    assert f"blocks.{depth - 1}.{ffn_key}" in state and f"blocks.{depth - 1}.ls2.gamma" in state
    expected_interpolation = (True, 0.0) if registers else (False, 0.1)
    assert (model.interpolate_antialias, model.interpolate_offset) == expected_interpolation


@pytest.mark.parametrize("name", list(FACTORIES))
def test_official_file_names_and_urls(monkeypatch, name):
    _, _, _, _, file_name, folder = FACTORIES[name]
    requested = []

    def record(file_name, url):
        requested.append((file_name, url))
        raise LookupError("stop before loading")

    monkeypatch.setattr(backbones, "get_weights_file", record)
    with torch.device("meta"), pytest.raises(LookupError):
        getattr(backbones, name)()
    assert requested == [(file_name, f"{BASE}/{folder}/{file_name}")]


def test_hubconf_and_weights_dir_give_identical_model(monkeypatch, weights_dir, reference_vits14, offline_hub):
    monkeypatch.setenv("DINOV2_WEIGHTS_DIR", str(weights_dir))
    model = torch.hub.load(REPO, "dinov2_vits14", source="local", verbose=False)
    assert_same_model(model, reference_vits14)
    assert offline_hub == []  # nothing downloaded


def test_register_model_from_generated_file(monkeypatch, tmp_path, offline_hub):
    written = run_make_fake_official_weights([str(tmp_path), "--models", "dinov2_vits14_reg", "--seed", "3"])
    assert written == [str(tmp_path / "dinov2_vits14_reg4_pretrain.pth")]
    monkeypatch.setenv("DINOV2_WEIGHTS_DIR", str(tmp_path))
    model = backbones.dinov2_vits14_reg()
    saved = torch.load(written[0], weights_only=True)
    assert list(saved) == list(model.state_dict()) and saved["register_tokens"].shape == (1, 4, 384)
    torch.testing.assert_close(model.register_tokens, saved["register_tokens"], rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[11].mlp.fc2.weight, saved["blocks.11.mlp.fc2.weight"], rtol=0, atol=0)
    assert offline_hub == []


def test_explicit_weights_path(weights_dir, reference_vits14, offline_hub):
    model = backbones.dinov2_vits14(weights=str(weights_dir / "dinov2_vits14_pretrain.pth"))
    assert_same_model(model, reference_vits14)
    with pytest.raises(FileNotFoundError, match="no_such_file.pth"):
        backbones.dinov2_vits14(weights=str(weights_dir / "no_such_file.pth"))
    assert offline_hub == []


def test_torch_hub_cache_is_used(weights_dir, reference_vits14, offline_hub):
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(cache)
    os.symlink(weights_dir / "dinov2_vits14_pretrain.pth", os.path.join(cache, "dinov2_vits14_pretrain.pth"))
    model = backbones.dinov2_vits14(weights="LVD142M")
    assert_same_model(model, reference_vits14)
    assert offline_hub == []


def test_offline_without_file_names_what_to_download(monkeypatch, tmp_path, offline_hub):
    empty_dir = tmp_path / "my_weights"
    empty_dir.mkdir()
    monkeypatch.setenv("DINOV2_WEIGHTS_DIR", str(empty_dir))
    url = f"{BASE}/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", "dinov2_vitl14_reg4_pretrain.pth")
    with torch.device("meta"), pytest.raises(WeightsNotFoundError) as excinfo:
        backbones.dinov2_vitl14_reg()
    message = str(excinfo.value)
    assert f"Download {url}" in message
    assert f"$DINOV2_WEIGHTS_DIR/dinov2_vitl14_reg4_pretrain.pth (currently DINOV2_WEIGHTS_DIR={empty_dir})" in message
    assert cached in message and "Temporary failure in name resolution" in message
    assert offline_hub == [(url, cached)]
    assert not os.path.exists(cached)


def test_weights_of_another_model_fail_strictly(weights_dir):
    with pytest.raises(PretrainedWeightsError, match=r"missing keys \(1\): register_tokens") as excinfo:
        backbones.dinov2_vits14_reg(weights=str(weights_dir / "dinov2_vits14_pretrain.pth"))
    assert str(weights_dir / "dinov2_vits14_pretrain.pth") in str(excinfo.value)


def test_unknown_arch_and_weights_type():
    with pytest.raises(ValueError, match="vit_huge"):
        backbones._make_dinov2_model(arch_name="vit_huge", pretrained=False)
    with pytest.raises(TypeError, match="weights must be"):
        backbones.dinov2_vits14(weights=3)
