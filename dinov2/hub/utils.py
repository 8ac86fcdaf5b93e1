"""Hub helpers: official model names and URLs, local resolution of weight files, centre padding."""

import logging
import math
import os
import urllib.error

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("dinov2")

_DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
# Directory searched first for `<model>_pretrain.pth` / `<model>_linear*_head.pth` (for offline machines).
WEIGHTS_DIR_ENV = "DINOV2_WEIGHTS_DIR"


class WeightsNotFoundError(RuntimeError):
    """Official weights are neither available locally nor downloadable (e.g. offline machine)."""


def _make_dinov2_model_name(arch_name: str, patch_size: int, num_register_tokens: int = 0) -> str:
    """Official model name, e.g. `vit_small, 14` -> `dinov2_vits14`, `vit_giant2, 14, 4` -> `dinov2_vitg14_reg4`."""
    compact_arch_name = arch_name.replace("_", "")[:4]
    registers_suffix = f"_reg{num_register_tokens}" if num_register_tokens else ""
    return f"dinov2_{compact_arch_name}{patch_size}{registers_suffix}"


def _make_weights_url(arch_name: str, patch_size: int, file_name: str) -> str:
    """Official URL of `file_name`, stored under the folder of the register-free model name."""
    return f"{_DINOV2_BASE_URL}/{_make_dinov2_model_name(arch_name, patch_size)}/{file_name}"


def get_weights_file(file_name: str, url: str) -> str:
    """Local path of official weights `file_name`: `$DINOV2_WEIGHTS_DIR/<file_name>` if present, else the torch
    hub cache (`<torch.hub.get_dir()>/checkpoints/<file_name>`) if present, else downloaded from `url` into that
    cache. Raises `WeightsNotFoundError` saying what to download and where to put it when the download fails."""
    weights_dir = os.environ.get(WEIGHTS_DIR_ENV, "")
    if weights_dir:
        candidate = os.path.join(weights_dir, file_name)
        if os.path.isfile(candidate):
            return candidate
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    if os.path.isfile(cached):
        return cached
    logger.info(f"Downloading {url} to {cached}")
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(url, cached)  # writes a temporary file, then moves it into place
    except (urllib.error.URLError, OSError) as e:
        where = f"{WEIGHTS_DIR_ENV}={weights_dir}" if weights_dir else f"{WEIGHTS_DIR_ENV} is not set"
        raise WeightsNotFoundError(
            f"Pretrained weights {file_name} not found locally and the download from {url} failed ({e}).\n"
            f"Download {url} on a machine with internet access and put it at "
            f"$DINOV2_WEIGHTS_DIR/{file_name} (currently {where}), or at {cached}, "
            f"or pass weights='/path/to/{file_name}'."
        ) from e
    return cached


class CenterPadding(nn.Module):
    """Zero-pads the trailing spatial dims of a tensor up to multiples of `multiple` (e.g. the patch size), split
    evenly between both sides (the extra pixel, if any, on the right/bottom)."""

    def __init__(self, multiple: int) -> None:
        super().__init__()
        self.multiple = multiple

    def _get_pad(self, size: int) -> tuple:
        pad = math.ceil(size / self.multiple) * self.multiple - size
        return pad // 2, pad - pad // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in reversed(x.shape[2:]):  # F.pad lists the last dim first
            pads.extend(self._get_pad(size))
        return F.pad(x, pads)
