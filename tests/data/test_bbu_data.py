import json
import os

import numpy as np
import pytest
from PIL import Image

from dinov2.data.datasets import BBUDataset, ImageDecodeError



def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f)

SPLITS = {"TRAIN": "train", "VAL": "val", "TEST": "test"}


@pytest.mark.parametrize("split", ["TRAIN", "val", "Test"])
def test_sample_split_contents(bbu_sample, split):
    root, summary = bbu_sample
    groups = summary[split.lower()]
    dataset = BBUDataset(root=root, split=split)
    assert dataset.split == BBUDataset.Split[split.upper()]
    assert len(dataset) == 3 * len(groups)
    assert dataset.class_names == ["negative", "positive"]
    expected_labels = np.repeat([g["label"] for g in groups], 3)
    targets = dataset.get_targets()
    assert targets.dtype == np.int64
    np.testing.assert_array_equal(targets, expected_labels)
    assert [dataset.get_target(i) for i in range(len(dataset))] == expected_labels.tolist()
    expected_groups = np.repeat([g["group_id"] for g in groups], 3)
    np.testing.assert_array_equal(dataset.get_group_ids(), expected_groups)
    assert dataset.get_group_id(4) == expected_groups[4]
    gid = groups[1]["group_id"]
    assert dataset.get_image_relpath(5) == f"{split.lower()}/{gid}/{gid}-2.jpeg"
    assert dataset.get_image_path(5) == os.path.abspath(os.path.join(root, dataset.get_image_relpath(5)))


def test_image_data_and_samples(bbu_sample):
    root, _ = bbu_sample
    dataset = BBUDataset(root=root, split="VAL")
    for index in range(len(dataset)):
        with open(os.path.join(root, dataset.get_image_relpath(index)), "rb") as f:
            assert dataset.get_image_data(index) == f.read()
    image, target = dataset[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 48)
    assert target == dataset.get_target(2)


def test_transforms_applied(bbu_sample):
    root, _ = bbu_sample
    dataset = BBUDataset(root=root, split="TRAIN", transform=lambda im: im.size, target_transform=lambda t: ())
    assert dataset[0] == ((64, 48), ())


def test_unknown_split(bbu_sample):
    with pytest.raises(ValueError, match='unknown split "TRAINING"; allowed: TRAIN, VAL, TEST'):
        BBUDataset(root=bbu_sample[0], split="TRAINING")


def test_unlabelled_pool(bbu_sample, tmp_path):
    root, summary = bbu_sample
    gid = summary["train"][0]["group_id"]
    pool = {
        "metainfo": {"classes": ["negative", "positive"]},
        "data_list": [
            {"img_path": f"train/{gid}/{gid}-0.jpeg"},
            {"img_path": f"train/{gid}/{gid}-1.jpeg", "gt_label": -1},
            {"img_path": f"train/{gid}/{gid}-2.jpeg", "gt_label": None, "group_id": 77},
            {"img_path": f"train/{gid}/{gid}-2.jpeg", "gt_label": 1, "group_id": "g"},
        ],
    }
    write_json(str(tmp_path / "pool.json"), pool)
    dataset = BBUDataset(root=root, annotation_file=str(tmp_path / "pool.json"), target_transform=lambda _: ())
    np.testing.assert_array_equal(dataset.get_targets(), [-1, -1, -1, 1])
    assert dataset.get_group_ids().tolist() == [gid, gid, "77", "g"]
    assert dataset[0][1] == ()
    # relative annotation_file is resolved against the root
    relative = BBUDataset(root=root, annotation_file="annotations/val.json")
    assert len(relative) == len(BBUDataset(root=root, split="VAL"))


def _annotation(entries):
    return {"metainfo": {"classes": ["negative", "positive"]}, "data_list": entries}


GOOD = {"img_path": "train/1/1-0.jpeg", "gt_label": 0, "group_id": "1"}


@pytest.mark.parametrize(
    "content, message",
    [
        ({"data_list": [GOOD]}, r"missing or invalid 'metainfo'"),
        ({"metainfo": {}, "data_list": [GOOD]}, r"missing or invalid 'metainfo.classes'"),
        ({"metainfo": {"classes": ["a"]}}, r"missing or invalid 'data_list'"),
        ([GOOD], r"the top level must be an object"),
        (_annotation([GOOD, {"gt_label": 0}]), r"data_list\[1\]: missing or empty 'img_path'"),
        (_annotation([GOOD, GOOD, dict(GOOD, gt_label=2)]), r"data_list\[2\]: gt_label 2 is out of range for 2 class"),
        (_annotation([dict(GOOD, gt_label=-3)]), r"data_list\[0\]: gt_label -3 is out of range"),
        (_annotation([dict(GOOD, gt_label="1")]), r"data_list\[0\]: gt_label must be an integer, got '1'"),
        (_annotation([GOOD, dict(GOOD, group_id=[1])]), r"data_list\[1\]: group_id must be a string or an integer"),
        (_annotation([GOOD, "train/x.jpeg"]), r"data_list\[1\]: expected an object, got str"),
        (_annotation([GOOD, dict(GOOD, group_id=" ")]), r"data_list\[1\]: empty group_id ' ' \(leave the key out"),
        ({"metainfo": {"classes": ["positive", "negative"]}, "data_list": [GOOD]},
         r"'metainfo.classes' is \['positive', 'negative'\]: 'negative' must come first \(gt_label 0\)"),
        ({"metainfo": {"classes": ["ok", "ok"]}, "data_list": [GOOD]}, r"'metainfo.classes' names a class twice"),
        ({"metainfo": {"classes": ["ok", ""]}, "data_list": [GOOD]}, r"missing or invalid 'metainfo.classes'"),
    ],
)
def test_bad_annotations(tmp_path, content, message):
    path = tmp_path / "annotations" / "train.json"
    write_json(str(path), content)
    with pytest.raises(ValueError, match=message) as info:
        BBUDataset(root=str(tmp_path), split="TRAIN")
    assert str(path) in str(info.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="BBU annotation file not found") as info:
        BBUDataset(root=str(tmp_path), split="VAL")
    assert os.path.join(str(tmp_path), "annotations", "val.json") in str(info.value)


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "annotations" / "test.json"
    path.parent.mkdir()
    # a missing comma: every Python reports it at the same place (a trailing comma moved a column in 3.13)
    path.write_text('{"metainfo": {"classes": ["a"]},\n  "data_list": [\n    {"img_path": "x.jpeg" "gt_label": 0}\n  ]}')
    with pytest.raises(ValueError, match=r"invalid JSON at line 3, column 27: Expecting ',' delimiter") as info:
        BBUDataset(root=str(tmp_path), split="TEST")
    assert str(path) in str(info.value)


def test_missing_image_at_load_time(bbu_copy):
    dataset = BBUDataset(root=bbu_copy, split="TRAIN")
    path = dataset.get_image_path(4)
    os.remove(path)
    with pytest.raises(ImageDecodeError, match="can not read image for sample 4") as info:
        dataset[4]
    assert path in str(info.value) and "FileNotFoundError" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_truncated_image_at_load_time(bbu_copy):
    dataset = BBUDataset(root=bbu_copy, split="VAL")
    path = dataset.get_image_path(3)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="can not read image for sample 3") as info:
        dataset[3]
    assert path in str(info.value) and "truncated" in str(info.value)


def test_garbage_image_at_load_time(bbu_copy):
    dataset = BBUDataset(root=bbu_copy, split="TEST")
    path = dataset.get_image_path(0)
    with open(path, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(RuntimeError, match="can not read image for sample 0") as info:
        dataset[0]
    assert path in str(info.value) and "UnidentifiedImageError" in str(info.value)


def test_skip_bad_images(bbu_copy, caplog):
    dataset = BBUDataset(root=bbu_copy, split="TRAIN", skip_bad_images=True, transform=lambda im: np.asarray(im))
    expected = dataset[2]
    path = dataset.get_image_path(1)
    os.remove(path)
    with caplog.at_level("WARNING", logger="dinov2"):
        image, target = dataset[1]
    np.testing.assert_array_equal(image, expected[0])
    assert target == expected[1]
    assert dataset.num_bad_images == 1
    assert any(path in r.getMessage() and "sample 1" in r.getMessage() for r in caplog.records)


def _write_big_annotation(path, count):
    entries = [
        {"img_path": f"train/{1000000 + i // 3}/{1000000 + i // 3}-{i % 3}.jpeg", "gt_label": (i // 3) % 2}
        for i in range(count)
    ]
    for i in range(0, count, 2):
        entries[i]["group_id"] = str(1000000 + i // 3)
    with open(path, "w") as f:
        json.dump(_annotation(entries), f)


def test_large_annotation_is_parsed_without_image_io(tmp_path):
    count = 100_000
    _write_big_annotation(str(tmp_path / "big.json"), count)
    dataset = BBUDataset(root=str(tmp_path), annotation_file="big.json")
    assert len(dataset) == count
    targets = dataset.get_targets()
    np.testing.assert_array_equal(targets[:6], [0, 0, 0, 1, 1, 1])
    assert int(targets.sum()) == sum((i // 3) % 2 for i in range(count))
    group_ids = dataset.get_group_ids()
    assert len(np.unique(group_ids)) == (count + 2) // 3
    assert group_ids[count - 1] == str(1000000 + (count - 1) // 3)  # from the folder name (odd index)
    last_group = 1000000 + (count - 1) // 3
    assert dataset.get_image_relpath(count - 1) == f"train/{last_group}/{last_group}-0.jpeg"


def test_annotation_round_trip_matches_json(bbu_sample):
    root, _ = bbu_sample
    content = read_json(os.path.join(root, "annotations", "test.json"))
    dataset = BBUDataset(root=root, split="TEST")
    assert [dataset.get_image_relpath(i) for i in range(len(dataset))] == [e["img_path"] for e in content["data_list"]]
    assert dataset.get_group_ids().tolist() == [e["group_id"] for e in content["data_list"]]
