"""Image transforms shared by pretraining augmentation and the evaluation probes."""

from typing import Sequence

import torch
from PIL import Image
from torchvision import transforms

from .fast_crops import DRAFT_SCALES, decode_for_crops


class GaussianBlur(transforms.RandomApply):
    """Gaussian blur (kernel 9, sigma ~ U(radius_min, radius_max)) applied with probability `p`.

    Upstream passes `1 - p` to RandomApply, which inverts the intended probabilities; here `p` is what it says.
    """

    def __init__(self, *, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        blur = transforms.GaussianBlur(kernel_size=9, sigma=(radius_min, radius_max))
        super().__init__(transforms=[blur], p=p)


class MaybeToTensor(transforms.ToTensor):
    """ToTensor that passes tensors through unchanged (so pipelines accept PIL images or tensors)."""

    def __call__(self, pic):
        if isinstance(pic, torch.Tensor):
            return pic
        return super().__call__(pic)


class DraftDecode:
    """Decode an unloaded JPEG at the coarsest DCT scale (1/2, 1/4 or 1/8: Pillow's draft mode) that keeps its short
    side at least `reducing_gap` x `min_size`, as RGB (`to_rgb`), so that the resize after it starts from that
    instead of the full-size photo; Pillow's `thumbnail(reducing_gap=...)` does the same. libjpeg then skips most of
    the decoding work, and the resize most of its input. Other formats and loaded images are decoded at full size.
    """

    def __init__(self, min_size: int, reducing_gap: float) -> None:
        if reducing_gap < 1.0:
            raise ValueError(f"reducing_gap must be >= 1 (the decoded short side stays >= min_size), got {reducing_gap}")
        self.min_size = min_size
        self.reducing_gap = reducing_gap

    def __call__(self, image: Image.Image) -> Image.Image:
        target = self.reducing_gap * self.min_size
        scale = next((s for s in DRAFT_SCALES if min(image.size) / s >= target), 1)
        return decode_for_crops(image, scale)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, reducing_gap={self.reducing_gap})"


class UnloadedImageCompose(transforms.Compose):
    """Compose whose first step takes the image as the dataset opened it, not yet decoded (see
    `ExtendedVisionDataset`): for `DraftDecode`."""

    accepts_unloaded_image = True


IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def make_normalize_transform(
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> transforms.Normalize:
    return transforms.Normalize(mean=mean, std=std)


def make_classification_train_transform(
    *,
    crop_size: int = 224,
    interpolation: transforms.InterpolationMode = transforms.InterpolationMode.BICUBIC,
    hflip_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> transforms.Compose:
    """Linear-probe training transform: random resized crop, optional flip, tensor, normalize."""
    steps = [transforms.RandomResizedCrop(crop_size, interpolation=interpolation)]
    if hflip_prob > 0.0:
        steps.append(transforms.RandomHorizontalFlip(hflip_prob))
    steps += [MaybeToTensor(), make_normalize_transform(mean=mean, std=std)]
    return transforms.Compose(steps)


def make_classification_eval_transform(
    *,
    resize_size: int = 256,
    interpolation: transforms.InterpolationMode = transforms.InterpolationMode.BICUBIC,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    draft_reducing_gap: float = 0.0,
) -> transforms.Compose:
    """Evaluation transform: resize the short side, center crop, tensor, normalize. With `draft_reducing_gap` >= 1,
    JPEGs are first decoded reduced (`DraftDecode`: short side >= draft_reducing_gap x resize_size); 0 decodes them
    at full size, as upstream."""
    steps = [
        transforms.Resize(resize_size, interpolation=interpolation),
        transforms.CenterCrop(crop_size),
        MaybeToTensor(),
        make_normalize_transform(mean=mean, std=std),
    ]
    if draft_reducing_gap == 0:
        return transforms.Compose(steps)
    return UnloadedImageCompose([DraftDecode(resize_size, draft_reducing_gap), *steps])
