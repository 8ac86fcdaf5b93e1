"""Export a backbone and a saved probe classifier as one ONNX model, for production runtimes without this code.

    python -m dinov2.eval.export --config-file C --pretrained-weights W \\
        --classifier <probe output dir>/linear_classifier.pth --output-dir D [--check-datasets BBU:root=R:split=VAL]

`D/model.onnx` takes `images`, a float32 (B, 3, S, S) batch normalised as the classifier's eval transform (resize the
short side, centre crop S, ImageNet mean and std), and gives `probabilities` (B, C) and `score` (B,), the
positive-class score 1 - p(class 0), both float64, and `positive` (B,), the decision at the saved image threshold;
with the classifier's model of unfamiliar images (dinov2/eval/ood.py) also `unfamiliarity` (B,) and `unfamiliar` (B,).
The batch size is free; S is the classifier's crop size, for which the position embedding is interpolated at export
(no bicubic resize in the graph, which some runtimes mishandle). The backbone runs in float32.

The graph is the maths of `dinov2.eval.predict` and `dinov2.eval.predictor`: the same feature rows and the same probe
head (dinov2/eval/saved_probe.py), so the scores agree with theirs to float32 rounding. Its metadata (`dinov2_qc`, a
JSON string, also written to `D/model.json`) carries what a runtime needs beside the graph: class names, image and
group thresholds with the group aggregation, the unfamiliarity threshold, the eval transform, the backbone's SHA-256
and the classifier it came from. `dinov2.eval.predictor.OnnxPredictor` reads it and decides devices as the `Predictor`
does.

Every export is checked before it is kept: ONNX Runtime runs the written file on the `--check-datasets` images (else
on `--check-images` seeded random ones) and its scores must equal the torch path's within `--tolerance`, else the
export fails naming the image and the output directory is left as it was; `model.json` records the largest
differences and any decision that differs.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

import dinov2.distributed as distributed
from dinov2.data import make_dataset
from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, make_classification_eval_transform
from dinov2.eval.features import ProbeFeatureModel, backbone_fingerprint, dataset_image_paths, split_feature_rows
from dinov2.eval.ood import ood_summary
from dinov2.eval.saved_probe import SavedProbe, check_backbone, load_probe_classifier
from dinov2.eval.setup import build_model_for_eval, get_classifier_args_parser
from dinov2.utils.config import get_cfg_from_args, setup
from dinov2.utils.utils import atomic_write, torch_version

logger = logging.getLogger("dinov2")

MODEL_NAME = "model.onnx"
METADATA_NAME = "model.json"
METADATA_KEY = "dinov2_qc"
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "score", "positive")
OOD_OUTPUT_NAMES = ("unfamiliarity", "unfamiliar")  # when the classifier has a model of unfamiliar images
EXPORTERS = ("dynamo", "torchscript")
EXTERNAL_DATA_BYTES = 1 << 30  # weights from this size on are written beside the graph (ONNX files stop at 2 GB)


def default_exporter() -> str:
    """torch.export-based ("dynamo") where it is torch.onnx's default (torch >= 2.9), else the TorchScript tracer."""
    return "dynamo" if torch_version() >= (2, 9) else "torchscript"


def get_args_parser(
    description: Optional[str] = None,
    parents: Optional[List[argparse.ArgumentParser]] = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    parser = get_classifier_args_parser(description, parents, add_help)
    parser.add_argument("--check-datasets", dest="check_dataset_strs", type=str, nargs="*", default=[],
                        help="Images the export is checked on (labels not needed), e.g. the validation split")
    parser.add_argument("--check-images", type=int, default=8,
                        help="Seeded random images the export is checked on when no --check-datasets are given")
    parser.add_argument("--batch-size", type=int, default=32, help="Batch size of the check")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="Largest accepted difference between ONNX Runtime's and torch's scores")
    parser.add_argument("--exporter", choices=EXPORTERS, default=default_exporter(),
                        help="torch.onnx exporter (default: dynamo on torch >= 2.9, else torchscript)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    return parser


class ExportedProbe(nn.Module):
    """Backbone + probe head: normalised images (B, 3, S, S) -> probabilities (B, C), score (B,), positive (B,), and
    with the classifier's model of unfamiliar images unfamiliarity (B,), unfamiliar (B,)."""

    def __init__(self, backbone: nn.Module, saved: SavedProbe):
        super().__init__()
        self.n_blocks = saved.head.n_blocks
        self.features = ProbeFeatureModel(backbone, self.n_blocks, contextlib.nullcontext)
        self.head = saved.head
        self.ood = saved.ood
        self.output_names = OUTPUT_NAMES + (OOD_OUTPUT_NAMES if self.ood is not None else ())
        self.register_buffer("image_threshold", torch.tensor(float(saved.thresholds["image"]["threshold"]),
                                                             dtype=torch.float64))

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        cls, patch_mean = split_feature_rows(self.features(images), self.n_blocks)
        probabilities = self.head(cls, patch_mean)
        score = 1.0 - probabilities[:, 0]
        outputs = (probabilities, score, score >= self.image_threshold)
        return outputs if self.ood is None else outputs + self.ood(cls)


def bake_pos_embed(backbone: nn.Module, image_size: int) -> None:
    """Replace the backbone's stored position embedding by its interpolation for `image_size`² inputs (in place), so
    the exported graph holds a constant instead of a bicubic resize."""
    grid = image_size // backbone.patch_size
    tokens = torch.zeros(1, 1 + grid * grid, backbone.embed_dim)
    with torch.no_grad():
        pos_embed = backbone.interpolate_pos_encoding(tokens, image_size, image_size)
    backbone.pos_embed = nn.Parameter(pos_embed.detach().clone(), requires_grad=False)


def export_metadata(saved: SavedProbe, output_names: Tuple[str, ...], config_file: str, pretrained_weights: str,
                    exporter: str, opset: int) -> Dict[str, object]:
    """What a runtime needs beside the graph (stored in the ONNX file and in model.json)."""
    source = saved.source
    with open(saved.path, "rb") as f:
        classifier_sha256 = hashlib.sha256(f.read()).hexdigest()
    transform = dict(source["eval_transform"])
    return {
        "format_version": FORMAT_VERSION,
        "probe": saved.probe,
        "class_names": saved.class_names,
        "thresholds": saved.thresholds,
        "eval_transform": {**transform, "interpolation": "bicubic", "mean": list(IMAGENET_DEFAULT_MEAN),
                           "std": list(IMAGENET_DEFAULT_STD)},
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, transform["crop_size"], transform["crop_size"]],
                  "dtype": "float32"},
        "outputs": list(output_names),
        "ood": ood_summary(saved.ood_params),
        "backbone_sha256": source["backbone_sha256"],
        "pretrained_weights": pretrained_weights,
        "config_file": config_file,
        "classifier": os.path.abspath(saved.path),
        "classifier_sha256": classifier_sha256,
        "torch": torch.__version__,
        "exporter": exporter,
        "opset": opset,
    }


def _torch_onnx_export(module: ExportedProbe, example: torch.Tensor, path: str, exporter: str, opset: int) -> None:
    kwargs = {"input_names": [INPUT_NAME], "output_names": list(module.output_names), "opset_version": opset}
    has_dynamo = "dynamo" in torch.onnx.export.__code__.co_varnames  # torch >= 2.5
    if exporter == "dynamo" and not has_dynamo:
        raise ValueError(f"--exporter dynamo needs torch >= 2.5 (this is {torch.__version__}): use torchscript")
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(module, (example,), path, dynamo=True, dynamic_shapes={"images": {0: batch}},
                          verbose=False, **kwargs)
    else:
        dynamic_axes = {name: {0: "batch"} for name in (INPUT_NAME, *module.output_names)}
        if has_dynamo:
            kwargs["dynamo"] = False
        torch.onnx.export(module, (example,), path, dynamic_axes=dynamic_axes, **kwargs)


def write_onnx(module: ExportedProbe, crop_size: int, folder: str, metadata: Dict[str, object], exporter: str,
               opset: int) -> List[str]:
    """Export `module` for (batch, 3, crop, crop) inputs with `metadata` under METADATA_KEY to `folder`/MODEL_NAME;
    weights of EXTERNAL_DATA_BYTES or more (ONNX files stop at 2 GB: ViT-g) go to MODEL_NAME.data beside it. Returns
    the file names, weights first."""
    import onnx

    raw = os.path.join(folder, "raw.onnx")
    with torch.no_grad():
        _torch_onnx_export(module, torch.zeros(2, 3, crop_size, crop_size), raw, exporter, opset)
    model = onnx.load(raw)
    del model.metadata_props[:]
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
    external = sum(p.numel() * p.element_size() for p in module.state_dict().values()) >= EXTERNAL_DATA_BYTES
    data_name = MODEL_NAME + ".data"
    onnx.save_model(model, os.path.join(folder, MODEL_NAME), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=data_name)
    return [data_name, MODEL_NAME] if external else [MODEL_NAME]


def read_metadata(path: str) -> Dict[str, object]:
    """The `dinov2_qc` metadata of an exported model; raises naming the file if it has none."""
    import onnx

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # onnx raises protobuf's DecodeError and others
        raise ValueError(f"{path} is not an ONNX model ({type(e).__name__}: {e})") from None
    values = [prop.value for prop in model.metadata_props if prop.key == METADATA_KEY]
    if not values:
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: not exported by dinov2.eval.export")
    try:
        metadata = json.loads(values[0])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its {METADATA_KEY!r} metadata is not JSON ({e})") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: export format {metadata.get('format_version')}, this version reads {FORMAT_VERSION}")
    return metadata


def _check_batches(args: argparse.Namespace, transform, crop_size: int) -> Iterator[Tuple[torch.Tensor, List[str]]]:
    """(images, names) batches of the check: the check datasets' images, else seeded random ones."""
    if not args.check_dataset_strs:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(args.check_images, 3, crop_size, crop_size, generator=generator)
        for start in range(0, len(images), args.batch_size):
            stop = min(start + args.batch_size, len(images))
            yield images[start:stop], [f"random image {i}" for i in range(start, stop)]
        return
    for dataset_str in args.check_dataset_strs:
        dataset = make_dataset(dataset_str=dataset_str, transform=transform)
        names = [f"{dataset_str}: {name}" for name in dataset_image_paths(dataset)]
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
        for start, (images, _) in zip(range(0, len(dataset), args.batch_size), loader):
            yield images, names[start : start + len(images)]


def check_export(args: argparse.Namespace, module: ExportedProbe, path: str, metadata: Dict[str, object]
                 ) -> Dict[str, object]:
    """Run the written model with ONNX Runtime on the check images against `module` in torch; raise naming the worst
    image if a score differs by more than the tolerance. Returns the check's record."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    transform = make_classification_eval_transform(**args.eval_transform)
    worst, worst_name, worst_ood, n_images, flips = 0.0, None, None, 0, []
    for images, names in _check_batches(args, transform, metadata["input"]["shape"][-1]):
        with torch.no_grad():
            reference = [out.numpy() for out in module(images)]
        outputs = session.run(list(module.output_names), {INPUT_NAME: images.numpy()})
        (_, score, positive, *ood), (_, reference_score, reference_positive, *reference_ood) = outputs, reference
        diff = np.abs(score - reference_score)
        if len(diff) and diff.max() > worst:
            worst, worst_name = float(diff.max()), names[int(diff.argmax())]
        if ood and len(diff):
            worst_ood = max(worst_ood or 0.0, float(np.abs(ood[0] - reference_ood[0]).max()))
        flips += [{"image": name, "torch_score": float(t), "onnx_score": float(o)}
                  for name, o, t, a, b in zip(names, score, reference_score, positive, reference_positive) if a != b]
        n_images += len(images)
    if n_images == 0:
        raise ValueError(f"no check images: {args.check_dataset_strs} are empty")
    record = {"images": args.check_dataset_strs or f"{args.check_images} seeded random images",
              "n_images": n_images, "max_abs_score_diff": worst, "worst_image": worst_name,
              "max_abs_unfamiliarity_diff": worst_ood, "tolerance": args.tolerance, "decisions_differ": flips,
              "onnxruntime": onnxruntime.__version__}
    if worst > args.tolerance or (worst_ood or 0.0) > args.tolerance:
        raise RuntimeError(f"{path}: ONNX Runtime's score of {worst_name} differs from torch's by {worst:.3g}, its "
                           f"unfamiliarity by up to {worst_ood} (> --tolerance {args.tolerance}); the export is not "
                           "kept")
    if flips:  # the two scores lie within the tolerance, on either side of the threshold: a score at the threshold
        logger.warning(f"{len(flips)} image decisions differ between ONNX Runtime and torch: their scores are equal to "
                       f"rounding and on either side of the image threshold {module.image_threshold.item()}: {flips}")
    return record


def check_arguments(args: argparse.Namespace) -> None:
    if not args.output_dir:
        raise ValueError("--output-dir is required")
    if args.check_images < 1 or args.batch_size < 1:
        raise ValueError(f"--check-images and --batch-size must be >= 1, got {args.check_images}, {args.batch_size}")
    if args.tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0, got {args.tolerance}")


def run_export(args: argparse.Namespace) -> Dict[str, object]:
    """Build and check the backbone, export it with the classifier, check the file with ONNX Runtime, write
    model.onnx and model.json. Returns the metadata with the check."""
    check_arguments(args)
    saved = load_probe_classifier(args.classifier)
    args.eval_transform = saved.source["eval_transform"]
    config = get_cfg_from_args(args)
    backbone = build_model_for_eval(config, args.pretrained_weights).cpu().float()
    check_backbone(saved, backbone_fingerprint(backbone), args.pretrained_weights, config.student)
    crop_size = int(args.eval_transform["crop_size"])
    bake_pos_embed(backbone, crop_size)
    module = ExportedProbe(backbone, saved).eval()
    metadata = export_metadata(saved, module.output_names, args.config_file, args.pretrained_weights, args.exporter,
                               args.opset)
    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.output_dir) as tmp:  # an export that fails its check replaces nothing
        files = write_onnx(module, crop_size, tmp, metadata, args.exporter, args.opset)
        check = check_export(args, module, os.path.join(tmp, MODEL_NAME), metadata)
        for name in files:  # the weights before the graph that names them
            os.replace(os.path.join(tmp, name), os.path.join(args.output_dir, name))
    stale = os.path.join(args.output_dir, MODEL_NAME + ".data")
    if MODEL_NAME + ".data" not in files and os.path.exists(stale):
        os.remove(stale)  # an earlier export's weights
    model_path = os.path.join(args.output_dir, MODEL_NAME)
    result = {**metadata, "files": files, "check": check}
    atomic_write(os.path.join(args.output_dir, METADATA_NAME), lambda f: f.write(json.dumps(result, indent=2).encode()))
    logger.info(f"wrote {model_path} ({saved.probe} classifier): on {check['n_images']} check images its scores in "
                f"ONNX Runtime are within {check['max_abs_score_diff']:.2g} of torch's, "
                f"{len(check['decisions_differ'])} decisions differ")
    return result


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    setup(args)  # logging and config.yaml in --output-dir
    run_export(args)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    distributed.exit_now(main(get_args_parser(description="Export a DINOv2 probe classifier to ONNX").parse_args()))
