"""`ImagePaths`: image files given one by one, unlabelled: the photos a production line scores as they come."""

import os
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .extended import ImageListDataset


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
