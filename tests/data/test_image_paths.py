"""dinov2.data.datasets.image_paths: explicit image files in order, unlabelled, relative to the working directory."""

import pytest
from PIL import Image

from dinov2.data.datasets import ImageDecodeError, ImagePaths


def test_files_in_the_given_order(tmp_path, monkeypatch):
    for name, colour in (("b.jpg", (200, 0, 0)), ("a.png", (0, 200, 0))):
        Image.new("RGB", (6, 4), colour).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    dataset = ImagePaths(paths=[tmp_path / "b.jpg", "a.png"])
    assert len(dataset) == 2 and dataset.class_names == [] and dataset.get_targets().tolist() == [-1, -1]
    assert [dataset.get_image_path(i) for i in range(2)] == [str(tmp_path / "b.jpg"), str(tmp_path / "a.png")]
    (red, _), (green, target) = dataset[0], dataset[1]
    assert green.getpixel((0, 0)) == (0, 200, 0) and target == -1  # PNG: exact
    r, g, b = red.getpixel((0, 0))
    assert r > 180 and g < 20 and b < 20  # JPEG: within its rounding
    with pytest.raises(ImageDecodeError, match="sample 0: .*missing.jpg"):
        ImagePaths(paths=["missing.jpg"])[0]
