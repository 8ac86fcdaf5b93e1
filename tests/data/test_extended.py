import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from dinov2.data.datasets import ExtendedVisionDataset, ImageDecodeError


def _jpeg(colour, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_la():
    buffer = io.BytesIO()
    Image.new("LA", (8, 8), (100, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


class InMemory(ExtendedVisionDataset):
    def __init__(self, blobs, **kwargs):
        super().__init__("memory", **kwargs)
        self.blobs = blobs

    def get_image_data(self, index):
        return self.blobs[index]

    def get_target(self, index):
        return index * 10

    def get_image_path(self, index):
        return f"/memory/{index}.jpeg"

    def __len__(self):
        return len(self.blobs)


class Recorder:
    def __init__(self, accepts):
        if accepts:
            self.accepts_unloaded_image = True
        self.seen = []

    def __call__(self, image):
        self.seen.append((image.mode, len(getattr(image, "tile", []) or [])))
        return image.convert("RGB")


def test_default_transform_gets_loaded_rgb():
    recorder = Recorder(accepts=False)
    dataset = InMemory([_png_la()], transform=recorder)
    image, target = dataset[0]
    assert recorder.seen == [("RGB", 0)]
    assert image.getpixel((0, 0)) == (100, 100, 100) and target == 0


def test_lazy_transform_gets_unloaded_image():
    recorder = Recorder(accepts=True)
    dataset = InMemory([_jpeg((255, 0, 0))], transform=recorder)
    dataset[0]
    mode, pending_tiles = recorder.seen[0]
    assert mode == "RGB" and pending_tiles == 1  # header read, pixels not decoded yet
    la = Recorder(accepts=True)
    InMemory([_png_la()], transform=la)[0]
    assert la.seen[0][0] == "LA"  # no conversion: the transform gets the file's own mode


def test_decode_error_inside_lazy_transform_names_path_and_index():
    data = _jpeg((0, 255, 0), size=(64, 64))
    dataset = InMemory([data, data[: len(data) // 2]], transform=Recorder(accepts=True))
    dataset[0]
    message = r"can not read image for sample 1: /memory/1.jpeg: OSError: .*(?i:truncated)"
    with pytest.raises(ImageDecodeError, match=message):
        dataset[1]


def test_decompression_bomb_is_reported(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    dataset = InMemory([_jpeg((0, 0, 0), size=(40, 30))])
    with pytest.raises(ImageDecodeError, match=r"sample 0: /memory/0.jpeg: DecompressionBombError"):
        dataset[0]


def test_an_oversized_png_text_chunk_is_reported_like_a_corrupt_image():
    """Pillow raises ValueError (not OSError) for a PNG text chunk that decompresses beyond MAX_TEXT_CHUNK."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)
    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="PNG", pnginfo=info)
    dataset = InMemory([buffer.getvalue()])
    message = r"sample 0: /memory/0.jpeg: ValueError: (?i:decompressed data too large)"  # capitalised in Pillow 10
    with pytest.raises(ImageDecodeError, match=message):
        dataset[0]
    dataset = InMemory([buffer.getvalue(), _jpeg((0, 0, 0))], skip_bad_images=True)
    assert dataset[0][1] == 10 and dataset.num_bad_images == 1


def test_skip_bad_images_replaces_and_counts(caplog):
    good = [_jpeg((10 * i, 0, 0)) for i in range(4)]
    dataset = InMemory([good[0], b"broken", b"broken", good[3]], skip_bad_images=True)
    with caplog.at_level("WARNING", logger="dinov2"):
        image, target = dataset[1]
    assert target == 30 and dataset.num_bad_images == 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "/memory/1.jpeg" in messages[0] and "/memory/2.jpeg" in messages[1]
    dataset.blobs = [b"broken"] * 2
    with pytest.raises(ImageDecodeError, match="all 2 samples failed"):
        dataset[0]


def test_without_skip_a_bad_image_raises():
    dataset = InMemory([b"broken"])
    with pytest.raises(RuntimeError, match="can not read image for sample 0: /memory/0.jpeg"):
        dataset[0]


def test_subclass_must_implement_the_interface():
    class Incomplete(ExtendedVisionDataset):
        def get_image_data(self, index):
            return b""

    with pytest.raises(TypeError, match="abstract"):
        Incomplete("x")


def test_transforms_pair_is_applied():
    dataset = InMemory([_jpeg((0, 0, 255))], transforms=lambda im, t: (np.asarray(im).shape, t + 1))
    assert dataset[0] == ((30, 40, 3), 1)
