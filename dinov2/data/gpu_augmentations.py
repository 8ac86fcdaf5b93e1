"""Multi-crop augmentation on the training device (`crops.gpu_augmentation`).

Decoding multi-megapixel photos and rendering ten crops each is more than the CPU cores of a GPU machine can do at
the rate a small ViT trains. With this path the work is split in three:

1. `EncodedCropsTransform` (DataLoader workers): reads the image header, draws every random decision of the sample
   with `DataAugmentationDINO.sample_params` (the distribution of the other paths, seeded per batch as usual) and
   forwards the JPEG bytes undecoded. Other formats, and JPEGs that are not plain RGB/grayscale or do not end with
   the end-of-image marker (truncated files, trailing data), are decoded in the worker instead (PIL, so a broken
   file fails there, naming it) and travel as uint8 pixels.
2. `collate_encoded_crops`: packs the bytes and the crop parameters of a batch into tensors (crop-major order, as
   `collate_data_and_cast`) and draws the iBOT masks exactly as that function does.
3. `GPUMultiCropAugmentation` (training process, model device): decodes the JPEGs in batches of
   `crops.gpu_decode_batch_size` images (`torchvision.io.decode_jpeg` on the device: nvJPEG on CUDA; a JPEG that
   nvJPEG rejects is decoded on the CPU instead, with a warning, and one that fails there too names its file), crops and
   resizes every box (bicubic, antialiased), then flips, colour-jitters (each crop's own factors and order, each
   operation on just the crops that take it), grayscales, blurs (9 taps, reflect padding), solarizes and normalises
   all crops of a size at once with per-crop parameter tensors. Pixels are floats in [0, 1] throughout (no uint8
   rounding between steps). Decoded memory peaks at one chunk of uint8 images (default 16; 16 x 4000x3000 RGB =
   0.58 GB) plus one float32 crop region; the float32 crops of a size are held twice while they are stacked.

On CUDA the rendering runs on a stream of its own (`crops.gpu_side_stream`, default on): the training loop queues an
iteration's kernels without waiting for them, so the next batch is decoded and rendered while the GPU still works
through the previous iteration; the training stream waits for the crops only where it uses them.

As in the PIL paths, EXIF orientation is not applied (the stored pixel grid is cropped; `decode_jpeg`'s default).
"""

import io
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .augmentations import DataAugmentationDINO
from .collate import MASK_KEYS, collate_masks
from .datasets.decoders import EncodedImage, to_rgb
from .datasets.extended import ImageDecodeError
from .fast_crops import BLUR_KERNEL_SIZE, CropParams
from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

logger = logging.getLogger("dinov2")

JPEG_END_OF_IMAGE = b"\xff\xd9"
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255


class EncodedCropsTransform:
    """Worker side: `{"encoded": uint8 bytes tensor or None, "pixels": uint8 (3, H, W) or None, "crops": [CropParams],
    "path": str}` for one image (see the module docstring)."""

    accepts_encoded_image = True

    def __init__(self, augmentation: DataAugmentationDINO) -> None:
        self.augmentation = augmentation
        self.num_decoded_here = 0  # images decoded in this process instead of on the device (per worker)

    def __call__(self, image: EncodedImage) -> Dict[str, Any]:
        header = Image.open(io.BytesIO(image.data))
        crops = self.augmentation.sample_params(*header.size)
        encoded, pixels = None, None
        # zero padding after the end-of-image marker is common and harmless; anything else goes the safe way
        complete = image.data.rstrip(b"\x00").endswith(JPEG_END_OF_IMAGE)
        if header.format == "JPEG" and header.mode in ("RGB", "L") and complete:
            encoded = torch.frombuffer(bytearray(image.data), dtype=torch.uint8)
        else:
            if self.num_decoded_here == 0:
                logger.info(
                    "gpu_augmentation: %s (%s, mode %s%s) is decoded on the CPU; further such images of this "
                    "worker are not logged", image.path, header.format, header.mode,
                    "" if complete else ", no JPEG end-of-image marker",
                )  # fmt: skip
            self.num_decoded_here += 1
            pixels = torch.from_numpy(np.array(to_rgb(header))).permute(2, 0, 1).contiguous()
        return {"encoded": encoded, "pixels": pixels, "crops": crops, "path": image.path}


def _crop_tensors(crops: Sequence[CropParams]) -> Dict[str, torch.Tensor]:
    """Per-crop parameters as tensors (no jitter: factors 1 / hue 0, identity order; no blur: sigma 0)."""
    no_jitter = ((0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0))
    jitters = [
        (c.jitter.order, (c.jitter.brightness, c.jitter.contrast, c.jitter.saturation, c.jitter.hue))
        if c.jitter is not None
        else no_jitter
        for c in crops
    ]
    return {
        "boxes": torch.tensor([c.box for c in crops], dtype=torch.long),
        "flip": torch.tensor([c.flip for c in crops]),
        "jitter": torch.tensor([c.jitter is not None for c in crops]),
        "jitter_order": torch.tensor([order for order, _ in jitters], dtype=torch.long),
        "jitter_factors": torch.tensor([factors for _, factors in jitters], dtype=torch.float32),
        "grayscale": torch.tensor([c.grayscale for c in crops]),
        "blur_sigma": torch.tensor([c.blur_sigma or 0.0 for c in crops], dtype=torch.float32),
        "solarize": torch.tensor([c.solarize for c in crops]),
    }


def collate_encoded_crops(
    samples_list: List[Tuple[Dict[str, Any], Any]],
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    n_tokens: Optional[int] = None,
    mask_generator: Optional[Callable[[int], Any]] = None,
) -> Dict[str, Any]:
    """A batch of `EncodedCropsTransform` outputs: the images (`encoded_images`, `decoded_images`: one entry per
    sample, the other None), `image_paths`, and for the global and the local crops (crop-major: crop 0 of every
    sample, then crop 1, ...) `<kind>_crop_image` (sample index per crop), `<kind>_crop_size` and the `_crop_tensors`
    fields prefixed by `<kind>_crop_`; plus the iBOT mask entries of `collate_data_and_cast`."""
    samples = [sample[0] for sample in samples_list]
    n_crops = len(samples[0]["crops"])
    batch: Dict[str, Any] = {
        "encoded_images": [s["encoded"] for s in samples],
        "decoded_images": [s["pixels"] for s in samples],
        "image_paths": [s["path"] for s in samples],
    }
    for kind, crop_indices in (("global", range(2)), ("local", range(2, n_crops))):
        order = [(i, j) for j in crop_indices for i in range(len(samples))]
        crops = [samples[i]["crops"][j] for i, j in order]
        batch[f"{kind}_crop_image"] = torch.tensor([i for i, _ in order], dtype=torch.long)
        batch[f"{kind}_crop_size"] = crops[0].size if crops else 0
        batch.update({f"{kind}_crop_{k}": v for k, v in _crop_tensors(crops).items()})
    batch.update(collate_masks(2 * len(samples), mask_ratio_tuple, mask_probability, n_tokens, mask_generator))
    return batch


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (N, 3, H, W) RGB in [0, 1] by `shift` (N, 1, 1, 1) turns, through HSV."""
    maxc, argmax = x.max(dim=1, keepdim=True)
    minc = x.min(dim=1, keepdim=True).values
    chroma = maxc - minc
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(1)
    r, g, b = r.unsqueeze(1), g.unsqueeze(1), b.unsqueeze(1)
    # hue sector by the largest channel (ties go to red, then green, as in the usual convention)
    hue = torch.where(argmax == 0, (g - b) / safe_chroma, torch.where(argmax == 1, 2 + (b - r) / safe_chroma,
                                                                       4 + (r - g) / safe_chroma))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift, 1.0)
    saturation = torch.where(maxc > 0, chroma / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), maxc)
    # HSV -> RGB: channel n gets v - v * s * clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1
    n = 5.0 - 2.0 * torch.arange(3, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1 (no host copy)
    k = torch.remainder(n + 6 * hue, 6)
    return maxc - maxc * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


def _jitter_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    if op == 0:
        return (x * factor).clamp(0, 1)
    if op == 1:
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)
    if op == 2:
        return _blend(x, _gray(x), factor)
    return adjust_hue(x, factor)


def color_jitter(x: torch.Tensor, apply: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness (0), contrast (1), saturation (2) and hue (3) in each crop's order (N, 4), with factors (N, 4), on
    the crops where `apply` (N,) is set; torchvision's tensor formulas (grayscale with its weights).

    Each operation runs only on the crops that take it at that position (gathered, transformed, scattered back), so
    the work is that of 4 passes, not of 16 (every operation on every crop at every position). The groups and their
    factors are gathered on the host: `apply`, `order` and `factors` should be CPU tensors, as the collated batch
    holds them (device tensors would be copied to the host, a synchronisation)."""
    apply, order, factors = apply.cpu(), order.cpu(), factors.cpu()
    groups = [(op, torch.nonzero(apply & (order[:, position] == op)).flatten())
              for position in range(4) for op in range(4)]  # fmt: skip
    groups = [(op, rows) for op, rows in groups if len(rows)]
    if not groups:
        return x
    all_rows = torch.cat([rows for _, rows in groups])
    all_factors = torch.cat([factors[rows, op] for op, rows in groups])
    if x.device.type == "cuda":
        all_rows, all_factors = all_rows.pin_memory(), all_factors.pin_memory()
    # two copies for the 16 groups
    all_rows, all_factors = (t.to(x.device, non_blocking=True) for t in (all_rows, all_factors))
    sizes = [len(rows) for _, rows in groups]
    x = x.clone()
    for (op, _), rows, factor in zip(groups, all_rows.split(sizes), all_factors.split(sizes)):
        x.index_copy_(0, rows, _jitter_op(x.index_select(0, rows), op, factor.view(-1, 1, 1, 1)))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """9-tap Gaussian blur of (N, C, H, W) with sigma (N,) per image (0 = unchanged), reflect padding."""
    n, c, h, w = x.shape
    half = BLUR_KERNEL_SIZE // 2
    taps = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).view(-1, 1)
    kernel = torch.exp(-0.5 * (taps / safe_sigma) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = torch.where((sigma > 0).view(-1, 1), kernel, (taps == 0).to(x.dtype).expand(n, -1))
    kernel = kernel.repeat_interleave(c, dim=0)  # (N*C, 9)
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, BLUR_KERNEL_SIZE), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, BLUR_KERNEL_SIZE, 1), groups=n * c)
    return y.view(n, c, h, w)


def on_side_stream(render: Callable[[], Dict[str, Any]], stream: Any, device: torch.device,
                   outputs: Sequence[str]) -> Dict[str, Any]:
    """`render()` with `stream` as the current CUDA stream; the caller's stream then waits for it before its next
    kernel, and the `outputs` tensors are marked as used by the caller's stream, so that their memory (from `stream`'s
    pool) is not handed out again before the caller's kernels have read it. Nothing here waits on the host."""
    caller = torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        result = render()
    caller.wait_stream(stream)
    for key in outputs:
        result[key].record_stream(caller)
    return result


class GPUMultiCropAugmentation:
    """Device side of `crops.gpu_augmentation`: a `collate_encoded_crops` batch -> the `collate_data_and_cast` batch
    (`collated_global_crops`, `collated_local_crops` in `dtype` on `device`, the mask entries unchanged)."""

    def __init__(
        self,
        dtype: torch.dtype,
        decode_batch_size: int = 16,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        side_stream: bool = True,
    ) -> None:
        if decode_batch_size < 1:
            raise ValueError(f"crops.gpu_decode_batch_size must be >= 1, got {decode_batch_size}")
        self.dtype = dtype
        self.decode_batch_size = decode_batch_size
        self.side_stream = side_stream
        self.num_decoded_on_cpu = 0  # JPEGs the device's decoder rejected (see `_decode_one`)
        self._streams: Dict[torch.device, Any] = {}
        self.mean, self.std = tuple(mean), tuple(std)
        self._normalization: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def decode(self, batch: Dict[str, Any], indices: Sequence[int], device: torch.device) -> Dict[int, torch.Tensor]:
        """uint8 (3, H, W) images of samples `indices` on `device`; a JPEG that fails raises naming its file."""
        images = {}
        jpegs = [i for i in indices if batch["encoded_images"][i] is not None]
        if jpegs:
            data = [batch["encoded_images"][i] for i in jpegs]
            if device.type == "cuda":
                # torchvision's nvJPEG decoder takes its output memory from the current stream's pool but writes it
                # from its own stream without waiting for this one (pytorch/vision#9606): a block freed while queued
                # kernels still read it (the previous chunk's images; without the side stream, last iteration's
                # activations too) would be overwritten under them. Drain the stream first: on the side stream only
                # the rendering queued before waits, not the training.
                torch.cuda.current_stream(device).synchronize()
            try:
                decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                decoded = [self._decode_one(batch, i, device) for i in jpegs]
            images.update(zip(jpegs, decoded))
        for i in indices:
            if batch["decoded_images"][i] is not None:
                images[i] = batch["decoded_images"][i].to(device, non_blocking=True)
        return images

    def _decode_one(self, batch: Dict[str, Any], index: int, device: torch.device) -> torch.Tensor:
        """One JPEG on `device`. One that the device's decoder rejects (nvJPEG lacks some JPEG variants) is decoded
        on the CPU and copied over, with a warning; one that fails there too raises, naming its file."""
        data, path = batch["encoded_images"][index], batch["image_paths"][index]
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except torch.cuda.OutOfMemoryError:
            raise  # a full device, not a JPEG it cannot decode
        except RuntimeError as e:
            if device.type == "cpu":
                raise ImageDecodeError(f"can not decode JPEG {path}: {e}") from e
            device_error = e
        try:
            image = decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise ImageDecodeError(f"can not decode JPEG {path}: {e} (on {device}: {device_error})") from e
        if self.num_decoded_on_cpu == 0:
            logger.warning("gpu_augmentation: %s could not be decoded on %s (%s), so it was decoded on the CPU; "
                           "further such images are too, without a warning", path, device, device_error)  # fmt: skip
        self.num_decoded_on_cpu += 1
        return image.to(device)

    @staticmethod
    def _boxes_by_image(batch: Dict[str, Any], kind: str) -> Dict[int, List[Tuple[int, List[int]]]]:
        """{sample index: [(output row, box), ...]} of the `kind` crops (the parameters are read once per batch)."""
        boxes: Dict[int, List[Tuple[int, List[int]]]] = {}
        owners, all_boxes = batch[f"{kind}_crop_image"].tolist(), batch[f"{kind}_crop_boxes"].tolist()
        for row, (owner, box) in enumerate(zip(owners, all_boxes)):
            boxes.setdefault(owner, []).append((row, box))
        return boxes

    @staticmethod
    def _resized_crops(
        images: Dict[int, torch.Tensor], boxes: Dict[int, List[Tuple[int, List[int]]]], size: int,
        crops: Dict[int, torch.Tensor],
    ) -> None:
        """Bicubic (antialiased) resize of the boxes of `images` to `size`, into `crops` by output row (0-255 scale,
        unclamped: `_render` stacks, clamps and rescales each crop size in one pass each)."""
        for owner, image in images.items():
            for row, (left, top, right, bottom) in boxes.get(owner, ()):
                region = image[:, top:bottom, left:right].unsqueeze(0).float()
                crops[row] = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True,
                                           align_corners=False)[0]  # fmt: skip

    def _colour(self, batch: Dict[str, Any], kind: str, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # no local crops
            return x.to(self.dtype)

        def param(name: str) -> torch.Tensor:
            return batch[f"{kind}_crop_{name}"].to(x.device, non_blocking=True)

        x = torch.where(param("flip").view(-1, 1, 1, 1), x.flip(-1), x)
        jitter = (batch[f"{kind}_crop_jitter{name}"] for name in ("", "_order", "_factors"))  # on the host
        x = color_jitter(x, *jitter)
        x = torch.where(param("grayscale").view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
        x = gaussian_blur(x, param("blur_sigma"))
        x = torch.where(param("solarize").view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD), 1 - x, x)
        if x.device not in self._normalization:  # copied to the device once: a copy per batch would sync the host
            self._normalization[x.device] = tuple(torch.tensor(v, device=x.device).view(1, 3, 1, 1)
                                                  for v in (self.mean, self.std))  # fmt: skip
        mean, std = self._normalization[x.device]
        return ((x - mean) / std).to(self.dtype)

    def __call__(self, batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
        if device.type != "cuda" or not self.side_stream:
            return self._render(batch, device)
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return on_side_stream(lambda: self._render(batch, device), self._streams[device], device,
                              ("collated_global_crops", "collated_local_crops"))  # fmt: skip

    def _render(self, batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
        n_images = len(batch["image_paths"])
        kinds = ("global", "local")
        boxes = {kind: self._boxes_by_image(batch, kind) for kind in kinds}
        crops: Dict[str, Dict[int, torch.Tensor]] = {kind: {} for kind in kinds}
        for start in range(0, n_images, self.decode_batch_size):
            images = self.decode(batch, range(start, min(start + self.decode_batch_size, n_images)), device)
            for kind in kinds:
                self._resized_crops(images, boxes[kind], batch[f"{kind}_crop_size"], crops[kind])
            del images
        outputs = {}
        for kind in kinds:  # one stack (a few copy kernels), not one copy per crop
            size = batch[f"{kind}_crop_size"]
            rows = [crops[kind].pop(row) for row in range(len(batch[f"{kind}_crop_image"]))]
            stacked = torch.stack(rows) if rows else torch.empty(0, 3, size, size, device=device)
            outputs[kind] = stacked.clamp_(0, 255).div_(255)
        result = {k: batch[k] for k in MASK_KEYS}
        result["collated_global_crops"] = self._colour(batch, "global", outputs["global"])
        result["collated_local_crops"] = self._colour(batch, "local", outputs["local"])
        return result
