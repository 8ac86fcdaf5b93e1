"""DINO multi-crop augmentation: 2 global crops and `local_crops_number` local crops per image."""

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision import transforms

from .datasets.decoders import to_rgb
from .fast_crops import CropParams, hsv_tables, render_crops, sample_crop_params
from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, GaussianBlur, make_normalize_transform

logger = logging.getLogger("dinov2")

HFLIP_PROB = 0.5
COLOR_JITTER_PROB = 0.8
COLOR_JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
GRAYSCALE_PROB = 0.2
SOLARIZE_THRESHOLD = 128


class DataAugmentationDINO:
    """Multi-crop augmentation of DINOv2.

    Per image: global crop 1 (colour jitter p=0.8, grayscale p=0.2, blur p=blur_probs[0]), global crop 2 (same
    colour, blur p=blur_probs[1], solarize p=solarize_prob), and local crops (colour, blur p=blur_probs[2]); each
    a bicubic RandomResizedCrop with horizontal flip p=0.5, then ImageNet normalisation. Upstream's code applies
    the blur with 1 - p (actual 0.0 / 0.9 / 0.5); pass blur_probs=(0.0, 0.9, 0.5) to reproduce that.

    `fast=True` (default) samples all crop parameters from the image header and decodes JPEGs once at the
    coarsest DCT scale that keeps every crop at or above its output resolution (see `fast_crops`; it builds
    128 MiB of hue lookup tables once per process, at construction);
    `fast=False` is the torchvision PIL pipeline of upstream. Both draw from the same distribution.
    `reducing_gap` (fast path only; Pillow's resize option, None = plain bicubic): a crop box k >= 2 times
    `reducing_gap` larger than its output is first box-averaged by int(k / reducing_gap), then resized bicubic.
    The transform accepts an unloaded PIL image (`accepts_unloaded_image`) and converts it to RGB itself.
    """

    accepts_unloaded_image = True

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        blur_probs: Sequence[float] = (1.0, 0.1, 0.5),
        solarize_prob: float = 0.2,
        fast: bool = True,
        reducing_gap: Optional[float] = 1.0,
    ) -> None:
        if len(blur_probs) != 3 or not all(0.0 <= float(p) <= 1.0 for p in blur_probs):
            raise ValueError(f"crops.blur_probs must be three probabilities in [0, 1], got {list(blur_probs)}")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.blur_probs = tuple(float(p) for p in blur_probs)
        self.solarize_prob = solarize_prob
        self.fast = fast
        self.reducing_gap = reducing_gap
        self.mean = IMAGENET_DEFAULT_MEAN
        self.std = IMAGENET_DEFAULT_STD

        logger.info(
            "DataAugmentationDINO: global %s x2 scale %s, local %s x%d scale %s, blur_probs %s, solarize %s, fast %s",
            global_crops_size, self.global_crops_scale, local_crops_size, local_crops_number,
            self.local_crops_scale, self.blur_probs, solarize_prob, fast,
        )

        self._build_reference_pipeline()
        if fast:
            hsv_tables()  # build the hue tables now, so DataLoader workers forked later share their pages

    def _build_reference_pipeline(self) -> None:
        def geometric(size: int, scale: Sequence[float]) -> transforms.Compose:
            crop = transforms.RandomResizedCrop(size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC)
            return transforms.Compose([crop, transforms.RandomHorizontalFlip(p=HFLIP_PROB)])

        self.geometric_augmentation_global = geometric(self.global_crops_size, self.global_crops_scale)
        self.geometric_augmentation_local = geometric(self.local_crops_size, self.local_crops_scale)
        color_jittering = transforms.Compose(
            [
                transforms.RandomApply([transforms.ColorJitter(*COLOR_JITTER_STRENGTH)], p=COLOR_JITTER_PROB),
                transforms.RandomGrayscale(p=GRAYSCALE_PROB),
            ]
        )
        normalize = transforms.Compose([transforms.ToTensor(), make_normalize_transform(self.mean, self.std)])
        self.global_transfo1 = transforms.Compose([color_jittering, GaussianBlur(p=self.blur_probs[0]), normalize])
        self.global_transfo2 = transforms.Compose(
            [
                color_jittering,
                GaussianBlur(p=self.blur_probs[1]),
                transforms.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=self.solarize_prob),
                normalize,
            ]
        )
        self.local_transfo = transforms.Compose([color_jittering, GaussianBlur(p=self.blur_probs[2]), normalize])

    def sample_params(self, width: int, height: int, generator: Optional[torch.Generator] = None) -> List[CropParams]:
        """Fast path: every random decision for one image (global 1, global 2, then the local crops)."""
        common = dict(
            hflip_prob=HFLIP_PROB,
            jitter_prob=COLOR_JITTER_PROB,
            jitter_strength=COLOR_JITTER_STRENGTH,
            grayscale_prob=GRAYSCALE_PROB,
            generator=generator,
        )
        glob = dict(size=self.global_crops_size, scale=self.global_crops_scale, **common)
        crops = [
            sample_crop_params(width, height, blur_prob=self.blur_probs[0], solarize_prob=0.0, **glob),
            sample_crop_params(width, height, blur_prob=self.blur_probs[1], solarize_prob=self.solarize_prob, **glob),
        ]
        for _ in range(self.local_crops_number):
            crops.append(
                sample_crop_params(
                    width,
                    height,
                    size=self.local_crops_size,
                    scale=self.local_crops_scale,
                    blur_prob=self.blur_probs[2],
                    solarize_prob=0.0,
                    **common,
                )
            )
        return crops

    def _output(self, global_crops: List[torch.Tensor], local_crops: List[torch.Tensor]) -> Dict[str, Any]:
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": local_crops,
            "offsets": (),
        }

    def _call_fast(self, image: Image.Image) -> Dict[str, Any]:
        crops = render_crops(image, self.sample_params(*image.size), self.mean, self.std, self.reducing_gap)
        return self._output(crops[:2], crops[2:])

    def _call_reference(self, image: Image.Image) -> Dict[str, Any]:
        image = to_rgb(image)
        global_crop_1 = self.global_transfo1(self.geometric_augmentation_global(image))
        global_crop_2 = self.global_transfo2(self.geometric_augmentation_global(image))
        local_crops = [
            self.local_transfo(self.geometric_augmentation_local(image)) for _ in range(self.local_crops_number)
        ]
        return self._output([global_crop_1, global_crop_2], local_crops)

    def __call__(self, image: Image.Image) -> Dict[str, Any]:
        return self._call_fast(image) if self.fast else self._call_reference(image)


def make_augmentation_from_cfg(cfg: DictConfig) -> DataAugmentationDINO:
    """DataAugmentationDINO from the `crops` section of a training config (with `crops.gpu_augmentation` only its
    parameter sampling is used, so the fast path's tables are not built)."""
    crops = cfg.crops
    return DataAugmentationDINO(
        crops.global_crops_scale,
        crops.local_crops_scale,
        crops.local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
        blur_probs=crops.blur_probs,
        fast=crops.fast_augmentation and not crops.gpu_augmentation,
        reducing_gap=crops.fast_reducing_gap,
    )
