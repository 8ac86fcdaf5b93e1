"""dinov2/data/gpu_augmentations.py on the CPU: worker transform, collate, device-side rendering and colour ops."""

import contextlib
import io
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from data_helpers import binomial_ok
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from dinov2.configs import dinov2_default_config
from dinov2.data import DataAugmentationDINO, MaskingGenerator, collate_data_and_cast
from dinov2.data.augmentations import COLOR_JITTER_PROB, GRAYSCALE_PROB, HFLIP_PROB, make_augmentation_from_cfg
from dinov2.data.collate import MASK_KEYS
from dinov2.data.datasets.decoders import EncodedImage
from dinov2.data.datasets.extended import ImageDecodeError
from dinov2.data.fast_crops import CropParams
from dinov2.data.gpu_augmentations import (
    EncodedCropsTransform,
    GPUMultiCropAugmentation,
    collate_encoded_crops,
    color_jitter,
    gaussian_blur,
    on_side_stream,
)
from dinov2.data.loaders import make_dataset
from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

STD_255 = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255
GRID = 4  # 64 px global crops, patch 16
MASK_ARGS = dict(mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, n_tokens=GRID * GRID,
                 mask_generator=MaskingGenerator(input_size=(GRID, GRID), max_num_patches=0.5 * GRID * GRID))  # fmt: skip


def _photo_jpeg(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A photo-like JPEG: gradient, noise and coloured rectangles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([xx / width * 200, yy / height * 200, (xx + yy) / (width + height) * 255], axis=-1)
    image = Image.fromarray(np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        draw.rectangle((x0, y0, x0 + 40, y0 + 30), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    out = io.BytesIO()
    image.convert(mode).save(out, "JPEG", quality=92)
    return out.getvalue()


def _aug(n_local: int = 2) -> DataAugmentationDINO:
    return DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), n_local, global_crops_size=64, local_crops_size=32,
                                fast=False)  # fmt: skip


def _plain(box, size, flip=False) -> CropParams:
    return CropParams(box=box, size=size, flip=flip, jitter=None, grayscale=False, blur_sigma=None, solarize=False)


def _render(samples, dtype=torch.float32, decode_batch_size=16):
    batch = collate_encoded_crops([(s, ()) for s in samples], **MASK_ARGS)
    return GPUMultiCropAugmentation(dtype, decode_batch_size)(batch, torch.device("cpu"))


def test_worker_transform_forwards_jpeg_bytes_and_decodes_other_formats():
    transform = EncodedCropsTransform(_aug())
    jpeg = _photo_jpeg(120, 90)
    out = transform(EncodedImage(jpeg, "/data/a.jpg"))
    assert out["pixels"] is None and bytes(out["encoded"].numpy()) == jpeg and out["path"] == "/data/a.jpg"
    assert [c.size for c in out["crops"]] == [64, 64, 32, 32]

    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, "PNG")
    trailing_data = jpeg + b"trailing"  # valid JPEG with data after the end marker: decoded by PIL in the worker
    for data in (png.getvalue(), trailing_data):
        out = transform(EncodedImage(data, "/data/b"))
        assert out["encoded"] is None and out["pixels"].shape == (3, 90, 120) and out["pixels"].dtype == torch.uint8
    assert transform.num_decoded_here == 2
    padded = transform(EncodedImage(jpeg + bytes(64), "/data/c"))  # zero padding after the marker: still forwarded
    assert padded["pixels"] is None and bytes(padded["encoded"].numpy()) == jpeg + bytes(64)


def test_resized_crops_match_pil_bicubic():
    """Geometry without colour ops: crop + bicubic resize + flip against torchvision's PIL pipeline (same decoder)."""
    jpeg = _photo_jpeg(400, 300)
    boxes = [((13, 7, 313, 267), 64, False), ((100, 40, 260, 200), 64, True), ((0, 0, 400, 300), 32, False),
             ((50, 60, 130, 140), 32, True)]  # fmt: skip
    sample = {"encoded": torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), "pixels": None, "path": "p",
              "crops": [_plain(box, size, flip) for box, size, flip in boxes]}  # fmt: skip
    out = _render([sample])
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    crops = list(out["collated_global_crops"]) + list(out["collated_local_crops"])
    for crop, (box, size, flip) in zip(crops, boxes):
        left, top, right, bottom = box
        ref = TF.resized_crop(image, top, left, bottom - top, right - left, [size, size],
                              TF.InterpolationMode.BICUBIC, antialias=True)  # fmt: skip
        ref = TF.hflip(ref) if flip else ref
        ref = TF.normalize(TF.to_dtype(TF.pil_to_tensor(ref), torch.float32, scale=True), IMAGENET_DEFAULT_MEAN,
                           IMAGENET_DEFAULT_STD)  # fmt: skip
        diff = ((crop - ref) * STD_255).abs()
        assert diff.mean() < 0.5 and diff.max() < 2.0, (box, diff.mean().item(), diff.max().item())


def test_colour_jitter_in_each_crops_order_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    n = 8
    x = torch.rand(n, 3, 12, 10, generator=g)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])
    factors = torch.stack([torch.rand(n, generator=g) * 0.8 + 0.6, torch.rand(n, generator=g) * 0.8 + 0.6,
                           torch.rand(n, generator=g) * 0.4 + 0.8, torch.rand(n, generator=g) * 0.2 - 0.1], dim=1)
    apply = torch.tensor([True, True, False, True, True, True, False, True])
    out = color_jitter(x, apply, order, factors)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(n):
        ref = x[i]
        if apply[i]:
            for op in order[i].tolist():
                ref = ops[op](ref, factors[i, op].item())
        torch.testing.assert_close(out[i], ref, atol=2e-5, rtol=0, msg=f"crop {i}, order {order[i].tolist()}")


def test_colour_jitter_runs_each_operation_once_on_each_jittered_crop(monkeypatch):
    """The work of 4 passes, not 16: every jittered crop goes through each of the 4 operations once, in its own order,
    and the crops without jitter through none (and come back unchanged)."""
    import dinov2.data.gpu_augmentations as gpu_augmentations

    calls = []
    jitter_op = gpu_augmentations._jitter_op

    def recording_op(x, op, factor):
        calls.append((op, x.shape[0]))
        return jitter_op(x, op, factor)

    monkeypatch.setattr(gpu_augmentations, "_jitter_op", recording_op)
    g = torch.Generator().manual_seed(3)
    n = 10
    x = torch.rand(n, 3, 6, 5, generator=g)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])
    factors = torch.full((n, 4), 0.9)
    apply = torch.tensor([True] * 7 + [False] * 3)
    out = color_jitter(x, apply, order, factors)
    assert len(calls) <= 16
    assert {op: sum(k for o, k in calls if o == op) for op in range(4)} == {op: 7 for op in range(4)}
    assert torch.equal(out[7:], x[7:])
    assert not torch.equal(out[:7], x[:7])
    calls.clear()
    assert color_jitter(x, torch.zeros(n, dtype=torch.bool), order, factors) is x and calls == []


def test_blur_grayscale_solarize_match_torchvision():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 20, 16, generator=g)
    sigma = torch.tensor([0.0, 0.1, 0.9, 2.0])
    out = gaussian_blur(x, sigma)
    torch.testing.assert_close(out[0], x[0], atol=0, rtol=0)
    for i in range(1, 4):
        ref = TF.gaussian_blur(x[i], [9, 9], [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)

    # flip, grayscale and solarize through the device stage on a constant-colour JPEG
    sample = {"encoded": None, "pixels": torch.tensor([200, 40, 90], dtype=torch.uint8).view(3, 1, 1).expand(3, 40, 40),
              "path": "p", "crops": [
                  CropParams((0, 0, 40, 40), 64, False, None, True, None, False),
                  CropParams((0, 0, 40, 40), 64, False, None, False, None, True)]}  # fmt: skip
    crops = _render([sample])["collated_global_crops"] * STD_255 + torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255
    gray = 0.2989 * 200 + 0.587 * 40 + 0.114 * 90
    torch.testing.assert_close(crops[0], torch.full_like(crops[0], gray), atol=1e-3, rtol=0)
    solarized = torch.tensor([255.0 - 200, 40, 90]).view(3, 1, 1).expand_as(crops[1])
    torch.testing.assert_close(crops[1], solarized, atol=1e-3, rtol=0)


def test_collated_parameters_are_the_sampled_ones():
    aug = _aug(n_local=3)
    torch.manual_seed(0)
    samples = [EncodedCropsTransform(aug)(EncodedImage(_photo_jpeg(160, 120, seed=k), f"img{k}")) for k in range(5)]
    batch = collate_encoded_crops([(s, ()) for s in samples], **MASK_ARGS)
    crops = [samples[i]["crops"][j] for j in range(2, 5) for i in range(5)]  # crop-major
    assert batch["local_crop_image"].tolist() == [i for _ in range(3) for i in range(5)]
    assert batch["local_crop_boxes"].tolist() == [list(c.box) for c in crops]
    assert batch["local_crop_flip"].tolist() == [c.flip for c in crops]
    assert batch["local_crop_grayscale"].tolist() == [c.grayscale for c in crops]
    assert batch["local_crop_blur_sigma"].tolist() == pytest.approx([c.blur_sigma or 0.0 for c in crops])
    jittered = [c.jitter for c in crops]
    assert batch["local_crop_jitter"].tolist() == [j is not None for j in jittered]
    for row, j in enumerate(jittered):
        if j is not None:
            assert batch["local_crop_jitter_order"][row].tolist() == list(j.order)
            assert batch["local_crop_jitter_factors"][row].tolist() == pytest.approx(
                [j.brightness, j.contrast, j.saturation, j.hue])
    assert batch["global_crop_solarize"][:5].sum() == 0  # only global crop 2 may be solarized


def test_collated_decision_rates_match_the_configured_probabilities():
    """Over 300 images (1800 crops) of the training transform built from the default config, the fraction of
    flipped / jittered / grayscale / blurred / solarized crops in the collated tensors is each configured
    probability (binomial, 4.5 sigma), per crop kind where it differs; factors, sigmas and orders stay in range."""
    crops_cfg = {"gpu_augmentation": True, "local_crops_number": 4, "global_crops_size": 64, "local_crops_size": 32}
    aug = make_augmentation_from_cfg(OmegaConf.merge(dinov2_default_config, {"crops": crops_cfg}))
    assert not aug.fast  # only the sampler is used: no hue tables are built
    transform = EncodedCropsTransform(aug)
    jpeg = _photo_jpeg(120, 90)
    torch.manual_seed(0)
    random.seed(0)
    n_images, per_batch = 300, 50
    batches = [
        collate_encoded_crops([(transform(EncodedImage(jpeg, "p")), ()) for _ in range(per_batch)], **MASK_ARGS)
        for _ in range(n_images // per_batch)
    ]

    def column(kind, name):
        return torch.cat([b[f"{kind}_crop_{name}"] for b in batches])

    first = torch.cat([torch.arange(2 * per_batch) < per_batch for _ in batches])  # global crop 1 rows
    blur_probs, solarize_prob = dinov2_default_config.crops.blur_probs, aug.solarize_prob
    blurred = {kind: column(kind, "blur_sigma") > 0 for kind in ("global", "local")}
    expected = [  # (flags, probability)
        (blurred["global"][first], blur_probs[0]),
        (blurred["global"][~first], blur_probs[1]),
        (blurred["local"], blur_probs[2]),
        (column("global", "solarize")[~first], solarize_prob),
        (column("global", "solarize")[first], 0.0),
        (column("local", "solarize"), 0.0),
    ]
    for name, p in (("flip", HFLIP_PROB), ("jitter", COLOR_JITTER_PROB), ("grayscale", GRAYSCALE_PROB)):
        expected += [(column(kind, name), p) for kind in ("global", "local")]
    for flags, p in expected:
        assert binomial_ok(int(flags.sum()), len(flags), p), (int(flags.sum()), len(flags), p)

    sigma = torch.cat([column(kind, "blur_sigma")[blurred[kind]] for kind in ("global", "local")])
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    jitter = torch.cat([column(kind, "jitter") for kind in ("global", "local")])
    factors = torch.cat([column(kind, "jitter_factors") for kind in ("global", "local")])[jitter]
    order = torch.cat([column(kind, "jitter_order") for kind in ("global", "local")])[jitter]
    low, high = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    assert ((factors >= low) & (factors <= high)).all()
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand_as(order))
    assert all(binomial_ok(int(k), len(order), 0.25) for k in torch.bincount(order[:, 0], minlength=4))


def test_batch_layout_and_crops_agree_with_the_cpu_path(bbu_sample):
    """Same seed -> the same crop parameters and masks as the CPU fast path; the crops agree up to the decoders
    and the PIL-vs-tensor colour arithmetic."""
    root = bbu_sample[0]
    aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, global_crops_size=64, local_crops_size=32)
    batches = {}
    for gpu in (False, True):
        transform = EncodedCropsTransform(aug) if gpu else aug
        dataset = make_dataset(dataset_str=f"BBU:root={root}:split=TRAIN", transform=transform,
                               target_transform=lambda _: ())  # fmt: skip
        torch.manual_seed(0)
        random.seed(0)
        samples = [dataset[i] for i in range(6)]
        if gpu:
            batches[gpu] = _render([s for s, _ in samples])
        else:
            batches[gpu] = collate_data_and_cast(samples, dtype=torch.float32, **MASK_ARGS)
    cpu, gpu = batches[False], batches[True]
    assert sorted(gpu) == sorted(cpu)
    for key in MASK_KEYS:
        assert torch.equal(torch.as_tensor(gpu[key]), torch.as_tensor(cpu[key])), key
    for key in ("collated_global_crops", "collated_local_crops"):
        assert gpu[key].shape == cpu[key].shape and gpu[key].dtype == cpu[key].dtype
        diff = (gpu[key] - cpu[key]).abs().mean(dim=(1, 2, 3)) * 60  # ~ uint8 levels
        assert diff.median() < 2.5 and diff.max() < 6.0, diff.tolist()  # a wrong flip or jitter gives > 20


def test_decode_batches_and_dtype():
    aug = _aug()
    torch.manual_seed(1)
    samples = [EncodedCropsTransform(aug)(EncodedImage(_photo_jpeg(100, 80, seed=k, mode=mode), f"i{k}"))
               for k, mode in enumerate(["RGB", "L", "RGB"])]  # fmt: skip
    whole = _render(samples)
    chunked = _render(samples, dtype=torch.bfloat16, decode_batch_size=2)
    assert chunked["collated_global_crops"].dtype == torch.bfloat16
    torch.testing.assert_close(chunked["collated_local_crops"].float(), whole["collated_local_crops"],
                               atol=0.05, rtol=0.01)  # fmt: skip
    gray_crop = whole["collated_global_crops"][1] * STD_255 + torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255
    if samples[1]["crops"][0].jitter is None:  # a grayscale JPEG stays gray unless hue/saturation jitter ran
        assert (gray_crop[0] - gray_crop[1]).abs().max() < 1e-3
    with pytest.raises(ValueError, match="crops.gpu_decode_batch_size"):
        GPUMultiCropAugmentation(torch.float32, 0)


def test_broken_images_name_their_file(tmp_path, monkeypatch):
    transform = EncodedCropsTransform(_aug())
    jpeg = _photo_jpeg(100, 80)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    dataset = make_dataset(dataset_str=f"ImageFolder:root={folder}", transform=transform,
                           target_transform=lambda _: ())  # fmt: skip
    with pytest.raises(ImageDecodeError, match="truncated.jpg"):
        dataset[0]

    import dinov2.data.gpu_augmentations as gpu_augmentations

    samples = [transform(EncodedImage(jpeg, f"/data/{name}.jpg")) for name in ("good", "bad")]
    real_decode = gpu_augmentations.decode_jpeg

    def failing_decode(data, **kwargs):
        if isinstance(data, list) or data is samples[1]["encoded"]:  # the batch call, then the broken image
            raise RuntimeError("nvjpeg: bad bitstream")
        return real_decode(data, **kwargs)

    monkeypatch.setattr(gpu_augmentations, "decode_jpeg", failing_decode)
    with pytest.raises(ImageDecodeError, match="/data/bad.jpg: nvjpeg: bad bitstream"):
        _render(samples)


def test_a_jpeg_the_device_decoder_rejects_is_decoded_on_the_cpu(monkeypatch, caplog):
    """nvJPEG lacks some JPEG variants: such an image is decoded on the CPU and copied to the device (a warning names
    the first one); a file the CPU cannot decode either raises, naming it and both errors; a device out of memory
    raises as such. The device is `meta` here, its decoder a fake that rejects everything."""
    import dinov2.data.gpu_augmentations as gpu_augmentations

    real_decode = gpu_augmentations.decode_jpeg

    def device_decode(data, mode, device=torch.device("cpu")):
        if device.type != "cpu":
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real_decode(data, mode=mode)

    monkeypatch.setattr(gpu_augmentations, "decode_jpeg", device_decode)
    jpegs = [_photo_jpeg(40, 30, seed=0), _photo_jpeg(50, 20, seed=1, mode="L")]
    batch = {"encoded_images": [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs],
             "decoded_images": [None, None], "image_paths": ["/data/a.jpg", "/data/b.jpg"]}  # fmt: skip
    render = GPUMultiCropAugmentation(torch.float32)
    with caplog.at_level("WARNING", logger="dinov2"):
        images = render.decode(batch, range(2), torch.device("meta"))
    assert [(image.device.type, tuple(image.shape)) for image in images.values()] == [("meta", (3, 30, 40)),
                                                                                      ("meta", (3, 20, 50))]
    assert render.num_decoded_on_cpu == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "/data/a.jpg could not be decoded on meta (nvjpeg: unsupported JPEG)" in warnings[0]

    batch["encoded_images"][1] = batch["encoded_images"][1][:200]  # truncated inside the entropy-coded data
    with pytest.raises(ImageDecodeError, match=r"/data/b\.jpg: .*\(on meta: nvjpeg: unsupported JPEG\)"):
        render.decode(batch, range(2), torch.device("meta"))

    def full_device(data, mode, device=torch.device("cpu")):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu_augmentations, "decode_jpeg", full_device)  # not a JPEG problem: no CPU decode
    with pytest.raises(torch.cuda.OutOfMemoryError):
        render.decode(batch, range(1), torch.device("meta"))


def test_cuda_stream_is_drained_before_each_decode(monkeypatch):
    """nvJPEG writes memory the current stream may still be reading (pytorch/vision#9606): each decode call on a CUDA
    device (one per chunk) comes after a synchronisation of that stream (simulated: no GPU here); none on the CPU."""
    import dinov2.data.gpu_augmentations as gpu_augmentations

    events = []

    class Stream:
        def synchronize(self):
            events.append("sync")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    monkeypatch.setattr(gpu_augmentations, "decode_jpeg", lambda data, **kwargs: events.append(len(data)) or data)
    jpeg = torch.frombuffer(bytearray(_photo_jpeg(40, 30)), dtype=torch.uint8)
    batch = {"encoded_images": [jpeg] * 5, "decoded_images": [None] * 5, "image_paths": ["p"] * 5}
    render = GPUMultiCropAugmentation(torch.float16)
    render.decode(batch, range(2), torch.device("cuda"))  # two chunks
    render.decode(batch, range(2, 5), torch.device("cuda"))
    assert events == ["sync", 2, "sync", 3]
    events.clear()
    render.decode(batch, range(2), torch.device("cpu"))
    assert events == [2]


class _FakeStream:
    """Stands for a CUDA stream (no GPU here): records what waits for what."""

    def __init__(self, name, events):
        self.name, self.events = name, events

    def wait_stream(self, other):
        self.events.append(f"{self.name} waits for {other.name}")


def _fake_streams(monkeypatch, events):
    """torch.cuda's current stream, stream context and Tensor.record_stream, recording into `events`."""
    current = [_FakeStream("training", events)]

    @contextlib.contextmanager
    def stream(s):
        previous, current[0] = current[0], s
        events.append(f"enter {s.name}")
        yield
        current[0] = previous
        events.append(f"leave {s.name}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: current[0])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: events.append(f"{list(t.shape)} used by {s.name}"))
    return current


def test_side_stream_renders_off_the_training_stream_and_hands_the_crops_over(monkeypatch):
    """The rendering runs with the side stream current (its decode drains only that stream); the training stream then
    waits for the side stream, without a host wait, and the crops' memory is marked as used by the training stream."""
    events = []
    current = _fake_streams(monkeypatch, events)
    side = _FakeStream("side", events)

    def render():
        events.append(f"render on {current[0].name}")
        return {"crops": torch.zeros(2), "more": torch.zeros(3), "masks": [1]}

    result = on_side_stream(render, side, torch.device("cuda"), ("crops", "more"))
    assert events == ["enter side", "render on side", "leave side", "training waits for side", "[2] used by training",
                      "[3] used by training"]  # fmt: skip
    assert result["masks"] == [1] and current[0].name == "training"


def test_side_stream_is_one_per_device_and_only_on_cuda(monkeypatch):
    import dinov2.data.gpu_augmentations as gpu_augmentations

    created, calls = [], []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: created.append(device) or f"stream of {device}")
    monkeypatch.setattr(gpu_augmentations, "on_side_stream",
                        lambda render, stream, device, outputs: calls.append((stream, tuple(outputs))) or render())
    monkeypatch.setattr(GPUMultiCropAugmentation, "_render", lambda self, batch, device: {"device": device})
    cuda0, cuda1, cpu = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
    render = GPUMultiCropAugmentation(torch.float16)
    assert [render({}, d)["device"] for d in (cuda0, cuda0, cuda1, cpu)] == [cuda0, cuda0, cuda1, cpu]
    assert created == [cuda0, cuda1]
    outputs = ("collated_global_crops", "collated_local_crops")
    assert calls == [("stream of cuda:0", outputs)] * 2 + [("stream of cuda:1", outputs)]
    calls.clear()
    assert GPUMultiCropAugmentation(torch.float16, side_stream=False)({}, cuda0) == {"device": cuda0}
    assert calls == []


def test_training_loader_rejects_datasets_without_encoded_images(monkeypatch):
    import dinov2.train.train as train
    from dinov2.configs import load_and_merge_config

    cfg = load_and_merge_config("train/bbu_sample")
    cfg.crops.gpu_augmentation = True
    monkeypatch.setattr(train, "make_dataset", lambda **kwargs: [0, 1, 2])
    with pytest.raises(ValueError, match="crops.gpu_augmentation needs a dataset of encoded image files"):
        train.build_data_loader(cfg, 0, torch.float32)


def test_training_loader_warns_that_skip_bad_images_covers_headers_only(bbu_sample, caplog):
    root, _ = bbu_sample
    import dinov2.train.train as train
    from dinov2.configs import load_and_merge_config

    cfg = load_and_merge_config("train/bbu_sample")
    cfg.crops.gpu_augmentation, cfg.train.num_workers = True, 0
    for skip in (False, True):
        cfg.train.dataset_path = f"BBU:root={root}:split=TRAIN:skip_bad_images={str(skip).lower()}"
        caplog.clear()
        with caplog.at_level("WARNING", logger="dinov2"):
            train.build_data_loader(cfg, 0, torch.float32)
        warned = [r.getMessage() for r in caplog.records if "skip_bad_images with crops.gpu_augmentation" in
                  r.getMessage()]  # fmt: skip
        assert len(warned) == int(skip)
