import os

import numpy as np
import pytest
from PIL import Image

from dinov2.data import make_dataset
from dinov2.data.datasets import ImageNet

CLASSES = [("n01440764", "tench, Tinca tinca"), ("n01443537", "goldfish"), ("n01484850", "great white shark")]


def _save(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 6), (value, value, value)).save(path, format="JPEG")


@pytest.fixture
def fake_imagenet(tmp_path):
    """A 3-class subset: train images for classes 0 and 2 only, val for classes 0 and 1, 3 test images."""
    root = tmp_path / "imagenet"
    root.mkdir()
    (root / "labels.txt").write_text("".join(f'{cid},"{name}"\n' for cid, name in CLASSES))
    for class_id, n in (("n01440764", 10), ("n01440764", 2), ("n01484850", 7)):
        _save(str(root / "train" / class_id / f"{class_id}_{n}.JPEG"), n)
    for class_id, n in (("n01443537", 3), ("n01440764", 12)):
        _save(str(root / "val" / class_id / f"ILSVRC2012_val_{n:08d}.JPEG"), n)
    for n in (5, 1, 2):
        _save(str(root / "test" / f"ILSVRC2012_test_{n:08d}.JPEG"), n)
    extra = tmp_path / "extra"
    for split in ("TRAIN", "VAL", "TEST"):
        ImageNet(split=split, root=str(root), extra=str(extra)).dump_extra()
    return str(root), str(extra)


def test_extra_files_use_upstream_format(fake_imagenet):
    root, extra = fake_imagenet
    assert sorted(os.listdir(extra)) == sorted(
        ["entries-TRAIN.npy", "entries-VAL.npy", "entries-TEST.npy"]
        + [f"class-{kind}-{s}.npy" for kind in ("ids", "names") for s in ("TRAIN", "VAL")]
    )
    entries = np.load(os.path.join(extra, "entries-TRAIN.npy"))
    assert entries.dtype.names == ("actual_index", "class_index", "class_id", "class_name")
    assert entries.dtype["actual_index"] == np.dtype("<u4") and entries.dtype["class_index"] == np.dtype("<u4")
    assert entries.tolist() == [
        (10, 0, "n01440764", "tench, Tinca tinca"),
        (2, 0, "n01440764", "tench, Tinca tinca"),
        (7, 2, "n01484850", "great white shark"),
    ]
    assert np.load(os.path.join(extra, "class-ids-VAL.npy")).tolist() == [c for c, _ in CLASSES]
    assert np.load(os.path.join(extra, "class-names-TRAIN.npy")).tolist() == [n for _, n in CLASSES]
    test_entries = np.load(os.path.join(extra, "entries-TEST.npy"))
    assert test_entries["actual_index"].tolist() == [1, 2, 5]
    assert test_entries["class_index"].tolist() == [np.iinfo(np.uint32).max] * 3


def test_subset_datasets(fake_imagenet):
    root, extra = fake_imagenet
    train = make_dataset(dataset_str=f"ImageNet:split=TRAIN:root={root}:extra={extra}")
    assert len(train) == 3
    np.testing.assert_array_equal(train.get_targets(), [0, 0, 2])
    assert train.get_image_relpath(1) == os.path.join("train", "n01440764", "n01440764_2.JPEG")
    assert train.get_class_name(2) == "great white shark" and train.find_class_id(1) == "n01443537"
    image, target = train[2]
    assert image.mode == "RGB" and abs(image.getpixel((0, 0))[0] - 7) <= 2 and target == 2
    val = ImageNet(split="VAL", root=root, extra=extra)
    assert [val.get_image_relpath(i) for i in range(2)] == [
        os.path.join("val", "n01440764", "ILSVRC2012_val_00000012.JPEG"),
        os.path.join("val", "n01443537", "ILSVRC2012_val_00000003.JPEG"),
    ]
    np.testing.assert_array_equal(val.get_targets(), [0, 1])
    test = ImageNet(split="TEST", root=root, extra=extra)
    assert len(test) == 3 and test.get_targets() is None and test.get_target(0) is None
    assert test.get_image_relpath(2) == os.path.join("test", "ILSVRC2012_test_00000005.JPEG")
    with open(os.path.join(root, "test", "ILSVRC2012_test_00000005.JPEG"), "rb") as f:
        assert test.get_image_data(2) == f.read()


def test_inconsistent_extra_files_are_reported(fake_imagenet):
    root, extra = fake_imagenet
    np.save(os.path.join(extra, "class-ids-TRAIN.npy"), np.array(["n01440764", "n01443537"]))
    np.save(os.path.join(extra, "class-names-TRAIN.npy"), np.array(["tench", "goldfish"]))
    dataset = ImageNet(split="TRAIN", root=root, extra=extra)
    message = r"entries-TRAIN.npy: entry 2 \(class_index 2, class_id 'n01484850'\) does not match"
    with pytest.raises(ValueError, match=message):
        len(dataset)
    np.save(os.path.join(extra, "class-names-VAL.npy"), np.array(["tench"]))
    with pytest.raises(ValueError, match=r"class-ids-VAL.npy has 3 classes but .*class-names-VAL.npy has 1"):
        len(ImageNet(split="VAL", root=root, extra=extra))


def test_missing_files_are_reported(fake_imagenet, tmp_path):
    root, _ = fake_imagenet
    with pytest.raises(FileNotFoundError, match=r"entries-VAL.npy; create it with ImageNet\(split='VAL'"):
        len(ImageNet(split="val", root=root, extra=str(tmp_path / "nothing")))
    os.remove(os.path.join(root, "labels.txt"))
    with pytest.raises(FileNotFoundError, match="ImageNet labels file not found: .*labels.txt"):
        ImageNet(split="TRAIN", root=root, extra=str(tmp_path / "e2")).dump_extra()


def test_unknown_class_folder(fake_imagenet, tmp_path):
    root, _ = fake_imagenet
    _save(os.path.join(root, "train", "n99999999", "n99999999_1.JPEG"), 1)
    with pytest.raises(ValueError, match="class id 'n99999999' is not in .*labels.txt"):
        ImageNet(split="TRAIN", root=root, extra=str(tmp_path / "e3")).dump_extra()
