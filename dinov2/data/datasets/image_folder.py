"""`ImageFolder`: images in a flat folder (unlabelled, target -1) or in one sub-folder per class."""

import os
from typing import Callable, List, Optional

import numpy as np

from .extended import ImageListDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def images_under(folder: str) -> List[str]:
    """Image files below `folder` (recursively), as sorted paths relative to `folder`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        images = [name for name in sorted(filenames) if _is_image(name)]
        found.extend(os.path.relpath(os.path.join(dirpath, name), folder) for name in images)
    return found


class ImageFolder(ImageListDataset):
    """Images under `root`, either all directly in `root` (unlabelled: target -1) or in class sub-folders
    `root/<class>/...` (classes = sorted folder names, target = class index). Mixing both is an error."""

    def __init__(
        self,
        *,
        root: str,
        transforms: Optional[Callable] = None,
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(
            root,
            transforms=transforms,
            transform=transform,
            target_transform=target_transform,
            skip_bad_images=skip_bad_images,
        )
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageFolder root is not a folder: {self.root}")
        entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        top_images = [e.name for e in entries if e.is_file() and _is_image(e.name)]
        class_dirs = [e.name for e in entries if e.is_dir() and images_under(e.path)]
        if top_images and class_dirs:
            raise ValueError(
                f"ImageFolder {self.root}: has both images at the top level ({top_images[0]}, ...) and class "
                f"folders ({class_dirs[0]}, ...); use either a flat folder or one folder per class"
            )
        if top_images:
            class_names: List[str] = []
            relpaths, labels = top_images, [-1] * len(top_images)
        else:
            class_names = class_dirs
            relpaths, labels = [], []
            for class_index, class_dir in enumerate(class_dirs):
                images = images_under(os.path.join(self.root, class_dir))
                relpaths.extend(os.path.join(class_dir, image) for image in images)
                labels.extend([class_index] * len(images))
        if not relpaths:
            raise ValueError(f"ImageFolder {self.root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self._set_samples(
            np.array([p.encode("utf-8") for p in relpaths], dtype=np.bytes_),
            np.array(labels, dtype=np.int64),
            class_names,
        )
