import gzip
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from dinov2.data import make_dataset
from dinov2.data.datasets import ImageNet22k


def _jpeg(value):
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7), (value, 0, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_22k(tmp_path):
    """Two class tarballs; one member is stored gzipped (as some ImageNet-22k files are)."""
    root = tmp_path / "in22k"
    root.mkdir()
    images = {}
    for class_id, values in (("n00000002", (10, 20)), ("n00000001", (30, 40, 50))):
        with tarfile.open(root / f"{class_id}.tar", "w") as tar:
            for value in values:
                name = f"{class_id}_{value}.JPEG"
                images[name] = _jpeg(value)
                _add(tar, name, gzip.compress(images[name]) if value == 40 else images[name])
    extra = str(tmp_path / "extra")
    ImageNet22k(root=str(root), extra=extra).dump_extra()
    return str(root), extra, images


def test_extra_files_use_upstream_format(fake_22k):
    _, extra, _ = fake_22k
    entries = np.load(os.path.join(extra, "entries.npy"))
    assert entries.dtype.names == ("class_index", "class_id", "start_offset", "end_offset", "filename")
    assert [entries.dtype[f] for f in ("class_index", "start_offset", "end_offset")] == [np.dtype("<u4")] * 3
    assert entries[["class_index", "class_id", "filename"]].tolist() == [
        (0, "n00000001", "n00000001_30.JPEG"),
        (0, "n00000001", "n00000001_40.JPEG"),
        (0, "n00000001", "n00000001_50.JPEG"),
        (1, "n00000002", "n00000002_10.JPEG"),
        (1, "n00000002", "n00000002_20.JPEG"),
    ]
    assert np.load(os.path.join(extra, "class-ids.npy")).tolist() == ["n00000001", "n00000002"]


def test_reads_members_by_offset(fake_22k):
    root, extra, images = fake_22k
    dataset = make_dataset(dataset_str=f"ImageNet22k:root={root}:extra={extra}:mmap_cache_size=1")
    assert len(dataset) == 5
    np.testing.assert_array_equal(dataset.get_targets(), [0, 0, 0, 1, 1])
    for index, name in enumerate(["n00000001_30.JPEG", "n00000001_40.JPEG", "n00000001_50.JPEG", "n00000002_10.JPEG"]):
        assert dataset.get_image_data(index) == images[name]  # incl. the gzipped member, with cache eviction
    image, target = dataset[4]
    assert image.size == (9, 7) and abs(image.getpixel((0, 0))[0] - 20) <= 3 and target == 1
    assert dataset.get_image_path(4).endswith("n00000002.tar:n00000002_20.JPEG")
    copy = pickle.loads(pickle.dumps(dataset))  # what DataLoader workers receive
    assert copy.get_image_data(1) == images["n00000001_40.JPEG"]


def test_inconsistent_or_missing_extra(fake_22k, tmp_path):
    root, extra, _ = fake_22k
    np.save(os.path.join(extra, "class-ids.npy"), np.array(["n00000001"]))
    with pytest.raises(ValueError, match=r"entries.npy: entry 3 \(class_index 1, class_id 'n00000002'\) does not"):
        len(ImageNet22k(root=root, extra=extra))
    with pytest.raises(FileNotFoundError, match=r"entries.npy; create it with ImageNet22k\(root="):
        len(ImageNet22k(root=root, extra=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="no <class_id>.tar files in"):
        ImageNet22k(root=str(tmp_path), extra=str(tmp_path / "x")).dump_extra()
