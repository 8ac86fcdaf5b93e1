"""DataAugmentationDINO: outputs, blur probabilities as configured, and fast path == reference distribution."""

import io

import numpy as np
import pytest
import torch
from data_helpers import binomial_ok, same_distribution
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from torchvision import transforms
from torchvision.transforms import functional as F

from dinov2.configs import dinov2_default_config
from dinov2.data import DataAugmentationDINO
from dinov2.data.augmentations import make_augmentation_from_cfg
from dinov2.data.fast_crops import (
    ColorJitterParams,
    CropParams,
    adjust_hue,
    choose_draft_scale,
    decode_for_crops,
    gaussian_blur_uint8,
    hsv_tables,
    render_crop,
    sample_color_jitter,
    sample_resized_crop_box,
)
from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, GaussianBlur

GLOBAL_SCALE = (0.32, 1.0)
LOCAL_SCALE = (0.05, 0.32)
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradient + noise + rectangles: content with both smooth areas and edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width * 220, yy / height * 220, (xx + yy) / (width + height) * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.rectangle((x0, y0, x0 + width // 5, y0 + height // 6), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def _encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=95) if fmt == "JPEG" else image.save(buffer, fmt)
    return buffer.getvalue()


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _aug(blur_probs=(1.0, 0.1, 0.5), fast=True, n_local=8, **kwargs) -> DataAugmentationDINO:
    return DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, n_local, blur_probs=blur_probs, fast=fast, **kwargs)


def _plain(box, size, **overrides) -> CropParams:
    fields = dict(box=box, size=size, flip=False, jitter=None, grayscale=False, blur_sigma=None, solarize=False)
    fields.update(overrides)
    return CropParams(**fields)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run like a DataLoader worker (one thread): the many small tensor ops here crawl when intra-op threads
    compete with other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def jpeg_200x150() -> bytes:
    return _encode(_photo(200, 150))


# --- outputs


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGBA")])
def test_output_keys_shapes_dtypes(fast, fmt, mode):
    data = _encode(_photo(200, 150).convert(mode), fmt)
    torch.manual_seed(0)
    out = _aug(fast=fast, n_local=3)(_open(data))
    assert list(out.keys()) == ["global_crops", "global_crops_teacher", "local_crops", "offsets"]
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    assert out["global_crops_teacher"] == out["global_crops"]
    assert out["offsets"] == ()
    for crop in out["global_crops"]:
        assert crop.shape == (3, 224, 224) and crop.dtype == torch.float32
    for crop in out["local_crops"]:
        assert crop.shape == (3, 96, 96) and crop.dtype == torch.float32
    # normalised: every value comes from a pixel in [0, 255]
    for crop in out["global_crops"] + out["local_crops"]:
        pixels = crop * STD + MEAN
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_accepts_unloaded_and_loaded_images(jpeg_200x150):
    aug = _aug(n_local=2)
    assert aug.accepts_unloaded_image is True
    loaded = _open(jpeg_200x150).convert("RGB")
    torch.manual_seed(1)
    from_loaded = aug(loaded)
    torch.manual_seed(1)
    from_png = aug(_open(_encode(loaded, "PNG")))
    crops_loaded = from_loaded["global_crops"] + from_loaded["local_crops"]
    crops_png = from_png["global_crops"] + from_png["local_crops"]
    for a, b in zip(crops_loaded, crops_png):
        assert torch.allclose(a, b, atol=1e-5)


def test_normalisation_of_a_constant_crop():
    color = (200, 100, 30)
    image = Image.new("RGB", (120, 90), color)
    crop = render_crop(image, _plain((10, 5, 110, 85), 32), 1.0, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    expected = (torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD
    assert torch.allclose(crop, expected.expand(3, 32, 32), atol=1e-5)


def test_bad_blur_probs_rejected():
    with pytest.raises(ValueError, match="blur_probs"):
        _aug(blur_probs=(1.0, 0.1))
    with pytest.raises(ValueError, match="blur_probs"):
        _aug(blur_probs=(1.0, 1.5, 0.5))


def test_make_augmentation_from_cfg():
    aug = make_augmentation_from_cfg(dinov2_default_config)
    crops = dinov2_default_config.crops
    assert aug.fast is True and aug.blur_probs == (1.0, 0.1, 0.5)
    assert aug.global_crops_scale == tuple(crops.global_crops_scale)
    assert aug.local_crops_number == crops.local_crops_number
    assert aug.reducing_gap == crops.fast_reducing_gap
    cfg = OmegaConf.merge(
        dinov2_default_config,
        OmegaConf.from_dotlist(
            ["crops.blur_probs=[0.0,0.9,0.5]", "crops.fast_augmentation=false", "crops.local_crops_number=2"]
        ),
    )
    aug = make_augmentation_from_cfg(cfg)
    assert aug.fast is False and aug.blur_probs == (0.0, 0.9, 0.5) and aug.local_crops_number == 2


# --- blur probabilities


def _reference_blurs(aug: DataAugmentationDINO):
    """The three GaussianBlur (RandomApply) steps of the reference pipeline: global 1, global 2, local."""
    found = []
    for pipeline in (aug.global_transfo1, aug.global_transfo2, aug.local_transfo):
        blurs = [t for t in pipeline.transforms if isinstance(t, GaussianBlur)]
        assert len(blurs) == 1
        found.append(blurs[0])
    return found


@pytest.mark.parametrize("blur_probs", [(1.0, 0.1, 0.5), (0.0, 0.9, 0.5)])
def test_blur_frequencies_reference_path(blur_probs):
    aug = _aug(blur_probs=blur_probs, fast=False)
    tiny = Image.new("RGB", (4, 4))
    torch.manual_seed(0)
    n = 3000
    for blur, p in zip(_reference_blurs(aug), blur_probs):
        calls = []
        blur.transforms = [lambda img: calls.append(1) or img]  # count applications of the inner blur
        for _ in range(n):
            blur(tiny)
        assert binomial_ok(len(calls), n, p), (p, len(calls))


@pytest.mark.parametrize("blur_probs", [(1.0, 0.1, 0.5), (0.0, 0.9, 0.5)])
def test_blur_frequencies_fast_path(blur_probs):
    aug = _aug(blur_probs=blur_probs)
    gen = torch.Generator().manual_seed(0)
    n = 1500
    counts = np.zeros(3, dtype=int)
    n_local = 0
    for _ in range(n):
        params = aug.sample_params(200, 150, generator=gen)
        counts[0] += params[0].blur_sigma is not None
        counts[1] += params[1].blur_sigma is not None
        counts[2] += sum(c.blur_sigma is not None for c in params[2:])
        n_local += len(params) - 2
    assert binomial_ok(counts[0], n, blur_probs[0])
    assert binomial_ok(counts[1], n, blur_probs[1])
    assert binomial_ok(counts[2], n_local, blur_probs[2])


# --- fast == reference distribution


@pytest.mark.parametrize(
    "size,scale", [((200, 150), GLOBAL_SCALE), ((200, 150), LOCAL_SCALE), ((640, 100), GLOBAL_SCALE)]
)
def test_crop_box_distribution_matches_torchvision(size, scale):
    width, height = size
    image = Image.new("RGB", size)
    ratio = (3.0 / 4.0, 4.0 / 3.0)
    n = 3000
    torch.manual_seed(0)
    reference = np.array([transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)])
    gen = torch.Generator().manual_seed(1)
    fast = np.array([sample_resized_crop_box(width, height, scale, ratio, gen) for _ in range(n)])
    for boxes in (reference, fast):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()

    def features(boxes):
        top, left, h, w = boxes.T.astype(float)
        return {
            "area fraction": h * w / (width * height),
            "log aspect": np.log(w / h),
            "centre x": (left + w / 2) / width,
            "centre y": (top + h / 2) / height,
        }

    ref_f, fast_f = features(reference), features(fast)
    for name in ref_f:
        assert same_distribution(ref_f[name], fast_f[name]), name


def test_color_jitter_and_blur_sigma_distributions_match_torchvision():
    aug = _aug(fast=False)
    colour = aug.global_transfo1.transforms[0].transforms
    jitter = next(t for t in colour if isinstance(t, transforms.RandomApply)).transforms[0]
    n = 2000
    torch.manual_seed(0)
    ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
    ref = [transforms.ColorJitter.get_params(*ranges) for _ in range(n)]
    gen = torch.Generator().manual_seed(1)
    strength = (0.4, 0.4, 0.2, 0.1)
    fast = [sample_color_jitter(*strength, generator=gen) for _ in range(n)]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)
    )
    for i, name in enumerate(["brightness", "contrast", "saturation", "hue"]):
        ref_values = np.array([float(r[i + 1]) for r in ref])
        fast_values = np.array([getattr(f, name) for f in fast])
        assert same_distribution(ref_values, fast_values), name
    # the order of the four ops is a uniform permutation in both
    first_op_ref = np.bincount([int(r[0][0]) for r in ref], minlength=4)
    first_op_fast = np.bincount([f.order[0] for f in fast], minlength=4)
    assert all(binomial_ok(k, n, 0.25) for k in first_op_ref) and all(binomial_ok(k, n, 0.25) for k in first_op_fast)
    assert all(sorted(f.order) == [0, 1, 2, 3] for f in fast)

    blur = _reference_blurs(aug)[0].transforms[0]
    ref_sigma = np.array([transforms.GaussianBlur.get_params(*blur.sigma) for _ in range(n)])
    fast_sigma = np.array(
        [c.blur_sigma for _ in range(n // 2) for c in aug.sample_params(200, 150, generator=gen)[:1]]
    )
    assert same_distribution(ref_sigma, fast_sigma)


def test_fast_path_decision_rates_match_reference_settings():
    aug = _aug(fast=False)
    flip = aug.geometric_augmentation_global.transforms[1]
    colour = aug.global_transfo1.transforms[0].transforms
    solarize = next(t for t in aug.global_transfo2.transforms if isinstance(t, transforms.RandomSolarize))
    expected = {
        "flip": flip.p,
        "jitter": colour[0].p,
        "grayscale": colour[1].p,
        "solarize global 2": solarize.p,
    }
    assert expected == {"flip": 0.5, "jitter": 0.8, "grayscale": 0.2, "solarize global 2": 0.2}
    gen = torch.Generator().manual_seed(0)
    n = 1000
    crops = [aug.sample_params(300, 200, generator=gen) for _ in range(n)]
    all_crops = [c for sample in crops for c in sample]
    m = len(all_crops)
    assert binomial_ok(sum(c.flip for c in all_crops), m, expected["flip"])
    assert binomial_ok(sum(c.jitter is not None for c in all_crops), m, expected["jitter"])
    assert binomial_ok(sum(c.grayscale for c in all_crops), m, expected["grayscale"])
    assert binomial_ok(sum(s[1].solarize for s in crops), n, expected["solarize global 2"])
    assert not any(s[0].solarize or any(c.solarize for c in s[2:]) for s in crops)
    assert all(s[0].size == 224 and s[1].size == 224 and all(c.size == 96 for c in s[2:]) for s in crops)


def test_fast_and_reference_pixel_statistics_agree(jpeg_200x150):
    """End to end: mean and spread of the output crops agree between the two paths."""
    summaries = {}
    for fast in (True, False):
        aug = _aug(fast=fast, n_local=4)
        torch.manual_seed(0)
        means, stds = [], []
        for _ in range(60):
            out = aug(_open(jpeg_200x150))
            for crop in out["global_crops"] + out["local_crops"]:
                means.append(crop.mean().item())
                stds.append(crop.std().item())
        summaries[fast] = (np.array(means), np.array(stds))
    for i in range(2):
        assert same_distribution(summaries[True][i], summaries[False][i])


# --- fast path pixels


def _reference_crop(image, box, size):
    left, top, right, bottom = box
    bicubic = transforms.InterpolationMode.BICUBIC
    crop = F.resized_crop(image, top, left, bottom - top, right - left, [size, size], bicubic)
    return F.normalize(F.to_tensor(crop), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def _to_uint8_scale(x):
    return x * STD * 255


@pytest.mark.parametrize("reducing_gap", [None, 1.0])
def test_fast_crop_matches_torchvision_without_draft(reducing_gap):
    image = _photo(400, 300).convert("RGB")
    for box, size in [((13, 7, 313, 267), 224), ((100, 40, 260, 200), 96), ((0, 0, 400, 300), 96)]:
        fast = render_crop(image, _plain(box, size), 1.0, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, reducing_gap)
        ref = _reference_crop(image, box, size)
        diff = _to_uint8_scale(fast - ref).abs().mean().item()
        assert diff < (1.0 if reducing_gap is None else 3.0), (box, diff)


def test_fast_crop_with_draft_decode_close_to_full_decode():
    width, height = 1000, 760
    data = _encode(_photo(width, height, seed=3))
    full = _open(data).convert("RGB")
    crops = [_plain((100, 50, 700, 650), 224), _plain((500, 300, 800, 560), 96)]
    assert choose_draft_scale(width, height, crops) == 2
    decoded, coordinate_scale = decode_for_crops(_open(data), 2)
    assert decoded.size == (500, 380) and coordinate_scale == 0.5
    for params in crops:
        fast = render_crop(decoded, params, coordinate_scale, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, None)
        ref = _reference_crop(full, params.box, params.size)
        assert _to_uint8_scale(fast - ref).abs().mean().item() < 1.5


def test_draft_coordinates_when_size_is_not_a_multiple_of_the_scale():
    # 1015 x 767 at 1/4 decodes to 254 x 192 pixels, but one decoded pixel is still 4 source pixels
    width, height = 1015, 767
    data = _encode(_photo(width, height, seed=4))
    full = _open(data).convert("RGB")
    decoded, coordinate_scale = decode_for_crops(_open(data), 4)
    assert decoded.size == (254, 192) and coordinate_scale == 0.25
    for box in [(215, 0, 1015, 767), (600, 400, 1000, 760)]:
        params = _plain(box, 96)
        fast = render_crop(decoded, params, coordinate_scale, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, None)
        ref = _reference_crop(full, box, 96)
        assert _to_uint8_scale(fast - ref).abs().mean().item() < 1.0, box


def test_flip_grayscale_solarize_jitter_ops():
    image = _photo(200, 150).convert("RGB")
    box = (20, 10, 180, 140)
    base = render_crop(image, _plain(box, 64), 1.0, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    flipped = render_crop(image, _plain(box, 64, flip=True), 1.0, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert torch.allclose(flipped, base.flip(-1), atol=1e-5)

    gray = render_crop(image, _plain(box, 64, grayscale=True), 1.0, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    gray_pixels = gray * STD + MEAN
    assert torch.allclose(gray_pixels[0], gray_pixels[1], atol=1e-5)
    assert torch.allclose(gray_pixels[0], gray_pixels[2], atol=1e-5)
    crop = image.resize((64, 64), Image.Resampling.BICUBIC, box=box)
    expected_gray = torch.from_numpy(np.array(crop.convert("L"))).float() / 255
    assert torch.allclose(gray_pixels[0], expected_gray, atol=1e-5)

    solar = render_crop(image, _plain(box, 64, solarize=True), 1.0, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    expected_solar = F.to_tensor(F.solarize(crop, 128))
    assert torch.allclose(solar * STD + MEAN, expected_solar, atol=1e-5)

    jitter = ColorJitterParams(order=(3, 1, 0, 2), brightness=1.3, contrast=0.7, saturation=1.1, hue=0.05)
    jittered = render_crop(image, _plain(box, 64, jitter=jitter), 1.0, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    expected = F.adjust_saturation(F.adjust_brightness(F.adjust_contrast(F.adjust_hue(crop, 0.05), 0.7), 1.3), 1.1)
    assert torch.allclose(jittered * STD + MEAN, F.to_tensor(expected), atol=1e-5)


def test_adjust_hue_is_torchvision_bit_for_bit():
    rng = np.random.default_rng(5)
    noise = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    photo = _photo(300, 200, seed=6).resize((96, 96), Image.Resampling.BICUBIC, box=(20, 10, 260, 190))
    levels = np.array([0, 1, 127, 128, 254, 255], dtype=np.uint8)  # greys, primaries, near-ties of max channels
    corners = Image.fromarray(np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(36, 6, 3))
    # delta 0 (|factor| < 1/255), both signs, the torchvision limits and values that wrap the uint8 hue
    factors = [0.0, 0.003, -0.003, 0.05, -0.05, 0.1, -0.1, -0.0999, 0.5, -0.5] + list(rng.uniform(-0.1, 0.1, 6))
    for image in (noise, photo, corners):
        for factor in factors:
            assert adjust_hue(image, factor).tobytes() == F.adjust_hue(image, factor).tobytes(), float(factor)


def test_hsv_tables_on_known_colours():
    rgb_to_hsv, hsv_to_rgb = hsv_tables()
    pack = lambda a, b, c: a | b << 8 | c << 16  # noqa: E731
    # 8-bit HSV: hue = int(fraction of the circle * 255), saturation = int(chroma / max * 255), value = max
    known = {(255, 0, 0): (0, 255, 255), (0, 255, 0): (85, 255, 255), (0, 0, 255): (170, 255, 255),
             (128, 128, 128): (0, 0, 128), (0, 0, 0): (0, 0, 0), (200, 100, 100): (0, 127, 200)}
    for rgb, hsv in known.items():
        assert rgb_to_hsv[pack(*rgb)] == pack(*hsv), rgb
        assert hsv_to_rgb[pack(*hsv)] & 0xFFFFFF == pack(*rgb), hsv  # these six survive the round trip
    assert rgb_to_hsv.dtype == hsv_to_rgb.dtype == np.uint32 and rgb_to_hsv.shape == hsv_to_rgb.shape == (1 << 24,)


def test_adjust_hue_rejects_non_rgb():
    with pytest.raises(ValueError, match="mode L"):
        adjust_hue(Image.new("L", (4, 4)), 0.05)


@pytest.mark.parametrize("sigma", [0.1, 0.8, 2.0])
def test_gaussian_blur_matches_torchvision(sigma):
    x = torch.from_numpy(np.array(_photo(60, 40))).permute(2, 0, 1).contiguous()
    ours = gaussian_blur_uint8(x, sigma)
    reference = F.gaussian_blur(x, [9, 9], [sigma, sigma])
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    assert (ours.int() - reference.int()).abs().max().item() <= 1


# --- draft scale


def test_choose_draft_scale():
    local = lambda w, h: _plain((0, 0, w, h), 96)  # noqa: E731
    glob = lambda w, h: _plain((0, 0, w, h), 224)  # noqa: E731
    assert choose_draft_scale(4000, 3000, [local(800, 800)]) == 8
    assert choose_draft_scale(4000, 3000, [local(800, 800), local(700, 900)]) == 4
    assert choose_draft_scale(4000, 3000, [glob(1800, 1800), local(400, 400)]) == 4
    assert choose_draft_scale(4000, 3000, [glob(1700, 3000)]) == 4  # 1700 / 8 = 212.5 < 224
    assert choose_draft_scale(640, 480, [local(200, 200), glob(460, 460)]) == 2
    assert choose_draft_scale(640, 480, [local(150, 150)]) == 1
    assert choose_draft_scale(640, 480, [local(50, 50)]) == 1  # smaller than its output: keep full resolution
    # 8 source pixels per decoded pixel at 1/8 (the decoded size is rounded up, the scale is not)
    assert choose_draft_scale(1001, 1001, [local(768, 768)]) == 8
    assert choose_draft_scale(1001, 1001, [local(767, 768)]) == 4


def test_decode_for_crops_sizes():
    jpeg = _encode(_photo(1001, 601))
    decoded, coordinate_scale = decode_for_crops(_open(jpeg), 8)
    assert decoded.size == (126, 76) and decoded.mode == "RGB" and coordinate_scale == 1 / 8
    png = _encode(_photo(101, 61), "PNG")
    decoded, coordinate_scale = decode_for_crops(_open(png), 8)  # no draft for PNG: full size
    assert decoded.size == (101, 61) and coordinate_scale == 1.0
    loaded = _open(jpeg)
    loaded.load()
    decoded, coordinate_scale = decode_for_crops(loaded, 4)  # already decoded: full size
    assert decoded.size == (1001, 601) and coordinate_scale == 1.0
    gray = _encode(_photo(160, 120).convert("L"))
    decoded, coordinate_scale = decode_for_crops(_open(gray), 2)
    assert decoded.mode == "RGB" and decoded.size == (80, 60) and coordinate_scale == 0.5


def test_fast_path_uses_draft_scale_of_its_crops(monkeypatch):
    """The fast transform decodes at the scale choose_draft_scale gives for the crops it sampled."""
    from dinov2.data import fast_crops

    seen = []
    original = fast_crops.decode_for_crops
    spy = lambda image, scale: seen.append(scale) or original(image, scale)  # noqa: E731
    monkeypatch.setattr(fast_crops, "decode_for_crops", spy)
    aug = _aug()
    data = _encode(_photo(2000, 1500))
    torch.manual_seed(0)
    gen_state = torch.get_rng_state()
    aug(_open(data))
    torch.set_rng_state(gen_state)
    params = aug.sample_params(2000, 1500)
    assert seen == [choose_draft_scale(2000, 1500, params)] and seen[0] > 1


def test_dataset_hands_unloaded_image(tmp_path):
    from dinov2.data import make_dataset

    for k in range(2):
        _photo(320, 240, seed=k).save(tmp_path / f"img_{k}.jpg", quality=90)
    dataset = make_dataset(
        dataset_str=f"ImageFolder:root={tmp_path}", transform=_aug(n_local=2), target_transform=lambda _: ()
    )
    sample, target = dataset[1]
    assert target == () and len(sample["local_crops"]) == 2 and sample["global_crops"][0].shape == (3, 224, 224)
