"""Decoders turning the raw values a dataset stores into what its samples carry."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from PIL import Image


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
        return self.open().convert(mode="RGB")


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
