import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image, PngImagePlugin

from dinov2.data.check import check_bbu, main, read_image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _annotation_path(root, split):
    return os.path.join(root, "annotations", f"{split}.json")


def _load(root, split):
    with open(_annotation_path(root, split)) as f:
        return json.load(f)


def _dump(root, split, content):
    with open(_annotation_path(root, split), "w") as f:
        json.dump(content, f)


def test_clean_sample(bbu_sample, capsys):
    root, summary = bbu_sample
    assert main([f"BBU:root={root}"]) == 0
    text = capsys.readouterr().out
    assert "TRAIN  18       6       9         9         0" in text
    assert "most common: 64x48 (30)" in text and "result: OK" in text
    assert main([f"BBU:root={root}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == [] and report["warnings"] == []
    assert report["splits"]["VAL"]["per_class"] == {"negative": 3, "positive": 3, "unlabelled": 0}
    assert report["splits"]["TEST"]["groups"] == len(summary["test"])
    assert report["majority_group_size"] == 3
    assert report["image_sizes"]["width"] == {"min": 64, "median": 64.0, "max": 64}


def test_corrupted_sample_reports_every_error(bbu_copy, capsys):
    root = bbu_copy
    train, val = _load(root, "train"), _load(root, "val")
    leaked = dict(val["data_list"][0])
    train["data_list"].append(leaked)  # a VAL group (and path) also in TRAIN
    train["data_list"].insert(0, {"img_path": "train/x/x-0.jpeg", "gt_label": 5})
    _dump(root, "train", train)
    missing = train["data_list"][1]["img_path"]
    os.remove(os.path.join(root, missing))
    truncated = os.path.join(root, val["data_list"][4]["img_path"])
    data = open(truncated, "rb").read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 3])
    assert main([f"BBU:root={root}", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    kinds = sorted(e["kind"] for e in report["errors"])
    assert kinds == ["annotation", "duplicate_path", "leakage", "missing_image", "unreadable_image"]
    by_kind = {e["kind"]: e["message"] for e in report["errors"]}
    assert "train.json: data_list[0]: gt_label 5 is out of range" in by_kind["annotation"]
    assert by_kind["leakage"] == f"group {leaked['group_id']} is in several splits: TRAIN, VAL"
    assert leaked["img_path"] in by_kind["duplicate_path"]
    assert "TRAIN entry 19, VAL entry 0" in by_kind["duplicate_path"]
    assert missing in by_kind["missing_image"] and "(TRAIN entry 1)" in by_kind["missing_image"]  # file's indices
    assert truncated in by_kind["unreadable_image"] and "VAL entry 4" in by_kind["unreadable_image"]
    assert report["splits"]["TRAIN"]["entries"] == 19  # the bad entry is reported, not counted


def test_warnings_do_not_fail(bbu_copy, capsys):
    root = bbu_copy
    test = _load(root, "test")
    del test["data_list"][1]  # first group now has 2 images
    test["data_list"][3]["gt_label"] = 1 - test["data_list"][3]["gt_label"]  # second group: mixed labels
    _dump(root, "test", test)
    os.remove(_annotation_path(root, "val"))
    assert main([f"BBU:root={root}"]) == 0
    text = capsys.readouterr().out
    group_a, group_b = test["data_list"][0]["group_id"], test["data_list"][3]["group_id"]
    assert f"[group_size] TEST group {group_a}: 2 images (majority 3)" in text
    assert f"[mixed_labels] TEST group {group_b}: labels [0, 1]" in text
    assert "[missing_split] VAL: annotation file not found" in text and "result: OK" in text


def _copy_as(root, entry, split, group_id):
    """A new annotation entry for a byte-for-byte copy of `entry`'s image, filed in `split` under device `group_id`."""
    img_path = f"{split}/{group_id}/{group_id}-0.jpeg"
    os.makedirs(os.path.join(root, split, group_id))
    shutil.copy(os.path.join(root, entry["img_path"]), os.path.join(root, img_path))
    return {**entry, "img_path": img_path, "group_id": group_id}


def test_identical_files_under_other_paths(bbu_copy):
    """A training photo copied into TEST under a new device (leakage the group ids do not show) is an error naming
    both files; a copy within TRAIN under another device is a warning; --no-decode reads no bytes."""
    root = bbu_copy
    train, test = _load(root, "train"), _load(root, "test")
    leaked, twinned = train["data_list"][0], train["data_list"][3]
    test["data_list"].append(_copy_as(root, leaked, "test", "copied"))
    train["data_list"].append(_copy_as(root, twinned, "train", "twin"))
    _dump(root, "train", train)
    _dump(root, "test", test)
    report = check_bbu(root)
    errors = [e["message"] for e in report["errors"] if e["kind"] == "identical_files"]
    warnings = [w["message"] for w in report["warnings"] if w["kind"] == "identical_files"]
    assert errors == [f"identical files: test/copied/copied-0.jpeg (TEST group copied), {leaked['img_path']} "
                      f"(TRAIN group {leaked['group_id']})"]
    assert warnings == [f"identical files: {twinned['img_path']} (TRAIN group {twinned['group_id']}), "
                        "train/twin/twin-0.jpeg (TRAIN group twin)"]
    assert [e["kind"] for e in report["errors"]] == ["identical_files"]
    assert not [e for e in check_bbu(root, decode=False)["errors"] + check_bbu(root, decode=False)["warnings"]
                if e["kind"] == "identical_files"]


def test_no_decode_only_checks_existence(bbu_copy):
    path = os.path.join(bbu_copy, _load(bbu_copy, "train")["data_list"][2]["img_path"])
    with open(path, "wb") as f:
        f.write(b"garbage")
    assert check_bbu(bbu_copy, decode=False)["errors"] == []
    errors = check_bbu(bbu_copy, splits=["train"])["errors"]
    assert [e["kind"] for e in errors] == ["unreadable_image"] and path in errors[0]["message"]


def test_invalid_json_is_an_error_not_a_crash(bbu_copy):
    with open(_annotation_path(bbu_copy, "val"), "w") as f:
        f.write("{")
    report = check_bbu(bbu_copy)
    assert [e["kind"] for e in report["errors"]] == ["annotation"]
    assert "val.json: invalid JSON at line 1" in report["errors"][0]["message"]
    assert sorted(report["splits"]) == ["TEST", "TRAIN"]


def test_rejects_other_datasets(capsys):
    with pytest.raises(SystemExit) as info:
        main(["ImageFolder:root=/tmp"])
    assert info.value.code == 2 and "handles BBU datasets" in capsys.readouterr().err


def test_script_entry_point(bbu_sample):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "check_dataset.py"), f"BBU:root={bbu_sample[0]}:split=val"]
        + ["--no-decode"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "VAL    6" in result.stdout and "TRAIN" not in result.stdout


def test_read_image_reports_a_png_pillow_refuses_with_value_error(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)
    path = str(tmp_path / "text.png")
    Image.new("L", (4, 4)).save(path, pnginfo=info)
    status, size, message = read_image(path, decode=True)
    assert (status, size) == ("unreadable", None)
    assert message.lower().startswith(f"unreadable image: {path}: ValueError: Decompressed data too large".lower())
