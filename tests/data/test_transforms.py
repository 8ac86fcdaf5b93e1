"""Transforms: GaussianBlur probability as given, MaybeToTensor, classification train/eval transforms."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

from dinov2.data import make_classification_eval_transform, make_classification_train_transform
from dinov2.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    GaussianBlur,
    MaybeToTensor,
    make_normalize_transform,
)

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def _noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_constants():
    assert IMAGENET_DEFAULT_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_DEFAULT_STD == (0.229, 0.224, 0.225)
    normalize = make_normalize_transform()
    assert tuple(normalize.mean) == IMAGENET_DEFAULT_MEAN and tuple(normalize.std) == IMAGENET_DEFAULT_STD


@pytest.mark.parametrize("p", [0.0, 0.1, 0.9, 1.0])
def test_gaussian_blur_probability_is_not_inverted(p):
    blur = GaussianBlur(p=p)
    assert blur.p == p
    inner = blur.transforms[0]
    assert isinstance(inner, transforms.GaussianBlur)
    assert inner.kernel_size == (9, 9) and inner.sigma == (0.1, 2.0)
    calls = []
    blur.transforms = [lambda img: calls.append(1) or img]  # count applications of the inner blur
    image = _noise(24, 24)
    torch.manual_seed(0)
    for _ in range(400):
        blur(image)
    assert abs(len(calls) - 400 * p) <= 4.5 * np.sqrt(400 * p * (1 - p)) + 1e-9


def test_maybe_to_tensor():
    tensor = torch.rand(3, 4, 5)
    assert MaybeToTensor()(tensor) is tensor
    image = Image.new("RGB", (5, 4), (255, 0, 51))
    out = MaybeToTensor()(image)
    assert out.shape == (3, 4, 5) and torch.allclose(out[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_eval_transform_resize_center_crop_normalize():
    transform = make_classification_eval_transform()
    steps = transform.transforms
    assert isinstance(steps[0], transforms.Resize) and steps[0].size == 256
    assert steps[0].interpolation == transforms.InterpolationMode.BICUBIC
    assert isinstance(steps[1], transforms.CenterCrop) and steps[1].size == (224, 224)
    image = _noise(400, 300)
    out = transform(image)
    assert out.shape == (3, 224, 224)
    # short side 300 -> 256 (long side 400 -> 341), then the central 224 x 224
    resized = image.resize((341, 256), Image.Resampling.BICUBIC)
    expected = F.to_tensor(resized.crop((58, 16, 282, 240)))
    assert torch.allclose(out * STD + MEAN, expected, atol=1e-5)


def test_eval_transform_constant_image_values():
    out = make_classification_eval_transform(resize_size=64, crop_size=32)(Image.new("RGB", (80, 70), (10, 128, 250)))
    expected = (torch.tensor([10, 128, 250]).float().view(3, 1, 1) / 255 - MEAN) / STD
    assert out.shape == (3, 32, 32) and torch.allclose(out, expected.expand(3, 32, 32), atol=1e-5)


def test_train_transform():
    transform = make_classification_train_transform(crop_size=64)
    steps = transform.transforms
    assert isinstance(steps[0], transforms.RandomResizedCrop) and steps[0].size == (64, 64)
    assert steps[0].interpolation == transforms.InterpolationMode.BICUBIC
    assert isinstance(steps[1], transforms.RandomHorizontalFlip) and steps[1].p == 0.5
    torch.manual_seed(0)
    assert transform(_noise(100, 80)).shape == (3, 64, 64)
    no_flip = make_classification_train_transform(crop_size=64, hflip_prob=0.0)
    assert not any(isinstance(t, transforms.RandomHorizontalFlip) for t in no_flip.transforms)
