"""The BBU quality-control dataset: JSON annotations + `{split}/<group_id>/<group_id>-<k>.jpeg` images.

Layout of a dataset root:
    annotations/{train,val,test}.json
    {train,val,test}/<group_id>/<group_id>-<k>.jpeg
Annotation format: {"metainfo": {"classes": [...]}, "data_list": [{"img_path": ..., "gt_label": ..., "group_id": ...}]},
with `img_path` relative to the root. A group is one physical device photographed several times.
"""

import json
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import numpy as np

from .extended import ImageListDataset, SplitEnum

UNLABELLED = -1
NEGATIVE_CLASS = "negative"  # the good class; when present it must be class 0


class _Split(SplitEnum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


@dataclass(frozen=True)
class BBUAnnotations:
    """Column-wise content of one annotation file (UTF-8 bytes arrays stay compact and fork-friendly)."""

    path: str
    class_names: List[str]
    img_paths: np.ndarray  # dtype S, UTF-8
    labels: np.ndarray  # int64, -1 = unlabelled
    group_ids: np.ndarray  # dtype S, UTF-8
    entry_indices: np.ndarray  # int64, position of each kept entry in data_list


def _entry_label(entry: dict, num_classes: int) -> int:
    label = entry.get("gt_label", UNLABELLED)
    if label is None:
        return UNLABELLED
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"gt_label must be an integer, got {label!r}")
    if label != UNLABELLED and not 0 <= label < num_classes:
        raise ValueError(f"gt_label {label} is out of range for {num_classes} classes (0..{num_classes - 1}, or -1)")
    return label


def _entry_group_id(entry: dict, img_path: str) -> str:
    group_id = entry.get("group_id")
    if group_id is None:
        parent = os.path.basename(os.path.dirname(img_path))
        return parent or os.path.basename(img_path)
    if isinstance(group_id, bool) or not isinstance(group_id, (str, int)):
        raise ValueError(f"group_id must be a string or an integer, got {group_id!r}")
    if isinstance(group_id, str) and not group_id.strip():  # would merge every such photo into one device
        raise ValueError(f"empty group_id {group_id!r} (leave the key out to group by the image's folder)")
    return str(group_id)


def load_bbu_annotations(path: str, errors: Optional[List[str]] = None) -> BBUAnnotations:
    """Parse and validate one annotation file (no image I/O).

    File-level problems (missing file, invalid JSON, missing `metainfo`/`classes`/`data_list`) raise. An invalid entry
    raises ValueError naming the file and the entry index, unless `errors` is a list: then the message is appended to it
    and the entry is left out (the dataset checker uses this to report every problem at once).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BBU annotation file not found: {path}")
    try:
        with open(path, "rb") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text: {e}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: the top level must be an object with 'metainfo' and 'data_list'")
    metainfo = content.get("metainfo")
    if not isinstance(metainfo, dict):
        raise ValueError(f"{path}: missing or invalid 'metainfo' (expected an object with 'classes')")
    classes = metainfo.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise ValueError(f"{path}: missing or invalid 'metainfo.classes' (expected a non-empty list of names)")
    if len(set(classes)) != len(classes):
        raise ValueError(f"{path}: 'metainfo.classes' names a class twice: {classes}")
    if NEGATIVE_CLASS in classes and classes[0] != NEGATIVE_CLASS:
        raise ValueError(
            f"{path}: 'metainfo.classes' is {classes}: {NEGATIVE_CLASS!r} must come first (gt_label 0), as the QC "
            "metrics, thresholds and group decisions take class 0 for the good devices and any other for a defect"
        )
    data_list = content.get("data_list")
    if not isinstance(data_list, list):
        raise ValueError(f"{path}: missing or invalid 'data_list' (expected a list of entries)")

    img_paths, labels, group_ids, entry_indices = [], [], [], []
    for index, entry in enumerate(data_list):
        try:
            if not isinstance(entry, dict):
                raise ValueError(f"expected an object, got {type(entry).__name__}")
            img_path = entry.get("img_path")
            if not isinstance(img_path, str) or not img_path:
                raise ValueError("missing or empty 'img_path'")
            label = _entry_label(entry, len(classes))
            group_id = _entry_group_id(entry, img_path)
        except ValueError as e:
            message = f"{path}: data_list[{index}]: {e}"
            if errors is None:
                raise ValueError(message) from None
            errors.append(message)
            continue
        img_paths.append(img_path.encode("utf-8"))
        labels.append(label)
        group_ids.append(group_id.encode("utf-8"))
        entry_indices.append(index)
    return BBUAnnotations(
        path=path,
        class_names=list(classes),
        img_paths=np.array(img_paths, dtype=np.bytes_),
        labels=np.array(labels, dtype=np.int64),
        group_ids=np.array(group_ids, dtype=np.bytes_),
        entry_indices=np.array(entry_indices, dtype=np.int64),
    )


class BBUDataset(ImageListDataset):
    """BBU images with their labels and device groups; `split` picks `annotations/<split>.json` under `root`.

    `annotation_file` (absolute or relative to `root`) reads any other file in the same format instead, e.g. an
    unlabelled pool: a missing or -1 `gt_label` gives target -1. `group_id` defaults to the image's parent folder name.
    Construction reads only the JSON; images are read when a sample is loaded.
    """

    Split = _Split

    def __init__(
        self,
        *,
        root: str,
        split: Union[_Split, str] = _Split.TRAIN,
        annotation_file: Optional[str] = None,
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
        self._split = _Split.parse(split)
        if annotation_file is None:
            annotation_file = os.path.join("annotations", f"{self._split.value}.json")
        self.annotation_file = os.path.join(self.root, annotation_file)
        annotations = load_bbu_annotations(self.annotation_file)
        self._set_samples(annotations.img_paths, annotations.labels, annotations.class_names)
        self._group_ids = annotations.group_ids

    @property
    def split(self) -> _Split:
        return self._split

    def get_group_id(self, index: int) -> str:
        return self._group_ids[index].decode("utf-8")

    def get_group_ids(self) -> np.ndarray:
        return np.char.decode(self._group_ids, "utf-8")

    def extra_repr(self) -> str:
        return f"Split: {self._split.name}\nAnnotation file: {self.annotation_file}\nClasses: {self._class_names}"
