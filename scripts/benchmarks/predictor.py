"""Production scoring latency: one `dinov2.eval.predictor.Predictor.score` call per device, i.e. decoding its
`--images-per-device` photos with the probes' eval transform, the backbone on them as one batch, the classifier and
the thresholds; ms per device (mean and median of the timed calls) and images/s, peak memory on CUDA. With
`--runtime onnx` the same probe is exported (`dinov2.eval.export`) and scored by `OnnxPredictor` (ONNX Runtime, CUDA
where its build has it); with `--runtime torch-explain` each call is `Predictor.explain` (the scores with the maps
of `dinov2.eval.saliency`: one forward and backward pass): one record per runtime and image size.

Self-contained: a randomly initialised `--arch/--patch-size` backbone (on CUDA when available, in the config's
teacher dtype there, as the probes) with a random linear classifier over its last class token, scoring synthetic
JPEGs of each `--image-size` (the photos differ from call to call, cycled). The k-NN and log-reg classifiers cost
about as little as the linear one next to the backbone.
"""

import argparse
import os
import statistics
import tempfile
import time
from typing import Dict, List

import torch
from omegaconf import OmegaConf

from dinov2.configs import dinov2_default_config
from dinov2.eval.features import feature_source
from dinov2.eval.linear import LinearClassifier, save_linear_classifier
from dinov2.eval import export
from dinov2.eval.predictor import OnnxPredictor, Predictor
from dinov2.eval.setup import build_model_for_eval

from .data import parse_size, write_synthetic_jpegs
from .timing import peak_memory_mib, synchronize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="vit_small", help="vit_tiny, vit_small, vit_base, vit_large, vit_giant2")
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--image-size", nargs="+", default=["1920x1440"], help="photo sizes WxH, one record each")
    parser.add_argument("--images-per-device", type=int, default=3, help="photos per call (one device)")
    parser.add_argument("--resize-size", type=int, default=256, help="eval transform: short side")
    parser.add_argument("--crop-size", type=int, default=224, help="eval transform: centre crop")
    parser.add_argument("--draft-reducing-gap", type=float, default=2.0, help="eval transform: 0 = full decode")
    parser.add_argument("--decode-threads", type=int, default=4, help="threads decoding the photos of a call")
    parser.add_argument("--runtime", nargs="+", choices=("torch", "onnx", "torch-explain"), default=["torch"],
                        help="torch: Predictor.score; onnx: the exported model in ONNX Runtime; torch-explain: "
                             "Predictor.explain (scores and maps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls")
    parser.add_argument("--iters", type=int, default=10, help="timed calls")


def _write_probe(folder: str, args: argparse.Namespace) -> Dict[str, str]:
    """Config, random backbone and a random linear classifier that records that backbone: Predictor's inputs."""
    config = OmegaConf.create(dinov2_default_config)
    config.student.arch, config.student.patch_size = args.arch, args.patch_size
    config.crops.global_crops_size = args.crop_size
    config_file = os.path.join(folder, "config.yaml")
    OmegaConf.save(config, config_file)
    model = build_model_for_eval(config, "random")
    eval_transform = {"resize_size": args.resize_size, "crop_size": args.crop_size,
                      "draft_reducing_gap": args.draft_reducing_gap}
    torch.manual_seed(0)
    choice = {"threshold": 0.5, "fallback": True, "reason": "benchmark"}
    thresholds = {"policy": "f1", "group_aggregation": "mean", "image": choice, "group": choice,
                  "threshold_fallback": True}
    classifier = os.path.join(folder, "linear_classifier.pth")
    save_linear_classifier(classifier, LinearClassifier(int(model.embed_dim), 1, False, 2),
                           {"name": "benchmark", "thresholds": thresholds, "class_names": ["negative", "positive"],
                            "features": feature_source(model, "random", config, eval_transform)})
    return {"config_file": config_file, "classifier": classifier}


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    if args.images_per_device < 1 or args.iters < 1:
        raise SystemExit("--images-per-device and --iters must be >= 1")
    records = []
    with tempfile.TemporaryDirectory() as folder:
        probe = _write_probe(folder, args)
        for runtime in args.runtime:
            predictor = _predictor(runtime, probe, folder, args)
            records += _time_calls(predictor, runtime, folder, args)
    return records


def _predictor(runtime: str, probe: Dict[str, str], folder: str, args: argparse.Namespace):
    if runtime != "onnx":
        return Predictor(pretrained_weights="random", decode_threads=args.decode_threads, **probe)
    output_dir = os.path.join(folder, "onnx")
    export.run_export(export.get_args_parser().parse_args([
        "--config-file", probe["config_file"], "--pretrained-weights", "random", "--classifier", probe["classifier"],
        "--output-dir", output_dir, "--check-images", "2"]))
    return OnnxPredictor(os.path.join(output_dir, export.MODEL_NAME), decode_threads=args.decode_threads)


def _time_calls(predictor, runtime: str, folder: str, args: argparse.Namespace) -> List[Dict[str, object]]:
    """One record per --image-size: the timed calls of `predictor` on synthetic photos of that size."""
    records = []
    call = predictor.explain if runtime == "torch-explain" else predictor.score
    device = predictor.device if runtime != "onnx" else torch.device(
        "cuda" if "CUDAExecutionProvider" in predictor.session.get_providers() else "cpu")
    for size in args.image_size:
        width, height = parse_size(size)
        photos = os.path.join(folder, size)
        count = args.images_per_device * min(args.warmup + args.iters, 4)
        if not os.path.isdir(photos):  # the same photos for every runtime
            os.makedirs(photos)
            write_synthetic_jpegs(photos, width, height, count, seed=0)
        names = sorted(os.path.join(photos, name) for name in os.listdir(photos))
        calls = [names[i : i + args.images_per_device] for i in range(0, count, args.images_per_device)]
        for it in range(args.warmup):
            call(calls[it % len(calls)])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = []
        for it in range(args.iters):
            start = time.perf_counter()
            call(calls[(args.warmup + it) % len(calls)])  # returns Python floats and numpy arrays: synchronised
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        records.append({
            "benchmark": "predictor",
            "runtime": runtime,
            "arch": args.arch,
            "patch_size": args.patch_size,
            "image_size": size,
            "images_per_device": args.images_per_device,
            "resize_size": args.resize_size,
            "crop_size": args.crop_size,
            "draft_reducing_gap": args.draft_reducing_gap,
            "decode_threads": args.decode_threads,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "ms_per_device": round(1000 * statistics.fmean(seconds), 2),
            "ms_per_device_median": round(1000 * statistics.median(seconds), 2),
            "images_per_s": round(args.iters * args.images_per_device / sum(seconds), 2),
            "peak_memory_mib": peak_memory_mib(device) if runtime != "onnx" else None,  # ONNX Runtime's is its own
        })
    return records
