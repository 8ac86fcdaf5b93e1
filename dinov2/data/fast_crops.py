"""Fast multi-crop rendering: sample every crop first, decode the JPEG once at a reduced scale, crop small.

The DINO multi-crop recipe only ever looks at ten small crops (2 x 224 px, 8 x 96 px) of a possibly 12 MP photo.
This module draws all random parameters of a sample from the image size alone (the PIL header), picks the
coarsest JPEG DCT scale (1, 1/2, 1/4, 1/8) at which every crop region still has at least its output resolution,
decodes once at that scale (`Image.draft`), and resizes each crop box straight to its output size (bicubic, with
an optional integer box-reduction first: Pillow's `reducing_gap`). Colour jitter (torchvision's PIL ops; the hue
shift through lookup tables of Pillow's HSV conversions, bit-identical and several times faster), grayscale, blur,
solarize and normalisation then run on the small crops, the last three on uint8 tensors. The random distribution
of every parameter is the one of the torchvision pipeline in `augmentations.py`.
"""

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision.transforms import functional as F

from .datasets.decoders import to_rgb

DRAFT_SCALES = (8, 4, 2, 1)
BLUR_KERNEL_SIZE = 9


@dataclass(frozen=True)
class ColorJitterParams:
    order: Tuple[int, ...]  # permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue), as torchvision
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class CropParams:
    """Every random decision for one output crop; `box` is (left, top, right, bottom) in original pixels."""

    box: Tuple[int, int, int, int]
    size: int
    flip: bool
    jitter: Optional[ColorJitterParams]
    grayscale: bool
    blur_sigma: Optional[float]
    solarize: bool


def _uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def _bernoulli(p: float, generator: Optional[torch.Generator]) -> bool:
    return torch.rand(1, generator=generator).item() < p


def sample_resized_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: Optional[torch.Generator] = None,
) -> Tuple[int, int, int, int]:
    """(top, left, h, w) with the distribution of torchvision's `RandomResizedCrop.get_params`.

    Up to 10 draws of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); the first box that fits is
    placed uniformly; otherwise a central crop with the aspect ratio clamped to `ratio`.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_low, log_high, generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_color_jitter(
    brightness: float, contrast: float, saturation: float, hue: float, generator: Optional[torch.Generator] = None
) -> ColorJitterParams:
    """Factors and order as `torchvision.transforms.ColorJitter.get_params` draws them."""
    order = tuple(int(i) for i in torch.randperm(4, generator=generator))
    return ColorJitterParams(
        order=order,
        brightness=_uniform(max(0.0, 1 - brightness), 1 + brightness, generator),
        contrast=_uniform(max(0.0, 1 - contrast), 1 + contrast, generator),
        saturation=_uniform(max(0.0, 1 - saturation), 1 + saturation, generator),
        hue=_uniform(-hue, hue, generator),
    )


def sample_crop_params(
    width: int,
    height: int,
    *,
    size: int,
    scale: Sequence[float],
    blur_prob: float,
    solarize_prob: float,
    hflip_prob: float = 0.5,
    jitter_prob: float = 0.8,
    jitter_strength: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
    grayscale_prob: float = 0.2,
    blur_sigma_range: Tuple[float, float] = (0.1, 2.0),
    generator: Optional[torch.Generator] = None,
) -> CropParams:
    """Draw all random decisions of one crop of a `width x height` image."""
    top, left, h, w = sample_resized_crop_box(width, height, scale, generator=generator)
    flip = _bernoulli(hflip_prob, generator)
    jitter = sample_color_jitter(*jitter_strength, generator=generator) if _bernoulli(jitter_prob, generator) else None
    grayscale = _bernoulli(grayscale_prob, generator)
    blur_sigma = _uniform(*blur_sigma_range, generator) if _bernoulli(blur_prob, generator) else None
    solarize = _bernoulli(solarize_prob, generator)
    return CropParams(
        box=(left, top, left + w, top + h),
        size=size,
        flip=flip,
        jitter=jitter,
        grayscale=grayscale,
        blur_sigma=blur_sigma,
        solarize=solarize,
    )


def choose_draft_scale(width: int, height: int, crops: Sequence[CropParams]) -> int:
    """Largest DCT reduction (8, 4, 2 or 1) at which every crop box keeps at least `size` pixels per side.

    At reduction s, libjpeg maps s x s source pixels to one pixel, so a box of w x h source pixels covers
    w / s x h / s decoded pixels. Returns 1 when some crop is already smaller than its output at full resolution.
    """
    for s in DRAFT_SCALES:
        if all((c.box[2] - c.box[0]) / s >= c.size and (c.box[3] - c.box[1]) / s >= c.size for c in crops):
            return s
    return 1


def decode_for_crops(image: Image.Image, scale: int) -> Tuple[Image.Image, float]:
    """Decode `image` reduced by `scale` where the format allows it (a JPEG not yet loaded), as RGB.

    Returns the decoded image and the factor mapping original pixel coordinates to it (1 / the reduction that
    was applied; the decoded size is ceil(size / reduction)). Other formats and already-loaded images are
    decoded at full size. Calling this consumes the lazy decoder of `image`.
    """
    width, height = image.size
    coordinate_scale = 1.0
    if scale > 1:
        drafted = image.draft("RGB", (width // scale, height // scale))
        if drafted is not None:  # (mode, box): the original image spans `box` = (0, 0, W / s, H / s) when reduced
            coordinate_scale = drafted[1][2] / width
    return to_rgb(image), coordinate_scale


def _gaussian_kernel1d(sigma: float) -> List[float]:
    """Normalised weights of torchvision's 9-tap Gaussian kernel (taps at -4..4)."""
    half = BLUR_KERNEL_SIZE // 2
    pdf = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-half, half + 1)]
    total = sum(pdf)
    return [p / total for p in pdf]


def gaussian_blur_uint8(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur a (C, H, W) uint8 tensor like `torchvision.transforms.functional.gaussian_blur` (kernel 9, reflect
    padding, rounded back to uint8), computed as two separable passes of shifted adds (several times faster than
    a depthwise convolution on one CPU thread)."""
    weights = _gaussian_kernel1d(sigma)
    pad = BLUR_KERNEL_SIZE // 2
    _, height, width = x.shape
    padded = nnf.pad(x.unsqueeze(0).float(), (pad, pad, pad, pad), mode="reflect")[0]
    rows = padded[:, :, 0:width] * weights[0]
    for i in range(1, BLUR_KERNEL_SIZE):
        rows.add_(padded[:, :, i : i + width], alpha=weights[i])
    out = rows[:, 0:height] * weights[0]
    for i in range(1, BLUR_KERNEL_SIZE):
        out.add_(rows[:, i : i + height], alpha=weights[i])
    return out.round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=1)
def hsv_tables() -> Tuple[np.ndarray, np.ndarray]:
    """Pillow's RGB -> HSV and HSV -> RGB conversions tabulated over all 2^24 colours (two 64 MiB uint32 arrays).

    Index and entry are a colour packed as first | second << 8 | third << 16 (the little-endian RGBX bytes of a
    pixel). Built once per process (1-2 s, ~0.3 GiB peak) by running Pillow's own converter on an image holding every
    colour, so a lookup gives bit-identical results; DataLoader workers forked after the build share the pages.
    """
    size = (4096, 4096)
    grid = Image.frombytes("RGB", size, np.arange(1 << 24, dtype="<u4").tobytes(), "raw", "RGBX")
    rgb_to_hsv = np.zeros(1 << 24, dtype="<u4")
    hsv_bytes = np.frombuffer(grid.convert("HSV").tobytes(), dtype=np.uint8)
    rgb_to_hsv.view(np.uint8).reshape(-1, 4)[:, :3] = hsv_bytes.reshape(-1, 3)
    grid = Image.frombytes("HSV", size, grid.tobytes())  # the same bytes read as (H, S, V)
    # a numpy-owned copy: numpy backs large arrays with transparent huge pages (about 30% faster random lookups)
    hsv_to_rgb = np.frombuffer(grid.convert("RGB").tobytes("raw", "RGBX"), dtype="<u4").copy()
    return rgb_to_hsv, hsv_to_rgb


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """`torchvision.transforms.functional.adjust_hue` of an RGB PIL image, bit for bit, via `hsv_tables`.

    torchvision converts to Pillow's 8-bit HSV, adds int(hue_factor * 255) to H modulo 256 and converts back;
    the two conversions are table lookups here (about 5x faster than Pillow's per-pixel float conversions).
    """
    if image.mode != "RGB":
        raise ValueError(f"adjust_hue expects an RGB image, got mode {image.mode}")
    rgb_to_hsv, hsv_to_rgb = hsv_tables()
    hsv = rgb_to_hsv.take(np.frombuffer(image.tobytes("raw", "RGBX"), dtype="<u4") & 0xFFFFFF)
    hsv.view(np.uint8)[0::4] += np.uint8(int(hue_factor * 255) % 256)  # wraps around like torchvision's uint8 add
    return Image.frombytes("RGB", image.size, hsv_to_rgb.take(hsv).tobytes(), "raw", "RGBX")


_JITTER_OPS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, adjust_hue)


def _apply_jitter(crop: Image.Image, jitter: ColorJitterParams) -> Image.Image:
    factors = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
    for i in jitter.order:
        crop = _JITTER_OPS[i](crop, factors[i])
    return crop


@functools.lru_cache(maxsize=8)
def _normalization(mean: Tuple[float, ...], std: Tuple[float, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(255 * mean, 1 / (255 * std)) as (3, 1, 1) tensors: ToTensor + Normalize applied to uint8 in one step."""
    return torch.tensor(mean).view(3, 1, 1) * 255.0, 1.0 / (torch.tensor(std).view(3, 1, 1) * 255.0)


def render_crop(
    image: Image.Image,
    params: CropParams,
    coordinate_scale: float,
    mean: Sequence[float],
    std: Sequence[float],
    reducing_gap: Optional[float] = None,
) -> torch.Tensor:
    """Normalised float (3, size, size) crop of a decoded RGB `image` (box coordinates times coordinate_scale).

    `reducing_gap` is Pillow's resize option: box-reduce by an integer factor first while the remaining
    downscale stays >= reducing_gap (faster for crops much larger than their output, marginally softer).
    """
    box = tuple(v * coordinate_scale for v in params.box)
    crop = image.resize((params.size, params.size), Image.Resampling.BICUBIC, box=box, reducing_gap=reducing_gap)
    if params.flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if params.jitter is not None:
        crop = _apply_jitter(crop, params.jitter)
    if params.grayscale:
        crop = crop.convert("L")
    x = torch.from_numpy(np.array(crop))
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    if params.blur_sigma is not None:
        x = gaussian_blur_uint8(x, params.blur_sigma)
    if params.solarize:
        x = torch.where(x >= 128, 255 - x, x)
    offset, inv_scale = _normalization(tuple(mean), tuple(std))
    return (x.float() - offset).mul_(inv_scale)


def render_crops(
    image: Image.Image,
    crops: List[CropParams],
    mean: Sequence[float],
    std: Sequence[float],
    reducing_gap: Optional[float] = None,
) -> List[torch.Tensor]:
    """Decode `image` once at the coarsest scale the crops allow, then render every crop."""
    decoded, coordinate_scale = decode_for_crops(image, choose_draft_scale(*image.size, crops))
    return [render_crop(decoded, c, coordinate_scale, mean, std, reducing_gap) for c in crops]
