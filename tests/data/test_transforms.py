"""Transforms: GaussianBlur probability as given, MaybeToTensor, classification train/eval transforms, the eval
transform's reduced JPEG decode."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

from dinov2.data import make_classification_eval_transform, make_classification_train_transform
from dinov2.data.datasets import ImageFolder
from dinov2.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    DraftDecode,
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


def _photo_jpeg(width, height, fmt="JPEG"):
    """Smooth gradients + mild noise (a photo's statistics, unlike pure noise), encoded."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width * 220, yy / height * 220, (xx + yy) / (width + height) * 255], axis=-1)
    noisy = base + np.random.default_rng(0).normal(0, 6, base.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, fmt, quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "reducing_gap, fmt, decoded",
    [(2.0, "JPEG", (1024, 768)), (1.0, "JPEG", (512, 384)), (4.0, "JPEG", (2048, 1536)), (1.0, "PNG", (2048, 1536))],
)
def test_draft_decode_keeps_the_short_side_at_least_gap_times_min_size(reducing_gap, fmt, decoded):
    # short side 1536: / 2 = 768 >= 2 x 256, / 4 = 384 >= 256 but < 512, / 8 = 192 < 256; PNG has no DCT scales
    image = DraftDecode(256, reducing_gap)(Image.open(io.BytesIO(_photo_jpeg(2048, 1536, fmt))))
    assert image.mode == "RGB" and image.size == decoded


def test_draft_decode_refuses_a_gap_below_one():
    with pytest.raises(ValueError, match="reducing_gap must be >= 1"):
        DraftDecode(256, 0.5)


def test_eval_transform_with_draft_decode_is_within_rounding_of_the_full_decode():
    data = _photo_jpeg(2048, 1536)
    full = make_classification_eval_transform()(Image.open(io.BytesIO(data)).convert("RGB"))
    for gap in (1.0, 2.0):
        transform = make_classification_eval_transform(draft_reducing_gap=gap)
        assert transform.accepts_unloaded_image and repr(transform).count("DraftDecode") == 1
        reduced = transform(Image.open(io.BytesIO(data)))
        assert reduced.shape == full.shape == (3, 224, 224)
        difference = (reduced - full).abs() * STD * 255  # in grey levels
        assert difference.mean() < 0.5 and difference.max() < 2.5, (gap, difference.mean(), difference.max())
        assert difference.max() > 0  # decoded reduced indeed
    plain = make_classification_eval_transform(draft_reducing_gap=0)
    assert not getattr(plain, "accepts_unloaded_image", False) and "DraftDecode" not in repr(plain)


def test_datasets_hand_the_draft_decode_the_unloaded_jpeg(tmp_path):
    data = _photo_jpeg(2048, 1536)
    (tmp_path / "a.jpg").write_bytes(data)
    transform = make_classification_eval_transform(draft_reducing_gap=2.0)
    sample, _ = ImageFolder(root=str(tmp_path), transform=transform)[0]
    torch.testing.assert_close(sample, transform(Image.open(io.BytesIO(data))), rtol=0, atol=0)
    loaded_first = transform(Image.open(io.BytesIO(data)).convert("RGB"))  # what a dataset that decoded would give
    assert not torch.equal(sample, loaded_first)


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
