"""to_rgb: 16-bit greyscale scaled onto 8 bits (not clipped), on every decode path; other modes as upstream."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.data import DataAugmentationDINO
from dinov2.data.datasets import ImageFolder
from dinov2.data.datasets.decoders import EncodedImage, ImageDataDecoder, to_rgb
from dinov2.data.gpu_augmentations import EncodedCropsTransform

SIXTEEN_BIT = np.array([[0, 128, 129, 257, 32767, 32768, 65406, 65535]], dtype=np.uint16)
EIGHT_BIT = np.array([[0, 0, 1, 1, 127, 128, 254, 255]], dtype=np.uint8)  # round(v * 255 / 65535)


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    return _encoded(pixels, "PNG")


def _sixteen_bit_photo(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:90, 0:120]
    return np.clip(xx * 400 + yy * 300 + rng.normal(0, 900, xx.shape), 0, 65535).astype(np.uint16)


def _eight_bit(pixels: np.ndarray) -> np.ndarray:
    return ((pixels.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_greyscale_is_scaled_onto_eight_bits(mode):
    image = Image.fromarray(SIXTEEN_BIT.astype(np.int32)).convert(mode) if mode == "I" else Image.fromarray(SIXTEEN_BIT)
    assert image.mode == mode
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (1, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], EIGHT_BIT)
    clipped = np.asarray(image.convert("RGB"))[..., 0]  # what Pillow alone makes of it
    np.testing.assert_array_equal(clipped, np.minimum(SIXTEEN_BIT, 255))


def test_values_outside_the_sixteen_bit_range_are_clipped():
    image = Image.fromarray(np.array([[-5, 70000, 65535]], dtype=np.int32))
    assert image.mode == "I"
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 255, 255]


def test_a_sixteen_bit_png_decodes_scaled():
    image = ImageDataDecoder(_png(SIXTEEN_BIT)).decode()
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image)[..., 1], EIGHT_BIT)


def test_a_sixteen_bit_pgm_opened_as_mode_i_decodes_scaled():
    height, width = SIXTEEN_BIT.shape  # written by hand: Pillow 10.0 cannot write 16-bit PGMs
    data = f"P5\n{width} {height}\n65535\n".encode() + SIXTEEN_BIT.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(data)).mode == "I"  # Pillow reads 16-bit PGMs as 32-bit integers
    np.testing.assert_array_equal(np.asarray(ImageDataDecoder(data).decode())[..., 0], EIGHT_BIT)


def test_a_thirty_two_bit_integer_tiff_converts_as_pillow_does():
    """32-bit samples are not 16-bit ones: values 0..255 stay as they are (upstream's conversion), not scaled to 0."""
    pixels = np.array([[0, 7, 200, 255, 300]], dtype=np.int32)
    data = _encoded(pixels, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert np.asarray(ImageDataDecoder(data).decode())[0, :, 0].tolist() == [0, 7, 200, 255, 255]


def test_other_modes_convert_as_pillow_does():
    rgb = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(2, 4, 3))
    assert to_rgb(rgb) is rgb
    for mode in ("L", "RGBA", "P", "CMYK", "LA"):
        image = rgb.convert(mode)
        np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


@pytest.fixture
def folder_pair(tmp_path):
    """An ImageFolder with a 16-bit PNG and, beside it, the same picture in 8 bits as to_rgb should make it."""
    pixels = _sixteen_bit_photo()
    (tmp_path / "a_sixteen.png").write_bytes(_png(pixels))
    Image.fromarray(_eight_bit(pixels)).convert("RGB").save(tmp_path / "b_eight.png")
    return tmp_path


def test_dataset_samples_of_a_sixteen_bit_image_equal_its_eight_bit_version(folder_pair):
    dataset = ImageFolder(root=str(folder_pair))
    sixteen, eight = (np.asarray(dataset[i][0]) for i in range(2))
    assert sixteen.shape == (90, 120, 3)
    assert sixteen.std() > 20  # a picture, not a white sheet
    np.testing.assert_array_equal(sixteen, eight)


@pytest.mark.parametrize("fast", [True, False])
def test_multi_crops_of_a_sixteen_bit_image_equal_those_of_its_eight_bit_version(folder_pair, fast):
    augmentation = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 48, 24, fast=fast)
    dataset = ImageFolder(root=str(folder_pair), transform=augmentation)
    outputs = []
    for index in range(2):
        torch.manual_seed(0)
        outputs.append(dataset[index][0])
    for key in ("global_crops", "local_crops"):
        for a, b in zip(outputs[0][key], outputs[1][key]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gpu_path_workers_decode_a_sixteen_bit_image_scaled(folder_pair):
    transform = EncodedCropsTransform(DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 48, 24))
    path = folder_pair / "a_sixteen.png"
    sample = transform(EncodedImage(path.read_bytes(), str(path)))
    assert sample["encoded"] is None
    eight = torch.from_numpy(_eight_bit(_sixteen_bit_photo())).expand(3, -1, -1)
    torch.testing.assert_close(sample["pixels"], eight, rtol=0, atol=0)
