"""Backbone construction from the `student` section of the config (upstream `build_model`)."""

from typing import Any, Tuple, Union

from . import vision_transformer as vits

Backbone = vits.DinoVisionTransformer
Backbones = Union[Tuple[Backbone, Backbone, int], Tuple[Backbone, int]]  # see build_model

ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2")


def build_model(args: Any, only_teacher: bool = False, img_size: int = 224) -> Backbones:
    """Student and teacher backbones from `args` (the config's `student` node): `(student, teacher, embed_dim)`,
    or `(teacher, embed_dim)` with `only_teacher`. Only the student gets stochastic depth. A `_memeff` suffix of
    `args.arch` (upstream's name for the xFormers variant) is ignored: the kernel is chosen at run time."""
    arch = str(args.arch).removesuffix("_memeff")
    if arch not in ARCHS:
        raise ValueError(f"Unknown student.arch {args.arch!r}; expected one of {ARCHS} (optionally with '_memeff')")
    factory = getattr(vits, arch)
    vit_kwargs = dict(
        img_size=img_size,
        patch_size=args.patch_size,
        init_values=args.layerscale,
        ffn_layer=args.ffn_layer,
        block_chunks=args.block_chunks,
        qkv_bias=args.qkv_bias,
        proj_bias=args.proj_bias,
        ffn_bias=args.ffn_bias,
        num_register_tokens=args.num_register_tokens,
        interpolate_offset=args.interpolate_offset,
        interpolate_antialias=args.interpolate_antialias,
    )
    teacher = factory(**vit_kwargs)
    if only_teacher:
        return teacher, teacher.embed_dim
    student = factory(**vit_kwargs, drop_path_rate=args.drop_path_rate, drop_path_uniform=args.drop_path_uniform)
    return student, teacher, student.embed_dim


def build_model_from_cfg(cfg: Any, only_teacher: bool = False) -> Backbones:
    """`build_model(cfg.student, ...)` with pos_embed built for `cfg.student.img_size`, by default
    `cfg.crops.global_crops_size`."""
    img_size = getattr(cfg.student, "img_size", None) or cfg.crops.global_crops_size
    return build_model(cfg.student, only_teacher=only_teacher, img_size=img_size)
