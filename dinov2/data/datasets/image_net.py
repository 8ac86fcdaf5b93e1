"""`ImageNet` (ILSVRC-2012 layout) with upstream's metadata files in an `extra` folder.

root: `labels.txt` (CSV `class_id,class name`, one line per class, in class-index order),
`train/<class_id>/<class_id>_<n>.JPEG`, `val/<class_id>/ILSVRC2012_val_<8 digits>.JPEG`,
`test/ILSVRC2012_test_<8 digits>.JPEG`.
extra (written by `ImageNet(split=..., root=..., extra=...).dump_extra()`): `entries-<SPLIT>.npy` (structured:
actual_index <u4, class_index <u4, class_id U, class_name U) and, for TRAIN/VAL, `class-ids-<SPLIT>.npy`,
`class-names-<SPLIT>.npy`. Any subset of ImageNet works: the metadata is checked for consistency, not for a fixed size.
"""

import csv
import logging
import os
from abc import ABC, abstractmethod
from typing import Callable, List, Optional, Tuple, Union

import numpy as np

from dinov2.utils.utils import atomic_write

from .extended import ImageFileDataset, SplitEnum

logger = logging.getLogger("dinov2")

_TEST_CLASS_INDEX = np.iinfo(np.uint32).max  # uint32(-1): "no class" in the TEST entries
_ENTRY_FIELDS = ("actual_index", "class_index", "class_id", "class_name")


class _Split(SplitEnum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"

    def get_dirname(self, class_id: Optional[str] = None) -> str:
        return self.value if class_id is None else os.path.join(self.value, class_id)

    def get_image_relpath(self, actual_index: int, class_id: Optional[str] = None) -> str:
        if self == _Split.TRAIN:
            basename = f"{class_id}_{actual_index}"
        else:
            basename = f"ILSVRC2012_{self.value}_{actual_index:08d}"
        return os.path.join(self.get_dirname(None if self == _Split.TEST else class_id), basename + ".JPEG")

    def parse_image_relpath(self, image_relpath: str) -> Tuple[Optional[str], int]:
        """(class_id, actual_index) of a path made by `get_image_relpath` (class_id None for TEST)."""
        dirname, filename = os.path.split(image_relpath)
        basename, _ = os.path.splitext(filename)
        try:
            actual_index = int(basename.rsplit("_", 1)[-1])
        except ValueError:
            raise ValueError(f"not an ImageNet {self.name} image name: {image_relpath}") from None
        class_id = None if self == _Split.TEST else os.path.basename(dirname)
        return class_id, actual_index


def save_npy_atomic(array: np.ndarray, path: str) -> None:
    """np.save to a temporary file, then rename: readers never see a partial file."""
    atomic_write(path, lambda f: np.save(f, array))


def mismatched_class_entries(entries: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Indices of the entries whose class_index is out of range or whose class_id is not class_ids[class_index]
    (only those of the first kind if there are any)."""
    class_index = np.asarray(entries["class_index"], dtype=np.int64)
    bad = np.flatnonzero(class_index >= len(class_ids))
    if not len(bad):
        bad = np.flatnonzero(np.asarray(class_ids)[class_index] != np.asarray(entries["class_id"]))
    return bad


class ExtraMetadataMixin(ABC):
    """`.npy` metadata files in the folder `_extra_root`, written by `dump_extra()` and memory-mapped when read;
    `_entries` (None until needed) is set by `_load_metadata`. Shared by ImageNet and ImageNet22k."""

    _extra_root: str
    _entries: Optional[np.ndarray]

    @abstractmethod
    def _dump_extra_call(self) -> str:
        """The call that writes the metadata files, named when one is missing."""

    @abstractmethod
    def _load_metadata(self) -> None:
        """Read and check the metadata files; sets `_entries`."""

    def _get_entries(self) -> np.ndarray:
        if self._entries is None:
            self._load_metadata()
        return self._entries

    def _extra_full_path(self, extra_path: str) -> str:
        return os.path.join(self._extra_root, extra_path)

    def _load_extra(self, extra_path: str) -> np.ndarray:
        path = self._extra_full_path(extra_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{type(self).__name__} metadata file not found: {path}; create it with {self._dump_extra_call()}"
            )
        return np.load(path, mmap_mode="r")

    def _load_entries(self, extra_path: str, fields: Tuple[str, ...]) -> np.ndarray:
        """The structured entries array, checked to have exactly `fields`."""
        entries = self._load_extra(extra_path)
        if entries.dtype.names != fields:
            raise ValueError(f"{self._extra_full_path(extra_path)}: fields {entries.dtype.names}, expected {fields}")
        return entries

    def _save_extra(self, array: np.ndarray, extra_path: str) -> None:
        os.makedirs(self._extra_root, exist_ok=True)
        save_npy_atomic(array, self._extra_full_path(extra_path))

    def _bad_entry_error(
        self,
        entries_path: str,
        entries: np.ndarray,
        index: int,
        class_ids_path: str,
        num_classes: int,
        problem: str = "",
    ) -> ValueError:
        """Error naming entry `index` that does not match the class ids file (`problem`: other possible causes)."""
        entry = entries[index]
        return ValueError(
            f"{self._extra_full_path(entries_path)}: entry {index} (class_index {entry['class_index']}, class_id "
            f"{str(entry['class_id'])!r}) does not match {self._extra_full_path(class_ids_path)} ({num_classes} "
            f"classes){problem}; re-run dump_extra()"
        )


class ImageNet(ExtraMetadataMixin, ImageFileDataset):
    """ImageNet-1k split read through the `extra` metadata (see the module docstring). TEST targets are None."""

    Split = _Split

    def __init__(
        self,
        *,
        split: Union[_Split, str],
        root: str,
        extra: str,
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
        self._extra_root = extra
        self._split = _Split.parse(split)
        self._entries: Optional[np.ndarray] = None
        self._class_ids: Optional[np.ndarray] = None
        self._class_names: Optional[np.ndarray] = None

    @property
    def split(self) -> _Split:
        return self._split

    @property
    def _entries_path(self) -> str:
        return f"entries-{self._split.name}.npy"

    @property
    def _class_ids_path(self) -> str:
        return f"class-ids-{self._split.name}.npy"

    @property
    def _class_names_path(self) -> str:
        return f"class-names-{self._split.name}.npy"

    def _dump_extra_call(self) -> str:
        return f"ImageNet(split={self._split.name!r}, root={self.root!r}, extra={self._extra_root!r}).dump_extra()"

    def _load_metadata(self) -> None:
        """Load the extra files once and check that they agree with each other."""
        entries = self._load_entries(self._entries_path, _ENTRY_FIELDS)
        if self._split != _Split.TEST:
            class_ids = self._load_extra(self._class_ids_path)
            class_names = self._load_extra(self._class_names_path)
            if len(class_ids) != len(class_names):
                raise ValueError(
                    f"{self._extra_full_path(self._class_ids_path)} has {len(class_ids)} classes but "
                    f"{self._extra_full_path(self._class_names_path)} has {len(class_names)}"
                )
            bad = mismatched_class_entries(entries, class_ids)
            if len(bad):
                raise self._bad_entry_error(self._entries_path, entries, bad[0], self._class_ids_path, len(class_ids))
            self._class_ids, self._class_names = class_ids, class_names
        self._entries = entries

    def _get_class_ids(self) -> np.ndarray:
        if self._split == _Split.TEST:
            raise ValueError("ImageNet TEST has no class ids")
        self._get_entries()
        return self._class_ids

    def _get_class_names(self) -> np.ndarray:
        if self._split == _Split.TEST:
            raise ValueError("ImageNet TEST has no class names")
        self._get_entries()
        return self._class_names

    def find_class_id(self, class_index: int) -> str:
        return str(self._get_class_ids()[class_index])

    def find_class_name(self, class_index: int) -> str:
        return str(self._get_class_names()[class_index])

    def get_class_id(self, index: int) -> Optional[str]:
        return None if self._split == _Split.TEST else str(self._get_entries()[index]["class_id"])

    def get_class_name(self, index: int) -> Optional[str]:
        return None if self._split == _Split.TEST else str(self._get_entries()[index]["class_name"])

    def get_image_relpath(self, index: int) -> str:
        actual_index = int(self._get_entries()[index]["actual_index"])
        return self._split.get_image_relpath(actual_index, self.get_class_id(index))

    def get_target(self, index: int) -> Optional[int]:
        return None if self._split == _Split.TEST else int(self._get_entries()[index]["class_index"])

    def get_targets(self) -> Optional[np.ndarray]:
        if self._split == _Split.TEST:
            return None
        return np.asarray(self._get_entries()["class_index"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._get_entries())

    def _load_labels(self) -> List[Tuple[str, str]]:
        path = os.path.join(self.root, "labels.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ImageNet labels file not found: {path} (CSV lines 'class_id,class name')")
        labels = []
        with open(path, newline="") as f:
            for line_number, row in enumerate(csv.reader(f), start=1):
                if len(row) != 2 or not row[0]:
                    raise ValueError(f"{path}, line {line_number}: expected 'class_id,class name', got {row}")
                labels.append((row[0], row[1]))
        return labels

    def _scan_entries(self) -> List[Tuple[int, int, str, str]]:
        """(actual_index, class_index, class_id, class_name) of every image of the split, in sorted path order."""
        split_dir = os.path.join(self.root, self._split.get_dirname())
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"ImageNet {self._split.name} folder not found: {split_dir}")
        if self._split == _Split.TEST:
            names = sorted(n for n in os.listdir(split_dir) if n.endswith(".JPEG"))
            return [(self._split.parse_image_relpath(n)[1], _TEST_CLASS_INDEX, "", "") for n in names]
        labels = self._load_labels()
        class_indices = {class_id: i for i, (class_id, _) in enumerate(labels)}
        rows = []
        for class_id in sorted(os.listdir(split_dir)):
            class_dir = os.path.join(split_dir, class_id)
            if not os.path.isdir(class_dir):
                continue
            if class_id not in class_indices:
                labels_file = os.path.join(self.root, "labels.txt")
                raise ValueError(f"{class_dir}: class id {class_id!r} is not in {labels_file}")
            class_index = class_indices[class_id]
            class_name = labels[class_index][1]
            for name in sorted(os.listdir(class_dir)):
                if name.endswith(".JPEG"):
                    relpath = os.path.join(self._split.get_dirname(class_id), name)
                    _, actual_index = self._split.parse_image_relpath(relpath)
                    rows.append((actual_index, class_index, class_id, class_name))
        return rows

    def _dump_entries(self) -> None:
        rows = self._scan_entries()
        max_class_id_length = max([len(r[2]) for r in rows] + [1])
        max_class_name_length = max([len(r[3]) for r in rows] + [1])
        dtype = np.dtype(
            [
                ("actual_index", "<u4"),
                ("class_index", "<u4"),
                ("class_id", f"U{max_class_id_length}"),
                ("class_name", f"U{max_class_name_length}"),
            ]
        )
        self._save_extra(np.array(rows, dtype=dtype), self._entries_path)

    def _dump_class_ids_and_names(self) -> None:
        labels = self._load_labels()
        class_ids = np.array([class_id for class_id, _ in labels])
        class_names = np.array([class_name for _, class_name in labels])
        self._save_extra(class_ids, self._class_ids_path)
        self._save_extra(class_names, self._class_names_path)

    def dump_extra(self) -> None:
        """Scan `root` and write this split's metadata files into `extra`."""
        self._dump_entries()
        if self._split != _Split.TEST:
            self._dump_class_ids_and_names()
        self._entries = self._class_ids = self._class_names = None
        logger.info("wrote ImageNet %s metadata for %d images to %s", self._split.name, len(self), self._extra_root)
