"""Data pipeline speed: DINO multi-crop samples/s (decode + DataAugmentationDINO), or the probes' eval transform,
per worker and in total.

Reads `--dataset` (a dataset string, e.g. BBU:root=<R>:split=TRAIN) or, without it, synthetic JPEGs of each
`--image-size` written to a temporary folder (smooth gradient + mild noise + rectangles, quality 90).
With `--num-workers 0` the samples are produced in this process on one thread; otherwise by a DataLoader whose
workers each use one thread (PyTorch's default in workers). The first batch of every worker (start-up, made in
parallel) is not timed, and the timed batches are whole waves of one batch per worker, so `--num-samples` is rounded
up to a multiple of batch size x workers.
On a shared machine use `--repeats`: the paths are measured in turn and the best run is the least disturbed one.

Paths: `reference` (torchvision PIL pipeline), `fast` (draft decode, crop first; the default), `gpu`
(`crops.gpu_augmentation`: workers forward JPEG bytes and crop parameters, the batch is collated with its iBOT masks
and decoded + augmented on `--device`, synchronised, so the figure is end to end); `both` = reference + fast,
`all` = the three. The probes' eval transform (resize the short side to `--resize-size`, centre crop `--crop-size`):
`eval-full` (JPEGs decoded at full size, as upstream), `eval-draft` (decoded reduced, `--draft-reducing-gap`: the
probes' default); `eval` = both.
"""

import argparse
import io
import os
import tempfile
import time
from functools import partial
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw

from dinov2.configs import dinov2_default_config
from dinov2.data import SamplerType, make_data_loader, make_dataset
from dinov2.data.augmentations import make_augmentation_from_cfg
from dinov2.data.collate import mask_args_from_cfg
from dinov2.data.gpu_augmentations import EncodedCropsTransform, GPUMultiCropAugmentation, collate_encoded_crops
from dinov2.data.transforms import make_classification_eval_transform

NUM_SYNTHETIC_IMAGES = 4
PATH_CHOICES = {
    "fast": ("fast",),
    "reference": ("reference",),
    "gpu": ("gpu",),
    "both": ("reference", "fast"),
    "all": ("reference", "fast", "gpu"),
    "eval-full": ("eval-full",),
    "eval-draft": ("eval-draft",),
    "eval": ("eval-full", "eval-draft"),
}
EVAL_PATHS = ("eval-full", "eval-draft")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    crops = dinov2_default_config.crops
    parser.add_argument("--dataset", default=None, help="dataset string; default: synthetic JPEGs of --image-size")
    parser.add_argument("--image-size", nargs="+", default=["1920x1440"], help="WxH of synthetic JPEGs (several ok)")
    parser.add_argument("--path", choices=tuple(PATH_CHOICES), default="fast",
                        help="crop pipeline: fast (draft decode, crop first), reference (torchvision PIL), gpu "
                             "(decode + augment on --device), both (reference + fast) or all; or the probes' eval "
                             "transform: eval-full, eval-draft or eval (both)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the gpu path")
    parser.add_argument("--patch-size", type=int, default=14, help="iBOT mask grid of the gpu path's collate")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers; 0 = in this process")
    parser.add_argument("--num-samples", type=int, default=40, help="timed samples per measurement")
    parser.add_argument("--batch-size", type=int, default=4, help="DataLoader batch size (num-workers > 0)")
    parser.add_argument("--local-crops-number", type=int, default=crops.local_crops_number)
    parser.add_argument("--global-crops-size", type=int, default=crops.global_crops_size)
    parser.add_argument("--local-crops-size", type=int, default=crops.local_crops_size)
    parser.add_argument("--resize-size", type=int, default=256, help="eval paths: short side after the resize")
    parser.add_argument("--crop-size", type=int, default=224, help="eval paths: centre crop size")
    parser.add_argument("--draft-reducing-gap", type=float, default=2.0, help="eval-draft path: as the probes' option")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per path and size, interleaved across paths; best and median are reported")
    parser.add_argument("--seed", type=int, default=0)


def parse_size(text: str) -> Tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-size {text!r}: expected WxH, e.g. 1920x1440") from None
    return width, height


def write_synthetic_jpegs(folder: str, width: int, height: int, count: int, seed: int) -> None:
    """`count` photo-like JPEGs (gradient, noise sigma 3, 30 rectangles), quality 90, into `folder`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = np.stack([xx / width * 200, yy / height * 200, (xx + yy) / (width + height) * 255], axis=-1)
    for k in range(count):
        pixels = np.clip(gradient + rng.normal(0.0, 3.0, gradient.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(30):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x1 = x0 + int(rng.integers(10, max(11, width // 4)))
            y1 = y0 + int(rng.integers(10, max(11, height // 4)))
            draw.rectangle((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.save(os.path.join(folder, f"synthetic_{k:03d}.jpg"), quality=90)


def _stack_crops(samples: List[Tuple[Dict, object]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Crop-major stacking as in training, without masks (only the augmentation is measured)."""
    first = samples[0][0]
    global_crops = torch.stack([s[0]["global_crops"][i] for i in range(len(first["global_crops"])) for s in samples])
    local_crops = torch.stack([s[0]["local_crops"][i] for i in range(len(first["local_crops"])) for s in samples])
    return global_crops, local_crops


def _batch_steps(path: str, args: argparse.Namespace) -> Tuple[Callable, Callable[[Any], None]]:
    """(collate_fn, finish): the gpu path collates bytes, crop parameters and iBOT masks, and `finish` renders the
    batch on the device and waits for it; the CPU paths stack the crops (or eval images) and finish at once."""
    if path in EVAL_PATHS:
        return lambda samples: torch.stack([image for image, _ in samples]), lambda batch: None
    if path != "gpu":
        return _stack_crops, lambda batch: None
    collate = partial(collate_encoded_crops, **mask_args_from_cfg(_config(path, args)))
    device = torch.device(args.device)
    render = GPUMultiCropAugmentation(torch.float16 if device.type == "cuda" else torch.float32)

    def finish(batch: Any) -> None:
        render(batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return collate, finish


def _timed_batches(num_samples: int, batch_size: int, num_workers: int) -> int:
    """Batches to time: at least `num_samples` samples, in whole waves of one batch per worker, so that every worker
    contributes equally and no batch made before the clock started is counted."""
    waves = max(1, -(-num_samples // (batch_size * num_workers)))
    return waves * num_workers


def _measure(dataset, path: str, args: argparse.Namespace) -> Tuple[int, float]:
    """(samples, seconds) to produce at least args.num_samples samples. In-process: after one untimed sample. With
    workers: after one untimed batch per worker, because the workers make their first batches at the same time, so
    after the first batch arrives the others are ready at once and timing them would count work done off the clock
    (with 16 workers and batches of 64, 960 samples that seem free)."""
    collate, finish = _batch_steps(path, args)
    if args.num_workers == 0:
        torch.set_num_threads(1)
        order = np.random.default_rng(args.seed).integers(0, len(dataset), args.num_samples + 1)
        finish(collate([dataset[int(order[0])]]))
        start = time.perf_counter()
        for first in range(1, len(order), args.batch_size):
            finish(collate([dataset[int(index)] for index in order[first : first + args.batch_size]]))
        return args.num_samples, time.perf_counter() - start
    loader = make_data_loader(
        dataset=dataset,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
        sampler_type=SamplerType.INFINITE,
        collate_fn=collate,
    )
    batches = iter(loader)
    for _ in range(args.num_workers):  # the first wave: every worker's first batch, made in parallel before timing
        finish(next(batches))
    num_batches = _timed_batches(args.num_samples, args.batch_size, args.num_workers)
    start = time.perf_counter()
    for _ in range(num_batches):
        finish(next(batches))
    return num_batches * args.batch_size, time.perf_counter() - start


def _first_image_size(dataset) -> str:
    """WxH of sample 0 (header only), to label measurements on a real dataset."""
    width, height = Image.open(io.BytesIO(dataset.get_image_data(0))).size
    return f"{width}x{height}"


def _config(path: str, args: argparse.Namespace) -> DictConfig:
    """The default training config with this run's crop options and path (and patch size, for the iBOT masks)."""
    crops = {
        "local_crops_number": args.local_crops_number,
        "global_crops_size": args.global_crops_size,
        "local_crops_size": args.local_crops_size,
        "fast_augmentation": path == "fast",
        "gpu_augmentation": path == "gpu",
    }
    return OmegaConf.merge(dinov2_default_config, {"crops": crops, "student": {"patch_size": args.patch_size}})


def _make_transform(path: str, args: argparse.Namespace) -> Callable:
    """The training transform of `path`, as `build_data_loader` makes it (or the probes' eval transform)."""
    if path in EVAL_PATHS:
        gap = args.draft_reducing_gap if path == "eval-draft" else 0.0
        return make_classification_eval_transform(
            resize_size=args.resize_size, crop_size=args.crop_size, draft_reducing_gap=gap
        )
    augmentation = make_augmentation_from_cfg(_config(path, args))
    return EncodedCropsTransform(augmentation) if path == "gpu" else augmentation


def _crops_text(path: str, args: argparse.Namespace) -> str:
    if path == "eval-draft":
        return f"resize {args.resize_size}, centre {args.crop_size}, draft reducing gap {args.draft_reducing_gap:g}"
    if path == "eval-full":
        return f"resize {args.resize_size}, centre {args.crop_size}"
    return f"2x{args.global_crops_size} + {args.local_crops_number}x{args.local_crops_size}"


def run(args: argparse.Namespace) -> List[dict]:
    paths = PATH_CHOICES[args.path]
    records = []
    with tempfile.TemporaryDirectory(prefix="dinov2_bench_data_") as tmp:
        sources = []
        if args.dataset:
            sources.append((args.dataset, None))
        else:
            for text in args.image_size:
                width, height = parse_size(text)
                folder = os.path.join(tmp, f"{width}x{height}")
                os.makedirs(folder)
                write_synthetic_jpegs(folder, width, height, NUM_SYNTHETIC_IMAGES, args.seed)
                sources.append((f"ImageFolder:root={folder}", f"{width}x{height}"))
        for dataset_str, image_size in sources:
            datasets = {
                path: make_dataset(
                    dataset_str=dataset_str, transform=_make_transform(path, args), target_transform=lambda _: ()
                )
                for path in paths
            }
            image_size = image_size or _first_image_size(datasets[paths[0]])
            rates: Dict[str, List[float]] = {path: [] for path in paths}
            counts: Dict[str, int] = {}
            for _ in range(max(1, args.repeats)):
                for path in paths:
                    samples, seconds = _measure(datasets[path], path, args)
                    rates[path].append(samples / seconds)
                    counts[path] = samples
            for path in paths:
                best, median = max(rates[path]), float(np.median(rates[path]))
                records.append(
                    {
                        "benchmark": "data",
                        "dataset": args.dataset or "synthetic",
                        "image_size": image_size,
                        "path": path,
                        "device": args.device if path == "gpu" else "cpu",
                        "num_workers": args.num_workers,
                        "num_samples": counts[path],
                        "repeats": len(rates[path]),
                        "crops": _crops_text(path, args),
                        "samples_per_s": round(best, 2),
                        "samples_per_s_median": round(median, 2),
                        "samples_per_s_per_worker": round(best / max(1, args.num_workers), 2),
                        "load_avg_1min": round(os.getloadavg()[0], 2),
                    }
                )
    return records
