import os

import numpy as np
import pytest
from PIL import Image

from dinov2.data import make_dataset
from dinov2.data.datasets import ImageFolder


def _save(path, colour, size=(12, 10), fmt="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def test_flat_folder_is_unlabelled(tmp_path):
    for name in ("b.jpg", "a.PNG", "c.jpeg"):
        _save(str(tmp_path / name), (200, 0, 0), fmt="PNG" if name.endswith("PNG") else "JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = make_dataset(dataset_str=f"ImageFolder:root={tmp_path}")
    assert isinstance(dataset, ImageFolder)
    assert [dataset.get_image_relpath(i) for i in range(len(dataset))] == ["a.PNG", "b.jpg", "c.jpeg"]
    np.testing.assert_array_equal(dataset.get_targets(), [-1, -1, -1])
    assert dataset.class_names == []
    image, target = dataset[0]
    assert image.size == (12, 10) and image.getpixel((0, 0)) == (200, 0, 0) and target == -1


def test_class_folders(tmp_path):
    _save(str(tmp_path / "ok" / "1.jpg"), (0, 0, 0))
    _save(str(tmp_path / "ok" / "sub" / "2.jpg"), (0, 0, 0))
    _save(str(tmp_path / "defect" / "3.jpg"), (0, 0, 0))
    os.makedirs(tmp_path / "empty")
    dataset = ImageFolder(root=str(tmp_path))
    assert dataset.class_names == ["defect", "ok"]
    expected = [os.path.join("defect", "3.jpg"), os.path.join("ok", "1.jpg"), os.path.join("ok", "sub", "2.jpg")]
    assert [dataset.get_image_relpath(i) for i in range(3)] == expected
    np.testing.assert_array_equal(dataset.get_targets(), [0, 1, 1])
    with open(tmp_path / "ok" / "1.jpg", "rb") as f:
        assert dataset.get_image_data(1) == f.read()


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageFolder root is not a folder: .*missing"):
        ImageFolder(root=str(tmp_path / "missing"))
    os.makedirs(tmp_path / "none")
    with pytest.raises(ValueError, match="no image files"):
        ImageFolder(root=str(tmp_path / "none"))
    _save(str(tmp_path / "mixed" / "top.jpg"), (0, 0, 0))
    _save(str(tmp_path / "mixed" / "cls" / "x.jpg"), (0, 0, 0))
    with pytest.raises(ValueError, match="both images at the top level"):
        ImageFolder(root=str(tmp_path / "mixed"))
