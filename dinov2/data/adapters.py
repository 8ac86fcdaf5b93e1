"""Dataset wrappers used by the evaluations."""

from typing import Any, Optional, Tuple

import numpy as np
from torch.utils.data import Dataset


class DatasetWithEnumeratedTargets(Dataset):
    """Samples become `image, (index, target)` so that features can be matched back to dataset rows; a None target
    (e.g. ImageNet TEST) becomes the index."""

    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset

    def get_image_relpath(self, index: int) -> str:
        return self._dataset.get_image_relpath(index)

    def get_image_data(self, index: int) -> bytes:
        return self._dataset.get_image_data(index)

    def get_target(self, index: int) -> Tuple[int, Any]:
        return (index, self._dataset.get_target(index))

    def get_targets(self) -> Optional[np.ndarray]:
        return self._dataset.get_targets()

    def __getitem__(self, index: int) -> Tuple[Any, Tuple[int, Any]]:
        image, target = self._dataset[index]
        target = index if target is None else target
        return image, (index, target)

    def __len__(self) -> int:
        return len(self._dataset)
