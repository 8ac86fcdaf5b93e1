"""Decoders turning the raw values a dataset stores into what its samples carry."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image

# What Pillow raises for missing, truncated, corrupt or oversized images (FileNotFoundError and UnidentifiedImageError
# are OSErrors; an oversized PNG text chunk is a ValueError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def is_sixteen_bit(image: Image.Image) -> bool:
    """Whether `image` is 16-bit greyscale: mode I;16*, or mode I (32-bit integers, which Pillow also gives 16-bit
    PGMs and, in older releases, 16-bit PNGs) read from 16-bit samples. A mode-I image read from 32-bit samples (an
    integer TIFF) is not; one loaded or made in memory, whose source Pillow does not tell, counts as 16-bit."""
    if image.mode.startswith("I;16"):
        return True
    if image.mode != "I":
        return False
    rawmodes = [tile[3][0] if isinstance(tile[3], tuple) else tile[3] for tile in getattr(image, "tile", None) or ()]
    return not rawmodes or all(isinstance(raw, str) and raw.startswith("I;16") for raw in rawmodes)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` loaded as 8-bit RGB.

    16-bit greyscale (industrial cameras write it) is mapped linearly from 0..65535 onto 0..255; Pillow's own
    conversion clips it at 255 instead, which turns all but the darkest pixels white. Other modes convert as in
    upstream (`Image.convert("RGB")`), 32-bit integer images included.
    """
    if image.mode == "RGB":
        image.load()
        return image
    if is_sixteen_bit(image):
        pixels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        eight_bit = ((pixels * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    return image.convert("RGB")


class Decoder(ABC):
    """Base class: wraps one raw value; `decode()` returns the usable object."""

    @abstractmethod
    def decode(self) -> Any:
        """The decoded value."""


class ImageDataDecoder(Decoder):
    """Encoded image bytes -> PIL image.

    `open()` reads the header only (PIL is lazy), so a transform can still pick a JPEG draft scale before the pixels are
    decoded; `decode()` returns the fully loaded RGB image.
    """

    def __init__(self, image_data: bytes) -> None:
        self._image_data = image_data

    def open(self) -> Image.Image:
        return Image.open(BytesIO(self._image_data))

    def decode(self) -> Image.Image:
        return to_rgb(self.open())


@dataclass(frozen=True)
class EncodedImage:
    """Encoded bytes of one image and its path, for a transform that decodes elsewhere (`accepts_encoded_image`)."""

    data: bytes
    path: str


class TargetDecoder(Decoder):
    """Targets are stored ready to use: identity."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def decode(self) -> Any:
        return self._target
