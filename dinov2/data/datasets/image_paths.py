"""`ImagePaths` and `EncodedImages`: image files, or encoded images in memory, given one by one and unlabelled: the
photos a production line scores as they come."""

import os
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .extended import ExtendedVisionDataset, ImageListDataset


class ImagePaths(ImageListDataset):
    """The image files `paths` (absolute, or relative to the working directory) in order, target -1. Not in the
    dataset-string registry, since a string cannot carry the list: `dinov2.eval.predictor` builds it."""

    def __init__(
        self,
        *,
        paths: Sequence[Union[str, os.PathLike]],
        transforms: Optional[Callable] = None,
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
    ) -> None:
        super().__init__("", transforms=transforms, transform=transform, target_transform=target_transform)
        relpaths = np.array([os.fspath(path).encode("utf-8") for path in paths], dtype=np.bytes_)
        self._set_samples(relpaths, np.full(len(relpaths), -1, dtype=np.int64), [])


class EncodedImages(ExtendedVisionDataset):
    """Encoded images (JPEG, PNG, ... bytes) received in memory, e.g. by the scoring service, target -1; `names` stand
    in for their paths in messages and results."""

    def __init__(
        self,
        *,
        images: Sequence[bytes],
        names: Sequence[str],
        transform: Optional[Callable] = None,
    ) -> None:
        if len(images) != len(names):
            raise ValueError(f"{len(images)} images but {len(names)} names")
        super().__init__("", transform=transform)
        self._images, self._names = list(images), [str(name) for name in names]

    def get_image_data(self, index: int) -> bytes:
        return self._images[index]

    def get_target(self, index: int) -> int:
        return -1

    def get_image_path(self, index: int) -> str:
        return self._names[index]

    def __len__(self) -> int:
        return len(self._images)
