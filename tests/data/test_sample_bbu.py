import dataclasses
import filecmp
import json
import os
import runpy

import numpy as np
import pytest
from PIL import Image

from dinov2.data.sample_bbu import DEFECTS, _panel_spec, make_sample_bbu, render_view

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_layout(bbu_sample):
    root, summary = bbu_sample
    assert sorted(os.listdir(root)) == ["annotations", "test", "train", "val"]
    assert {k: len(v) for k, v in summary.items()} == {"train": 6, "val": 2, "test": 2}
    seen_groups = set()
    for split, groups in summary.items():
        with open(os.path.join(root, "annotations", f"{split}.json")) as f:
            content = json.load(f)
        assert content["metainfo"] == {"classes": ["negative", "positive"]}
        expected = [
            {"img_path": f"{split}/{gid}/{gid}-{k}.jpeg", "gt_label": g["label"], "group_id": gid}
            for g in groups
            for gid in [g["group_id"]]
            for k in range(3)
        ]
        assert content["data_list"] == expected
        assert sorted(os.listdir(os.path.join(root, split))) == sorted(g["group_id"] for g in groups)
        assert {g["label"] for g in groups} == {0, 1}
        assert all(g["group_id"].isdigit() and len(g["group_id"]) == 7 for g in groups)
        assert all((g["defect"] in DEFECTS) == (g["label"] == 1) for g in groups)
        ids = {g["group_id"] for g in groups}
        assert not ids & seen_groups
        seen_groups |= ids
        for entry in expected:
            with Image.open(os.path.join(root, entry["img_path"])) as image:
                assert image.format == "JPEG" and image.size == (64, 48) and image.mode == "RGB"


def test_deterministic_for_a_seed(bbu_sample, tmp_path):
    root, summary = bbu_sample
    again = str(tmp_path / "again")
    assert make_sample_bbu(again, groups=10, size=64, seed=3) == summary
    files = _files(root)
    assert files == _files(again)
    assert all(filecmp.cmp(os.path.join(root, f), os.path.join(again, f), shallow=False) for f in files)
    other = make_sample_bbu(str(tmp_path / "other"), groups=10, size=64, seed=4)
    assert other != summary


def test_views_differ_and_defects_are_visible():
    spec = _panel_spec(np.random.default_rng(0), "1015272", 0)
    def render(s, view):
        return np.asarray(render_view(s, np.random.default_rng(view), 128, 96), dtype=np.float32)

    clean = render(spec, 1)
    assert np.array_equal(clean, render(spec, 1))
    assert np.abs(clean - render(spec, 2)).mean() > 3  # another viewpoint/lighting
    for defect in DEFECTS:
        defective = render(dataclasses.replace(spec, label=1, defect=defect), 1)
        changed = np.abs(defective - clean).max(axis=2) > 40
        assert changed.mean() > 0.005, defect  # a visible region of the panel changes


def test_overwrite_and_arguments(tmp_path):
    out = str(tmp_path / "s")
    make_sample_bbu(out, groups=6, size=32)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        make_sample_bbu(out, groups=6, size=32)
    (tmp_path / "s" / "keep.txt").write_text("user file")
    summary = make_sample_bbu(out, groups=8, size=32, seed=1, overwrite=True)
    assert os.path.exists(os.path.join(out, "keep.txt"))
    assert len(os.listdir(os.path.join(out, "train"))) == len(summary["train"]) == 4
    with pytest.raises(ValueError, match="groups must be >= 6"):
        make_sample_bbu(str(tmp_path / "t"), groups=5)


def test_cli(tmp_path, capsys):
    script = runpy.run_path(os.path.join(REPO, "scripts", "make_sample_bbu.py"), run_name="sample_cli")
    out = str(tmp_path / "cli")
    assert script["main"]([out, "--groups", "6", "--size", "100", "--seed", "2", "--views", "2"]) == 0
    assert "train: 2 groups (1 positive) x 2 views" in capsys.readouterr().out
    with open(os.path.join(out, "annotations", "val.json")) as f:
        first = json.load(f)["data_list"][0]["img_path"]
    assert first.endswith("-0.jpeg")
    with Image.open(os.path.join(out, first)) as image:
        assert image.size == (100, 75)
