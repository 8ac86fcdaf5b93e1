"""Decoders turning the raw values a dataset stores into what its samples carry."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image

# greyscale modes Pillow gives 16-bit images: I;16* (and I, as older Pillow releases open 16-bit PNGs)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` loaded as 8-bit RGB.

    16-bit greyscale (industrial cameras write it) is mapped linearly from 0..65535 onto 0..255; Pillow's own
    conversion clips it at 255 instead, which turns all but the darkest pixels white. Other modes convert as in
    upstream (`Image.convert("RGB")`).
    """
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode in SIXTEEN_BIT_MODES:
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
