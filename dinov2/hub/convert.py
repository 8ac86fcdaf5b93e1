"""Convert a backbone (a training run's teacher, or any weights `build_model_for_eval` loads) into the layouts other
tools load: upstream's hub file, timm and HF transformers, each checked against this model before it is kept.

    python -m dinov2.hub.convert --config-file runs/a/config.yaml \\
        --pretrained-weights runs/a/eval/training_999/teacher_checkpoint.pth --output-dir runs/a/convert \\
        [--formats hub timm hf] [--check auto|true|false] [--tolerance 1e-4]

Outputs in --output-dir:
    hub/backbone.pth            upstream's key layout (flat `blocks.<i>`, no heads): `torch.hub.load(<dinov2 repo>,
                                "dinov2_vits14", weights=...)`, or this repo's `dinov2.hub.backbones`
    timm/model.safetensors      timm's `VisionTransformer` names (`reg_token`, class position folded into `cls_token`
    timm/config.json            for register models, `mlp.fc1/fc2` for SwiGLU): `timm.create_model("local-dir:...")`
    hf/model.safetensors        HF transformers' `Dinov2Model` / `Dinov2WithRegistersModel` hub names (`qkv` split
    hf/config.json              into query, key and value): `Dinov2Model.from_pretrained(...)`
    conversion.json             the source, each format's files and the check's largest differences

Every format is written to a staging directory and checked where its library is installed (`--check auto`): the
converted model runs on seeded random images at the backbone's native size and its class and patch tokens must equal
this backbone's within `--tolerance` (relative to their largest magnitude), else the command fails naming the format
and leaves --output-dir as it was. Only when every format passes are they all moved into place, readable as the
umask allows, and conversion.json written. At other sizes the position embeddings are interpolated by each library its
own way (upstream: scale factor with an offset of 0.1, or size-based with antialiasing for register models; timm and
HF: size-based bicubic), so tokens there differ somewhat between them.
"""

import argparse
import json
import logging
import os
import shutil
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from dinov2.eval.setup import build_model_for_eval
from dinov2.eval.setup import get_args_parser as get_setup_args_parser
from dinov2.layers.layer_scale import LayerScale
from dinov2.logging import setup_logging
from dinov2.utils.config import get_cfg_from_args
from dinov2.utils.utils import atomic_write, convert_chunked_to_flat, current_umask

logger = logging.getLogger("dinov2")

FORMATS = ("hub", "timm", "hf")
CHECK_BATCH = 2  # seeded random images the check runs


def get_args_parser(
    description: Optional[str] = None,
    parents: Optional[List[argparse.ArgumentParser]] = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    parser = get_setup_args_parser(description, parents, add_help)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="Layouts to write")
    parser.add_argument("--check", choices=("auto", "true", "false"), default="auto",
                        help="Run each converted model against this one: auto = where its library is installed; "
                             "true = fail where it is not")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="Largest token difference allowed by the check, relative to the largest token magnitude")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the check's random images")
    return parser


def backbone_spec(model: nn.Module) -> Dict[str, object]:
    """The architecture of a `DinoVisionTransformer` read from its modules: what the other layouts' configs need."""
    block = model.flat_blocks()[0]
    ffn = "swiglu" if hasattr(block.mlp, "w12") else "mlp"
    hidden = (block.mlp.w3.in_features if ffn == "swiglu" else block.mlp.fc1.out_features)
    grid = model.patch_embed.patches_resolution if hasattr(model.patch_embed, "patches_resolution") else None
    n_patches = model.pos_embed.shape[1] - 1
    side = int(round(n_patches**0.5))
    if side * side != n_patches or (grid is not None and tuple(grid) != (side, side)):
        raise ValueError(f"the position embedding holds {n_patches} patches: not a square grid")
    for name, layer in (("attn.proj", block.attn.proj), ("mlp", block.mlp.w3 if ffn == "swiglu" else block.mlp.fc2)):
        if layer.bias is None:
            raise ValueError(f"blocks without a {name} bias have no timm / HF counterpart")
    return {
        "embed_dim": int(model.embed_dim),
        "depth": len(model.flat_blocks()),
        "num_heads": int(block.attn.num_heads),
        "patch_size": int(model.patch_size),
        "img_size": side * int(model.patch_size),
        "num_register_tokens": int(model.num_register_tokens),
        "ffn": ffn,
        "ffn_hidden": int(hidden),
        "qkv_bias": block.attn.qkv.bias is not None,
        "layerscale": isinstance(block.ls1, LayerScale),
        "interpolate_offset": float(model.interpolate_offset),
        "interpolate_antialias": bool(model.interpolate_antialias),
    }


def hub_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Upstream's released key layout: flat block keys, every backbone tensor (mask token included), no heads."""
    return {key: value.detach().clone() for key, value in convert_chunked_to_flat(model.state_dict()).items()}


def _ratio(hidden: int, dim: int) -> float:
    """An MLP ratio r with int(dim * r) == hidden (hidden / dim itself when float rounding allows)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def timm_files(model: nn.Module, spec: Dict[str, object]) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """State dict and config.json of timm's `VisionTransformer` (the `vit_*_dinov2` entry points, arguments
    overridden to this architecture)."""
    state = hub_state_dict(model)
    state.pop("mask_token")
    if spec["num_register_tokens"]:  # timm: no position for class or register tokens; fold the class one in
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    state = {key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): value
             for key, value in state.items()}
    swiglu = spec["ffn"] == "swiglu"
    model_args = {
        "img_size": spec["img_size"], "patch_size": spec["patch_size"], "embed_dim": spec["embed_dim"],
        "depth": spec["depth"], "num_heads": spec["num_heads"], "qkv_bias": spec["qkv_bias"],
        "init_values": 1.0 if spec["layerscale"] else 0.0,  # 0: no LayerScale (timm drops a None argument)
        "mlp_ratio": _ratio(2 * spec["ffn_hidden"] if swiglu else spec["ffn_hidden"], spec["embed_dim"]),
        "reg_tokens": spec["num_register_tokens"], "no_embed_class": bool(spec["num_register_tokens"]),
    }
    config = {
        "architecture": "vit_giant_patch14_dinov2" if swiglu else "vit_small_patch14_dinov2",  # SwiGLU or GELU MLP
        "num_classes": 0,
        "model_args": model_args,
        "pretrained_cfg": {"input_size": [3, spec["img_size"], spec["img_size"]], "crop_pct": 1.0,
                           "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                           "num_classes": 0},
    }
    return state, config


def swiglu_mlp_ratio(spec: Dict[str, object]) -> int:
    """The MLP ratio a fused SwiGLU block is sized from (2/3 of ratio x dim, rounded up to a multiple of 8, here and
    in HF): 4, as in every DinoVisionTransformer; raises for another hidden size."""
    derived = (int(spec["embed_dim"] * 4 * 2 / 3) + 7) // 8 * 8
    if derived != spec["ffn_hidden"]:
        raise ValueError(f"a SwiGLU block sized from mlp_ratio 4 has {derived} hidden units, this backbone's has "
                         f"{spec['ffn_hidden']}")
    return 4


def hf_files(model: nn.Module, spec: Dict[str, object]) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """State dict (the hub checkpoints' names, which every transformers release since registers loads) and
    config.json of `Dinov2Model`, or `Dinov2WithRegistersModel` with register tokens."""
    dim = spec["embed_dim"]
    mlp_ratio = spec["ffn_hidden"] // dim
    if spec["ffn"] == "swiglu":
        mlp_ratio = swiglu_mlp_ratio(spec)
    elif mlp_ratio * dim != spec["ffn_hidden"]:
        raise ValueError(f"HF's Dinov2Config takes a whole mlp_ratio; this backbone's MLP has {spec['ffn_hidden']} "
                         f"hidden units for {dim} dimensions")
    renames = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
               "register_tokens": "embeddings.register_tokens", "pos_embed": "embeddings.position_embeddings",
               "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
               "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
               "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    parts = {"norm1": "norm1", "attn.proj": "attention.output.dense", "ls1": "layer_scale1", "norm2": "norm2",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out",
             "ls2": "layer_scale2"}
    params = {"gamma": "lambda1"}  # LayerScale's parameter; weights and biases keep their names
    state = {}
    for key, value in hub_state_dict(model).items():
        if key in renames:
            state[renames[key]] = value
            continue
        _, index, rest = key.split(".", 2)
        prefix = f"encoder.layer.{index}."
        if rest.startswith("attn.qkv."):
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                state[prefix + f"attention.attention.{name}.{rest.rsplit('.', 1)[1]}"] = part.clone()
            continue
        module, param = rest.rsplit(".", 1)
        state[prefix + f"{parts[module]}.{params.get(param, param)}"] = value
    if not spec["layerscale"]:  # HF's blocks always scale: by one
        for index in range(spec["depth"]):
            for name in ("layer_scale1", "layer_scale2"):
                state[f"encoder.layer.{index}.{name}.lambda1"] = torch.ones(dim)
    registers = spec["num_register_tokens"]
    config = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": dim, "num_hidden_layers": spec["depth"], "num_attention_heads": spec["num_heads"],
        "mlp_ratio": mlp_ratio, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": spec["img_size"],
        "patch_size": spec["patch_size"], "num_channels": 3, "qkv_bias": spec["qkv_bias"], "layerscale_value": 1.0,
        "use_swiglu_ffn": spec["ffn"] == "swiglu",
        **({"num_register_tokens": registers} if registers else {}),
    }
    return state, config


def _save_safetensors(path: str, state: Dict[str, torch.Tensor]) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("the timm and HF layouts are written with safetensors: pip install -e '.[convert]' "
                          "(or --formats hub)") from None

    save_file({key: value.contiguous() for key, value in state.items()}, path, metadata={"format": "pt"})


def write_format(fmt: str, model: nn.Module, spec: Dict[str, object], folder: str) -> List[str]:
    """Write one format's files into `folder`; returns their names."""
    if fmt == "hub":
        atomic_write(os.path.join(folder, "backbone.pth"), lambda f: torch.save(hub_state_dict(model), f))
        return ["backbone.pth"]
    state, config = (timm_files if fmt == "timm" else hf_files)(model, spec)
    _save_safetensors(os.path.join(folder, "model.safetensors"), state)
    atomic_write(os.path.join(folder, "config.json"), lambda f: f.write(json.dumps(config, indent=2) + "\n"),
                 binary=False)
    return ["model.safetensors", "config.json"]


def _load_hub(folder: str, spec: Dict[str, object]) -> Callable[[torch.Tensor], torch.Tensor]:
    from dinov2.models.vision_transformer import DinoVisionTransformer

    model = DinoVisionTransformer(
        img_size=spec["img_size"], patch_size=spec["patch_size"], embed_dim=spec["embed_dim"], depth=spec["depth"],
        num_heads=spec["num_heads"],
        mlp_ratio=swiglu_mlp_ratio(spec) if spec["ffn"] == "swiglu" else _ratio(spec["ffn_hidden"], spec["embed_dim"]),
        qkv_bias=spec["qkv_bias"], init_values=1.0 if spec["layerscale"] else None,
        ffn_layer="swiglufused" if spec["ffn"] == "swiglu" else "mlp", block_chunks=0,
        num_register_tokens=spec["num_register_tokens"], interpolate_offset=spec["interpolate_offset"],
        interpolate_antialias=spec["interpolate_antialias"])
    model.load_state_dict(torch.load(os.path.join(folder, "backbone.pth"), weights_only=True), strict=True)
    model.eval()

    def tokens(images: torch.Tensor) -> torch.Tensor:
        out = model.forward_features(images)
        return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], dim=1)

    return tokens


def _load_timm(folder: str, spec: Dict[str, object]) -> Callable[[torch.Tensor], torch.Tensor]:
    import timm
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **config["model_args"])
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)
    model.eval()
    prefix = model.num_prefix_tokens

    def tokens(images: torch.Tensor) -> torch.Tensor:
        out = model.forward_features(images)
        return torch.cat([out[:, :1], out[:, prefix:]], dim=1)

    return tokens


def _load_hf(folder: str, spec: Dict[str, object]) -> Callable[[torch.Tensor], torch.Tensor]:
    import transformers

    name = "Dinov2WithRegistersModel" if spec["num_register_tokens"] else "Dinov2Model"
    model, info = getattr(transformers, name).from_pretrained(folder, output_loading_info=True)
    problems = {key: sorted(value) for key, value in info.items() if value}
    if problems:
        raise ValueError(f"transformers {transformers.__version__} loads {folder} with {problems}")
    model.eval()
    prefix = 1 + spec["num_register_tokens"]

    def tokens(images: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=images).last_hidden_state
        return torch.cat([out[:, :1], out[:, prefix:]], dim=1)

    return tokens


LOADERS = {"hub": (None, _load_hub), "timm": ("timm", _load_timm), "hf": ("transformers", _load_hf)}


def check_format(fmt: str, folder: str, model: nn.Module, spec: Dict[str, object], check: str, tolerance: float,
                 seed: int) -> Dict[str, object]:
    """Run the converted model on seeded random images at the native size against `model`: class token + patch
    tokens. Returns the record of the check; raises when they differ beyond `tolerance`."""
    library, load = LOADERS[fmt]
    if library is not None:
        try:
            version = __import__(library).__version__
        except ImportError:
            if check == "true":
                raise ImportError(f"--check true: {fmt} needs {library} installed (pip install -e '.[convert]')")
            logger.warning(f"{fmt}: not checked, {library} is not installed (pip install -e '.[convert]')")
            return {"checked": False, "reason": f"{library} not installed"}
    else:
        version = torch.__version__
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(CHECK_BATCH, 3, spec["img_size"], spec["img_size"], generator=generator)
    with torch.inference_mode():
        out = model.forward_features(images)
        expected = torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], dim=1).float()
        got = load(folder, spec)(images).float()
    if got.shape != expected.shape:
        raise ValueError(f"{fmt}: the converted model gives tokens of shape {tuple(got.shape)}, this backbone "
                         f"{tuple(expected.shape)}")
    scale = float(expected.abs().max())
    diff = {"cls": float((got[:, 0] - expected[:, 0]).abs().max()),
            "patch": float((got[:, 1:] - expected[:, 1:]).abs().max())}
    if max(diff.values()) > tolerance * scale:
        raise ValueError(f"{fmt}: the converted model's tokens differ from this backbone's by up to "
                         f"{max(diff.values()):.3g} (class token {diff['cls']:.3g}, patches {diff['patch']:.3g}; "
                         f"largest token magnitude {scale:.3g}, --tolerance {tolerance}): nothing written")
    return {"checked": True, "library_version": version, "images": CHECK_BATCH, "size": spec["img_size"],
            "max_abs_diff": diff, "token_scale": scale}


def _share_folder(folder: str) -> None:
    """Give `folder` and its files the permissions the umask allows (mkdtemp makes 0700 folders, safetensors 0600
    files), so that another account (a scoring service) can load the conversion."""
    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def run_convert(args: argparse.Namespace) -> Dict[str, object]:
    """Write and check every requested format in staging; only when all pass, move them into place and write
    conversion.json, so that a failing format leaves an earlier conversion whole rather than half replaced."""
    config = get_cfg_from_args(args)
    model = build_model_for_eval(config, args.pretrained_weights).float().cpu().eval()
    spec = backbone_spec(model)
    os.makedirs(args.output_dir, exist_ok=True)
    record = {"pretrained_weights": args.pretrained_weights, "config_file": args.config_file, "backbone": spec,
              "formats": {}}
    staged = {}
    try:
        for fmt in dict.fromkeys(args.formats):
            staged[fmt] = tempfile.mkdtemp(prefix=f".{fmt}.", dir=args.output_dir)
            files = write_format(fmt, model, spec, staged[fmt])
            checked = (check_format(fmt, staged[fmt], model, spec, args.check, args.tolerance, args.seed)
                       if args.check != "false" else {"checked": False, "reason": "--check false"})
            _share_folder(staged[fmt])
            record["formats"][fmt] = {"files": [os.path.join(fmt, name) for name in files], **checked}
            logger.info(f"{fmt}: staged {', '.join(files)}"
                        + (f"; tokens within {max(checked['max_abs_diff'].values()):.2g} of this backbone's"
                           if checked["checked"] else f"; not checked ({checked['reason']})"))
        for fmt, staging in staged.items():
            target = os.path.join(args.output_dir, fmt)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(staging, target)
        atomic_write(os.path.join(args.output_dir, "conversion.json"),
                     lambda f: f.write(json.dumps(record, indent=2) + "\n"), binary=False)
    finally:
        for staging in staged.values():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"wrote {', '.join(staged)} and conversion.json in {args.output_dir}")
    return record


def main(args: argparse.Namespace) -> int:
    if not args.output_dir:
        raise ValueError("--output-dir is required")
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logging(output=args.output_dir, level=logging.INFO)
    run_convert(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser(description="Convert a DINOv2 backbone to hub, timm and HF layouts")
                          .parse_args()))
