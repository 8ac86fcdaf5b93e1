"""dinov2.data.datasets.image_paths: explicit image files in order, unlabelled, relative to the working directory;
encoded images in memory."""

import pytest
from PIL import Image

from dinov2.data.datasets import EncodedImages, ImageDecodeError, ImagePaths


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


def test_encoded_images_decode_as_their_files(tmp_path):
    """EncodedImages (bytes received in memory) give the images of the same files, under the given names; a
    corrupt one is named."""
    Image.new("RGB", (6, 4), (10, 120, 240)).save(tmp_path / "a.png")
    Image.new("RGB", (5, 3), (200, 0, 0)).save(tmp_path / "b.jpg")
    files = ImagePaths(paths=[tmp_path / "a.png", tmp_path / "b.jpg"])
    sent = EncodedImages(images=[(tmp_path / "a.png").read_bytes(), (tmp_path / "b.jpg").read_bytes()],
                         names=["cam-0", "cam-1"])
    assert len(sent) == 2 and [sent.get_image_path(i) for i in range(2)] == ["cam-0", "cam-1"]
    for i in range(2):
        (image, target), (expected, _) = sent[i], files[i]
        assert target == -1 and image.size == expected.size and image.tobytes() == expected.tobytes()
    with pytest.raises(ImageDecodeError, match="sample 0: cam-9"):
        EncodedImages(images=[b"\xff\xd8 junk"], names=["cam-9"])[0]
    with pytest.raises(ValueError, match="2 images but 1 names"):
        EncodedImages(images=[b"", b""], names=["x"])
