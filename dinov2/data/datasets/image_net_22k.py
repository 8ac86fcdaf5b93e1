"""`ImageNet22k`: one uncompressed tarball per class (`root/<class_id>.tar`), images read by byte range from mmaps.

extra (written by `ImageNet22k(root=..., extra=...).dump_extra()`): `entries.npy` (structured: class_index <u4,
class_id U, start_offset <u4, end_offset <u4, filename U) and `class-ids.npy` (class ids in class-index order,
i.e. sorted tarball names). Members stored gzip-compressed inside a tarball are decompressed on read.
"""

import gzip
import logging
import mmap
import os
import tarfile
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .extended import ExtendedVisionDataset
from .image_net import ExtraMetadataMixin, mismatched_class_entries

logger = logging.getLogger("dinov2")

_ENTRY_FIELDS = ("class_index", "class_id", "start_offset", "end_offset", "filename")
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_OFFSET = np.iinfo(np.uint32).max


class ImageNet22k(ExtraMetadataMixin, ExtendedVisionDataset):
    """ImageNet-22k (or any set of per-class tarballs); target = class index. At most `mmap_cache_size` tarballs are
    mapped at once per process (least recently used ones are closed)."""

    def __init__(
        self,
        *,
        root: str,
        extra: str,
        transforms: Optional[Callable] = None,
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        mmap_cache_size: int = 16,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(
            root,
            transforms=transforms,
            transform=transform,
            target_transform=target_transform,
            skip_bad_images=skip_bad_images,
        )
        if mmap_cache_size < 1:
            raise ValueError(f"mmap_cache_size must be >= 1, got {mmap_cache_size}")
        self._extra_root = extra
        self._mmap_cache_size = mmap_cache_size
        self._mmaps: "OrderedDict[str, mmap.mmap]" = OrderedDict()
        self._entries: Optional[np.ndarray] = None
        self._class_ids: Optional[np.ndarray] = None

    def __getstate__(self) -> Dict[str, Any]:
        # mmaps do not pickle (DataLoader workers): each process maps its own.
        state = self.__dict__.copy()
        state["_mmaps"] = OrderedDict()
        return state

    def _dump_extra_call(self) -> str:
        return f"ImageNet22k(root={self.root!r}, extra={self._extra_root!r}).dump_extra()"

    def _load_metadata(self) -> None:
        entries = self._load_entries("entries.npy", _ENTRY_FIELDS)
        class_ids = self._load_extra("class-ids.npy")
        bad = mismatched_class_entries(entries, class_ids)
        if not len(bad):
            bad = np.flatnonzero(np.asarray(entries["end_offset"]) < np.asarray(entries["start_offset"]))
        if len(bad):
            raise self._bad_entry_error(
                "entries.npy", entries, bad[0], "class-ids.npy", len(class_ids), " or has a negative size"
            )
        self._entries, self._class_ids = entries, class_ids

    def _tarball_path(self, class_id: str) -> str:
        return os.path.join(self.root, f"{class_id}.tar")

    def _get_mmap(self, class_id: str) -> mmap.mmap:
        mapped = self._mmaps.get(class_id)
        if mapped is not None:
            self._mmaps.move_to_end(class_id)
            return mapped
        with open(self._tarball_path(class_id), "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._mmaps[class_id] = mapped
        if len(self._mmaps) > self._mmap_cache_size:
            _, oldest = self._mmaps.popitem(last=False)
            oldest.close()
        return mapped

    def get_class_id(self, index: int) -> str:
        return str(self._get_entries()[index]["class_id"])

    def find_class_id(self, class_index: int) -> str:
        self._get_entries()
        return str(self._class_ids[class_index])

    def get_image_path(self, index: int) -> str:
        entry = self._get_entries()[index]
        return f"{os.path.abspath(self._tarball_path(str(entry['class_id'])))}:{entry['filename']}"

    def get_image_data(self, index: int) -> bytes:
        entry = self._get_entries()[index]
        data = self._get_mmap(str(entry["class_id"]))[int(entry["start_offset"]) : int(entry["end_offset"])]
        if data[:2] == _GZIP_MAGIC:
            data = gzip.decompress(data)
        return data

    def get_target(self, index: int) -> int:
        return int(self._get_entries()[index]["class_index"])

    def get_targets(self) -> np.ndarray:
        return np.asarray(self._get_entries()["class_index"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._get_entries())

    def _scan_tarballs(self) -> Tuple[List[Tuple[int, str, int, int, str]], List[str]]:
        names = sorted(n for n in os.listdir(self.root) if n.endswith(".tar"))
        if not names:
            raise FileNotFoundError(f"ImageNet22k: no <class_id>.tar files in {self.root}")
        class_ids = [n[: -len(".tar")] for n in names]
        rows = []
        for class_index, class_id in enumerate(class_ids):
            path = self._tarball_path(class_id)
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    start, end = member.offset_data, member.offset_data + member.size
                    if end > _MAX_OFFSET:
                        raise ValueError(f"{path}: member {member.name} ends beyond 4 GiB, unsupported by entries.npy")
                    rows.append((class_index, class_id, start, end, os.path.basename(member.name)))
        return rows, class_ids

    def dump_extra(self) -> None:
        """Index every tarball in `root` and write `entries.npy` and `class-ids.npy` into `extra`."""
        rows, class_ids = self._scan_tarballs()
        dtype = np.dtype(
            [
                ("class_index", "<u4"),
                ("class_id", f"U{max(len(c) for c in class_ids)}"),
                ("start_offset", "<u4"),
                ("end_offset", "<u4"),
                ("filename", f"U{max([len(r[4]) for r in rows] + [1])}"),
            ]
        )
        self._save_extra(np.array(rows, dtype=dtype), "entries.npy")
        self._save_extra(np.array(class_ids), "class-ids.npy")
        self._entries = self._class_ids = None
        logger.info(
            "wrote ImageNet22k metadata for %d images in %d classes to %s", len(self), len(class_ids), self._extra_root
        )
