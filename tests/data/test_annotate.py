"""dinov2.data.annotate: annotation files for folders of new images, read back by BBUDataset."""

import json

import pytest
from PIL import Image

from dinov2.data import make_dataset
from dinov2.data.annotate import annotate_folder, main


def make_images(folder, names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (10, 20, 30)).save(path)


def test_group_folders_become_unlabelled_bbu_entries(tmp_path, capsys):
    make_images(tmp_path / "line" / "day1", ["77/77-1.jpeg", "77/77-0.jpeg", "5/sub/5-0.png", "5/5-1.jpg"])
    (tmp_path / "line" / "day1" / "77" / "notes.txt").write_text("not an image")
    assert main([str(tmp_path), "line/day1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{tmp_path}/annotations/line_day1.json: 4 images in 2 groups",
                   f"BBU:root={tmp_path}:annotation_file=annotations/line_day1.json"]
    content = json.loads((tmp_path / "annotations" / "line_day1.json").read_text())
    assert content == {"metainfo": {"classes": ["negative", "positive"]}, "data_list": [
        {"img_path": "line/day1/5/5-1.jpg", "group_id": "5"},
        {"img_path": "line/day1/5/sub/5-0.png", "group_id": "5"},
        {"img_path": "line/day1/77/77-0.jpeg", "group_id": "77"},
        {"img_path": "line/day1/77/77-1.jpeg", "group_id": "77"}]}
    dataset = make_dataset(dataset_str=out[1], transform=None)
    assert len(dataset) == 4 and dataset.get_targets().tolist() == [-1] * 4
    assert dataset.get_group_ids().tolist() == ["5", "5", "77", "77"]
    image, target = dataset[3]
    assert image.size == (8, 6) and target == -1


def test_names_give_the_groups_of_a_flat_folder(tmp_path):
    make_images(tmp_path / "flat", ["a-b-0.jpg", "a-b-1.jpg", "c-0.jpg"])
    content = annotate_folder(str(tmp_path), "flat", group_from="name", classes=["ok", "bad"])
    assert [e["group_id"] for e in content["data_list"]] == ["a-b", "a-b", "c"]
    assert content["metainfo"]["classes"] == ["ok", "bad"]
    make_images(tmp_path / "flat", ["nodash.jpg"])
    with pytest.raises(ValueError, match="flat/nodash.jpg: --group-from name needs file names <group_id>-<k>"):
        annotate_folder(str(tmp_path), "flat", group_from="name")


def test_bad_folders_and_existing_files_are_refused(tmp_path, capsys):
    make_images(tmp_path / "flat", ["1-0.jpg"])
    with pytest.raises(ValueError, match=r"flat/1-0.jpg is not in a group folder .*--group-from name"):
        annotate_folder(str(tmp_path), "flat")
    with pytest.raises(FileNotFoundError, match="image folder not found: .*/nope"):
        annotate_folder(str(tmp_path), "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no image files \(.jpg"):
        annotate_folder(str(tmp_path), "empty")
    existing = tmp_path / "annotations" / "test.json"
    existing.parent.mkdir()
    existing.write_text("labelled")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "flat", "--group-from", "name", "--output", "annotations/test.json"])
    assert exit_info.value.code == 2 and "test.json exists: pass --force" in capsys.readouterr().err
    assert existing.read_text() == "labelled"
    assert main([str(tmp_path), "flat", "--group-from", "name", "--output", "annotations/test.json", "--force"]) == 0
    assert json.loads(existing.read_text())["data_list"] == [{"img_path": "flat/1-0.jpg", "group_id": "1"}]


def test_check_leaves_unreadable_images_out_and_lists_them(tmp_path, capsys):
    make_images(tmp_path / "day2", ["3/3-0.jpeg", "3/3-1.jpeg", "4/4-0.jpeg", "4/4-1.jpeg"])
    good = (tmp_path / "day2" / "3" / "3-0.jpeg").read_bytes()
    (tmp_path / "day2" / "3" / "3-1.jpeg").write_bytes(good[: len(good) // 2])  # a truncated camera file
    (tmp_path / "day2" / "4" / "4-1.jpeg").write_bytes(b"")  # a zero-byte copy
    assert main([str(tmp_path), "day2", "--check", "--num-workers", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"{tmp_path}/annotations/day2.json: 2 images in 2 groups"
    report = tmp_path / "annotations" / "day2.unreadable.json"
    assert captured.err.splitlines()[0] == f"2 unreadable images left out, listed in {report}:"
    content = json.loads((tmp_path / "annotations" / "day2.json").read_text())
    assert [e["img_path"] for e in content["data_list"]] == ["day2/3/3-0.jpeg", "day2/4/4-0.jpeg"]
    unreadable = json.loads(report.read_text())
    assert unreadable["folder"] == "day2"
    assert [(e["img_path"], e["group_id"]) for e in unreadable["unreadable"]] == [("day2/3/3-1.jpeg", "3"),
                                                                                  ("day2/4/4-1.jpeg", "4")]
    assert all(e["problem"].startswith(f"unreadable image: {tmp_path}/day2/") for e in unreadable["unreadable"])
    # without --check every file is listed; a clean --check run removes the earlier list
    assert main([str(tmp_path), "day2", "--force"]) == 0
    assert len(json.loads((tmp_path / "annotations" / "day2.json").read_text())["data_list"]) == 4
    for name in ("3/3-1.jpeg", "4/4-1.jpeg"):
        (tmp_path / "day2" / name).write_bytes(good)
    assert main([str(tmp_path), "day2", "--force", "--check"]) == 0
    assert not report.exists()
    for name in ("3/3-0.jpeg", "3/3-1.jpeg", "4/4-0.jpeg", "4/4-1.jpeg"):
        (tmp_path / "day2" / name).write_bytes(b"junk")
    with pytest.raises(SystemExit):
        main([str(tmp_path), "day2", "--force", "--check"])
    assert "no readable image below" in capsys.readouterr().err
