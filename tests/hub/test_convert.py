"""dinov2.hub.convert: a backbone in upstream's hub layout, timm's and HF transformers', each giving this backbone's
tokens in the other library; a check that keeps a drifting conversion out."""

import json
import os
import stat

import pytest
import timm
import torch
import transformers
from hub_helpers import build_released_vits14
from safetensors.torch import load_file

from dinov2.eval.setup import build_model_for_eval
from dinov2.hub import convert
from dinov2.hub.backbones import dinov2_vits14
from dinov2.models import build_model_from_cfg
from dinov2.utils.config import get_cfg_from_args

TINY = "student:\n  arch: vit_tiny\n  patch_size: 16\ncrops:\n  global_crops_size: 48\n"
VARIANTS = {  # config overrides of each tested backbone
    "chunked_layerscale": "  block_chunks: 4\n",
    "registers_no_layerscale": "  num_register_tokens: 4\n  layerscale: 0\n  interpolate_offset: 0.0\n"
                               "  interpolate_antialias: true\n",
    "swiglu": "  ffn_layer: swiglufused\n  qkv_bias: false\n",
}


def write_backbone(tmp_path, overrides: str):
    """In `tmp_path` (made if missing): a config and a teacher checkpoint of random weights large enough that every
    block, layer scale and position matter (a fresh init has layer scales of 1e-5)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.yaml"
    config.write_text(TINY.replace("  patch_size: 16\n", "  patch_size: 16\n" + overrides))
    cfg = get_cfg_from_args(convert.get_args_parser().parse_args(["--config-file", str(config)]))
    torch.manual_seed(0)
    model, _ = build_model_from_cfg(cfg, only_teacher=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.2).add_(torch.ones_like(parameter) if parameter.ndim == 1 else 0)
    weights = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, weights)
    return config, weights


def run(config, weights, output_dir, *extra: str) -> dict:
    return convert.run_convert(convert.get_args_parser().parse_args(
        ["--config-file", str(config), "--pretrained-weights", str(weights), "--output-dir", str(output_dir),
         "--check", "true", *extra]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_three_layouts_give_this_backbones_tokens(tmp_path, variant):
    config, weights = write_backbone(tmp_path, VARIANTS[variant])
    record = run(config, weights, tmp_path / "out")
    assert list(record["formats"]) == ["hub", "timm", "hf"]
    assert sorted(os.listdir(tmp_path / "out")) == ["conversion.json", "hf", "hub", "timm"]  # no staging left
    assert json.loads((tmp_path / "out" / "conversion.json").read_text()) == record
    for fmt, entry in record["formats"].items():
        assert entry["checked"] and entry["size"] == 48, fmt
        assert max(entry["max_abs_diff"].values()) <= 1e-4 * entry["token_scale"], fmt
        assert all((tmp_path / "out" / name).is_file() for name in entry["files"])
    cfg = get_cfg_from_args(convert.get_args_parser().parse_args(["--config-file", str(config)]))
    model = build_model_for_eval(cfg, str(weights)).eval()
    # hub: upstream's flat keys of exactly this model's tensors
    hub = torch.load(tmp_path / "out" / "hub" / "backbone.pth", weights_only=True)
    flat = {key: value for key, value in model.state_dict().items()}
    if variant == "chunked_layerscale":
        assert any(key.startswith("blocks.3.9.") for key in flat) and not any(k.startswith("blocks.9.") for k in flat)
    assert sorted(hub) == sorted(convert.convert_chunked_to_flat(flat))
    # timm: its own model class takes the weights strictly (the check ran it); the names are timm's
    timm_state = load_file(tmp_path / "out" / "timm" / "model.safetensors")
    assert "mask_token" not in timm_state and ("reg_token" in timm_state) == (variant == "registers_no_layerscale")
    if variant == "registers_no_layerscale":  # no position for the class token: folded into it
        torch.testing.assert_close(timm_state["cls_token"], hub["cls_token"] + hub["pos_embed"][:, :1])
        assert timm_state["pos_embed"].shape[1] == hub["pos_embed"].shape[1] - 1
    # HF: query, key and value are the thirds of qkv; one layer scales where the backbone has none
    hf_state = load_file(tmp_path / "out" / "hf" / "model.safetensors")
    query = hf_state["encoder.layer.5.attention.attention.query.weight"]
    torch.testing.assert_close(query, hub["blocks.5.attn.qkv.weight"][:192])
    if variant == "registers_no_layerscale":
        assert torch.equal(hf_state["encoder.layer.0.layer_scale1.lambda1"], torch.ones(192))
    hf_config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == ("dinov2_with_registers" if variant == "registers_no_layerscale" else "dinov2")
    assert hf_config["use_swiglu_ffn"] == (variant == "swiglu") and hf_config["qkv_bias"] == (variant != "swiglu")


def test_released_weights_round_trip_and_load_in_timm_and_hf(tmp_path, weights_dir, reference_vits14):
    """The released ViT-S/14 layout: the hub file is the released file again, tensor for tensor, and timm's
    `local-dir:` and HF's `from_pretrained` give its tokens."""
    config = tmp_path / "vits14.yaml"
    config.write_text("student:\n  arch: vit_small\n  patch_size: 14\n  layerscale: 1.0\n  img_size: 518\n")
    released = weights_dir / "dinov2_vits14_pretrain.pth"
    record = run(config, released, tmp_path / "out")
    assert all(entry["checked"] for entry in record["formats"].values())
    original = torch.load(released, weights_only=True)
    hub = torch.load(tmp_path / "out" / "hub" / "backbone.pth", weights_only=True)
    assert list(hub) == list(original) and all(torch.equal(hub[k], original[k]) for k in original)
    reloaded = dinov2_vits14(pretrained=True, weights=str(tmp_path / "out" / "hub" / "backbone.pth")).eval()
    images = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference_vits14.forward_features(images)["x_norm_clstoken"]
        torch.testing.assert_close(reloaded.forward_features(images)["x_norm_clstoken"], expected)
        timm_model = timm.create_model(f"local-dir:{tmp_path / 'out' / 'timm'}", pretrained=True).eval()
        torch.testing.assert_close(timm_model.forward_features(images)[:, 0], expected, atol=1e-4, rtol=1e-4)
        hf_model = transformers.Dinov2Model.from_pretrained(tmp_path / "out" / "hf").eval()
        torch.testing.assert_close(hf_model(pixel_values=images).pooler_output, expected, atol=1e-4, rtol=1e-4)
    assert build_released_vits14().pos_embed.shape == hub["pos_embed"].shape


def drift(monkeypatch, files_fn: str, key: str) -> None:
    """Make `convert.<files_fn>` write tensor `key` 1 % off, so that the format's check fails."""
    original = getattr(convert, files_fn)

    def drifting(model, spec):
        state, config_json = original(model, spec)
        state[key] = state[key] * 1.01
        return state, config_json

    monkeypatch.setattr(convert, files_fn, drifting)


def test_a_drifting_conversion_is_refused_and_the_earlier_one_kept(tmp_path, monkeypatch):
    config, weights = write_backbone(tmp_path, VARIANTS["chunked_layerscale"])
    run(config, weights, tmp_path / "out", "--formats", "timm")
    before = (tmp_path / "out" / "timm" / "model.safetensors").read_bytes()
    drift(monkeypatch, "timm_files", "blocks.7.norm1.weight")
    with pytest.raises(ValueError, match=r"timm: the converted model's tokens differ from this backbone's by up to"):
        run(config, weights, tmp_path / "out", "--formats", "timm")
    assert (tmp_path / "out" / "timm" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "out")) == ["conversion.json", "timm"]


def tree(root) -> dict:
    """Every folder (None) and file (its bytes) under `root`, by path relative to it."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return found


def test_a_failing_later_format_leaves_every_earlier_one_in_place(tmp_path, monkeypatch):
    """hub and timm of new weights pass their checks, HF's fails: the earlier conversion stays whole, not new hub
    and timm files beside an old conversion.json and HF folder."""
    config, weights = write_backbone(tmp_path, VARIANTS["chunked_layerscale"])
    run(config, weights, tmp_path / "out")
    before = tree(tmp_path / "out")
    teacher = torch.load(weights, weights_only=True)["teacher"]
    teacher["backbone.norm.weight"] = teacher["backbone.norm.weight"] + 0.5
    other_weights = tmp_path / "other_checkpoint.pth"
    torch.save({"teacher": teacher}, other_weights)
    drift(monkeypatch, "hf_files", "layernorm.weight")
    with pytest.raises(ValueError, match=r"hf: the converted model's tokens differ from this backbone's by up to"):
        run(config, other_weights, tmp_path / "out")
    assert tree(tmp_path / "out") == before  # no file changed, no staging folder left


def test_converted_files_are_readable_by_other_users(tmp_path):
    """Folders and files get the permissions the umask allows (mkdtemp makes 0700 folders, safetensors 0600 files),
    so another account can load the conversion."""
    config, weights = write_backbone(tmp_path, VARIANTS["chunked_layerscale"])
    umask = os.umask(0o022)
    try:
        run(config, weights, tmp_path / "out", "--check", "false")
    finally:
        os.umask(umask)
    for fmt in convert.FORMATS:
        folder = tmp_path / "out" / fmt
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, fmt
        for path in folder.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "out" / "conversion.json").stat().st_mode) == 0o644


def test_missing_library_and_inexpressible_backbones_are_named(tmp_path, monkeypatch):
    config, weights = write_backbone(tmp_path, "")
    monkeypatch.setitem(convert.LOADERS, "timm", ("no_such_timm_module", convert.LOADERS["timm"][1]))
    with pytest.raises(ImportError, match=r"--check true: timm needs no_such_timm_module installed"):
        run(config, weights, tmp_path / "a", "--formats", "timm")
    assert sorted(os.listdir(tmp_path / "a")) == []
    record = run(config, weights, tmp_path / "b", "--formats", "timm", "--check", "auto")
    assert record["formats"]["timm"] == {"files": ["timm/model.safetensors", "timm/config.json"], "checked": False,
                                         "reason": "no_such_timm_module not installed"}
    no_bias, no_bias_weights = write_backbone(tmp_path / "c", "  proj_bias: false\n")
    with pytest.raises(ValueError, match="blocks without a attn.proj bias have no timm / HF counterpart"):
        run(no_bias, no_bias_weights, tmp_path / "c" / "out", "--formats", "hub")
