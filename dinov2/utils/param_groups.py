"""Optimizer parameter groups: layer-wise lr decay, patch-embed lr multiplier, no weight decay for biases, norms
and LayerScale gammas, and a flag for the DINO head's last layer (frozen during the first epochs)."""

import logging
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Sequence

from torch import nn

from dinov2.utils.utils import clean_wrapped_name

logger = logging.getLogger("dinov2")

# Backbone parameters that sit before the first block (layer 0 of the lr decay).
_EMBEDDING_PARAMS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
def get_vit_lr_decay_rate(
    name: str,
    lr_decay_rate: float = 1.0,
    num_layers: int = 12,
    force_is_backbone: bool = False,
    chunked_blocks: bool = False,
) -> float:
    """Layer-wise lr multiplier `lr_decay_rate ** (num_layers + 1 - layer_id)` of parameter `name`.

    Backbone parameters are those whose name starts with `backbone` (or all, with `force_is_backbone`):
    embeddings (pos/patch embed, mask/cls/register tokens) have layer_id 0, block i has layer_id i + 1
    (`blocks.<i>.*`, or `blocks.<chunk>.<i>.*` with `chunked_blocks`); everything else, heads included,
    has layer_id num_layers + 1, i.e. multiplier 1.
    """
    name = clean_wrapped_name(name)
    layer_id = num_layers + 1
    is_backbone = force_is_backbone or name.startswith("backbone.")
    if is_backbone:
        fields = name.removeprefix("backbone.").split(".")
        if fields[0] in _EMBEDDING_PARAMS:
            layer_id = 0
        elif fields[0] == "blocks" and len(fields) > 2:
            index = fields[2] if chunked_blocks else fields[1]
            if not index.isdigit() or (not chunked_blocks and fields[2].isdigit()):
                raise ValueError(
                    f"Parameter {name!r} does not have the {'chunked' if chunked_blocks else 'flat'} block layout "
                    f"(chunked_blocks={chunked_blocks})"
                )
            layer_id = int(index) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def _backbone_layout(model: nn.Module) -> tuple:
    """(number of blocks, chunked?) of `model` or of its `backbone` submodule; (0, False) for heads."""
    backbone = model if hasattr(model, "n_blocks") else getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "n_blocks"):
        return backbone.n_blocks, bool(getattr(backbone, "chunked_blocks", False))
    if hasattr(model, "blocks"):
        return len(model.blocks), False
    return 0, False


def get_params_groups_with_decay(
    model: nn.Module, lr_decay_rate: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> List[Dict[str, Any]]:
    """One group per trainable parameter: `{"params", "name", "lr_multiplier", "wd_multiplier", "is_last_layer"}`.

    `model` is a backbone (layer-wise decay over its blocks), a `ModuleDict` holding a `backbone`, or a head
    (multiplier 1). Patch-embed parameters get an extra `patch_embed_lr_mult`; biases, norms and LayerScale gammas
    get no weight decay; names containing `last_layer` are flagged `is_last_layer`. The rules read names only, as
    upstream's do: under sharded FSDP (`use_orig_params=True`) every parameter is a 1-D view of its shard, so a rule
    on `ndim` would take weight decay away from every weight of a multi-GPU run.
    """
    num_layers, chunked_blocks = _backbone_layout(model)
    force_is_backbone = num_layers > 0
    groups = []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = clean_wrapped_name(raw_name)
        lr_multiplier = get_vit_lr_decay_rate(name, lr_decay_rate, num_layers, force_is_backbone, chunked_blocks)
        if "patch_embed" in name:
            lr_multiplier *= patch_embed_lr_mult
        no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
        groups.append(
            {
                "params": param,
                "name": name,
                "lr_multiplier": lr_multiplier,
                "wd_multiplier": 0.0 if no_decay else 1.0,
                "is_last_layer": "last_layer" in name,
            }
        )
        logger.debug(f"{name}: lr_multiplier {lr_multiplier}, wd_multiplier {groups[-1]['wd_multiplier']}")
    return groups


def fuse_params_groups(
    all_params_groups: Iterable[Dict[str, Any]],
    keys: Sequence[str] = ("lr_multiplier", "wd_multiplier", "is_last_layer"),
) -> List[Dict[str, Any]]:
    """Merge per-parameter groups with equal values of `keys` into `{"params": [...], **values}` groups, in order of
    first appearance (fewer optimizer groups, same schedule)."""
    fused: Dict[tuple, Dict[str, Any]] = defaultdict(lambda: {"params": []})
    for group in all_params_groups:
        identifier = tuple(group[key] for key in keys)
        fused[identifier]["params"].append(group["params"])
        fused[identifier].update({key: group[key] for key in keys})
    return list(fused.values())
