"""`ExtendedVisionDataset`: the base of every dataset here (encoded bytes + target per index, lazy decoding), the
bases of file-backed datasets and of their `Split` enums."""

import logging
import os
from abc import ABCMeta, abstractmethod
from enum import Enum
from typing import Any, List, Tuple, Type, TypeVar, Union

import numpy as np
from torchvision.datasets import VisionDataset

from .decoders import IMAGE_ERRORS, EncodedImage, ImageDataDecoder, TargetDecoder, to_rgb

logger = logging.getLogger("dinov2")

_S = TypeVar("_S", bound="SplitEnum")


class SplitEnum(Enum):
    """Base of the datasets' `Split` enums (members are defined by each dataset)."""

    @classmethod
    def parse(cls: Type[_S], split: Union[_S, str]) -> _S:
        """A member or its name in any case ("train", "TRAIN")."""
        if isinstance(split, cls):
            return split
        try:
            return cls[str(split).upper()]
        except KeyError:
            raise ValueError(f'unknown split "{split}"; allowed: {", ".join(s.name for s in cls)}') from None


class ImageDecodeError(RuntimeError):
    """An image could not be read or decoded; the message names the sample index and the file."""


class ExtendedVisionDataset(VisionDataset, metaclass=ABCMeta):
    """Dataset of encoded images: subclasses provide `get_image_data(i) -> bytes`, `get_target(i)`, `get_image_path(i)`
    and `__len__`; this class decodes and transforms.

    Lazy decoding: the image is opened with `PIL.Image.open` (header only). A transform with the attribute
    `accepts_unloaded_image = True` receives that unloaded image (it may use JPEG draft mode) and must produce RGB
    itself; otherwise the image is converted to RGB first. A transform with `accepts_encoded_image = True` receives an
    `EncodedImage` (the bytes and the path) instead, and decodes or forwards them itself. Read/decode errors, also
    those raised inside the transform, become `ImageDecodeError` (a RuntimeError) naming the sample index and the
    file.

    With `skip_bad_images=True` a broken sample is replaced by the next readable index; each replacement is logged as
    a warning and counted in `num_bad_images` (in DataLoader workers each worker counts its own copy).
    """

    def __init__(self, *args: Any, skip_bad_images: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_bad_images = skip_bad_images
        self.num_bad_images = 0

    @abstractmethod
    def get_image_data(self, index: int) -> bytes:
        """Encoded bytes of image `index`."""

    @abstractmethod
    def get_target(self, index: int) -> Any:
        """Target of sample `index`."""

    @abstractmethod
    def get_image_path(self, index: int) -> str:
        """Absolute path (or tarball member) of image `index`, for messages."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    def _transform_accepts(self, kind: str) -> bool:
        """Whether the transform declares `accepts_<kind>_image = True` (kind: "unloaded" or "encoded")."""
        name = f"accepts_{kind}_image"
        return bool(getattr(self.transform, name, False) or getattr(self.transforms, name, False))

    def _load_sample(self, index: int) -> Tuple[Any, Any]:
        try:
            if self._transform_accepts("encoded"):
                image = EncodedImage(self.get_image_data(index), self.get_image_path(index))
            else:
                image = ImageDataDecoder(self.get_image_data(index)).open()
                if not self._transform_accepts("unloaded"):
                    image = to_rgb(image)
            target = TargetDecoder(self.get_target(index)).decode()
            if self.transforms is not None:
                image, target = self.transforms(image, target)
        except IMAGE_ERRORS as e:
            raise ImageDecodeError(
                f"can not read image for sample {index}: {self.get_image_path(index)}: {type(e).__name__}: {e}"
            ) from e
        return image, target

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        if not self.skip_bad_images:
            return self._load_sample(index)
        length = len(self)
        for offset in range(length):
            candidate = (index + offset) % length
            try:
                return self._load_sample(candidate)
            except ImageDecodeError as e:
                self.num_bad_images += 1
                logger.warning("skip_bad_images: %s; trying sample %d instead", e, (candidate + 1) % length)
        raise ImageDecodeError(f"no readable image in {type(self).__name__} (all {length} samples failed)")


class ImageFileDataset(ExtendedVisionDataset):
    """Dataset whose images are files below `root`: subclasses provide `get_image_relpath(i)` instead of the
    image path and bytes."""

    @abstractmethod
    def get_image_relpath(self, index: int) -> str:
        """Path of image `index` relative to `root`."""

    def get_image_path(self, index: int) -> str:
        return os.path.abspath(os.path.join(self.root, self.get_image_relpath(index)))

    def get_image_data(self, index: int) -> bytes:
        with open(self.get_image_path(index), "rb") as f:
            return f.read()


class ImageListDataset(ImageFileDataset):
    """Image files listed in memory with integer labels (-1: unlabelled) and class names; the subclass constructor
    calls `_set_samples` once."""

    def _set_samples(self, relpaths: np.ndarray, labels: np.ndarray, class_names: List[str]) -> None:
        """`relpaths`: UTF-8 bytes array (compact and fork-friendly in DataLoader workers); `labels`: int64."""
        self._relpaths = relpaths
        self._labels = labels
        self._class_names = list(class_names)

    @property
    def class_names(self) -> List[str]:
        return list(self._class_names)

    def __len__(self) -> int:
        return len(self._relpaths)

    def get_image_relpath(self, index: int) -> str:
        """The path as listed (for BBU: `img_path` as written in the annotation file)."""
        return self._relpaths[index].decode("utf-8")

    def get_target(self, index: int) -> int:
        return int(self._labels[index])

    def get_targets(self) -> np.ndarray:
        return self._labels.copy()
