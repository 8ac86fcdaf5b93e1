"""Common set-up of the evaluation CLIs: arguments, config, backbone with strictly loaded weights, autocast dtype."""

import argparse
import logging
import os
from typing import List, Optional, Tuple

import torch
import torch.backends.cudnn as cudnn
from omegaconf import DictConfig

from dinov2.eval.metrics import GROUP_AGGREGATIONS
from dinov2.eval.thresholds import parse_policy
from dinov2.models import build_model_from_cfg
from dinov2.utils.config import setup
from dinov2.utils.utils import check_compile_options, fix_random_seeds, load_pretrained_weights

logger = logging.getLogger("dinov2")

RANDOM_WEIGHTS = "random"


def get_args_parser(
    description: Optional[str] = None,
    parents: Optional[List[argparse.ArgumentParser]] = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, parents=parents or [], add_help=add_help)
    parser.add_argument("--config-file", type=str, help="Model configuration file")
    parser.add_argument(
        "--pretrained-weights",
        type=str,
        help="Backbone weights: teacher_checkpoint.pth, an official .pth, a URL, "
        f"or '{RANDOM_WEIGHTS}' for a seeded random initialisation (baseline)",
    )
    parser.add_argument("--output-dir", default="", type=str, help="Output directory to write results and logs")
    parser.add_argument("--opts", help="Extra configuration options", default=[], nargs="+")
    return parser


def get_probe_args_parser(
    description: Optional[str],
    parents: Optional[List[argparse.ArgumentParser]],
    add_help: bool,
    val_help: str = "Evaluated dataset",
) -> argparse.ArgumentParser:
    """Start of a probe CLI's parser: `parents`, the options of `get_args_parser`, --train-dataset and --val-dataset.
    The probe then adds its own options and `add_qc_arguments`."""
    parents = [*(parents or []), get_args_parser(parents=None, add_help=False)]
    parser = argparse.ArgumentParser(description=description, parents=parents, add_help=add_help)
    parser.add_argument("--train-dataset", dest="train_dataset_str", type=str, required=True, help="Training dataset")
    parser.add_argument("--val-dataset", dest="val_dataset_str", type=str, required=True, help=val_help)
    return parser


def get_classifier_args_parser(
    description: Optional[str], parents: Optional[List[argparse.ArgumentParser]], add_help: bool
) -> argparse.ArgumentParser:
    """Start of the parser of a CLI that applies a probe's saved classifier (predict, export): `parents`, the options
    of `get_args_parser` and --classifier."""
    parents = [*(parents or []), get_args_parser(parents=None, add_help=False)]
    parser = argparse.ArgumentParser(description=description, parents=parents, add_help=add_help)
    parser.add_argument("--classifier", type=str, required=True,
                        help="knn_classifier.pth, linear_classifier.pth or log_regression_classifier.json written by "
                        "a probe")
    return parser


def get_autocast_dtype(config: DictConfig) -> torch.dtype:
    """Inference dtype of the teacher backbone from `compute_precision.teacher.backbone.mixed_precision.param_dtype`."""
    teacher_dtype_str = config.compute_precision.teacher.backbone.mixed_precision.param_dtype
    if teacher_dtype_str == "fp16":
        return torch.half
    if teacher_dtype_str == "bf16":
        return torch.bfloat16
    return torch.float


def build_model_for_eval(config: DictConfig, pretrained_weights: Optional[str]) -> torch.nn.Module:
    """Teacher backbone of `config` in eval mode, on CUDA if available, with strictly loaded weights.

    The model is built after seeding with `train.seed` (the same on every rank), so `pretrained_weights == "random"`
    gives a reproducible random backbone. A checkpoint that does not match the architecture raises.
    """
    if not pretrained_weights:
        raise ValueError(f"--pretrained-weights is required: a checkpoint path/URL or '{RANDOM_WEIGHTS}'")
    fix_random_seeds(int(config.train.seed))
    model, _ = build_model_from_cfg(config, only_teacher=True)
    if pretrained_weights == RANDOM_WEIGHTS:
        logger.warning(
            f"Evaluating a RANDOMLY INITIALISED {config.student.arch}/{config.student.patch_size} backbone "
            f"(seed {config.train.seed}) as a baseline: --pretrained-weights {RANDOM_WEIGHTS}"
        )
    else:
        load_pretrained_weights(model, pretrained_weights, checkpoint_key="teacher", strict=True)
    model.eval()
    model.to(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    return model


def setup_eval_model(args: argparse.Namespace) -> Tuple[torch.nn.Module, torch.dtype, DictConfig]:
    """Config and run set-up (`dinov2.utils.config.setup`), then the evaluation backbone, its autocast dtype
    (the configured teacher dtype on CUDA; float32 on CPU) and the config."""
    cudnn.benchmark = True
    if not args.output_dir:
        args.output_dir = os.getcwd()
        logger.info(f"--output-dir not given: writing to the current directory {args.output_dir}")
    config = setup(args)
    model = build_model_for_eval(config, args.pretrained_weights)
    autocast_dtype = get_autocast_dtype(config) if torch.cuda.is_available() else torch.float
    return model, autocast_dtype, config


def setup_and_build_model(args: argparse.Namespace) -> Tuple[torch.nn.Module, torch.dtype]:
    """Upstream's entry point: `setup_eval_model` without the config."""
    model, autocast_dtype, _ = setup_eval_model(args)
    return model, autocast_dtype


def add_qc_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the three probes: eval transform, operating threshold and group metrics, and those of
    `add_inference_arguments`."""
    add_transform_arguments(parser)
    parser.add_argument(
        "--threshold-policy",
        type=str,
        default="f1",
        help="Operating threshold chosen on validation scores: f1, youden or recall@R (e.g. recall@0.95)",
    )
    parser.add_argument(
        "--group-aggregation",
        choices=GROUP_AGGREGATIONS,
        default="mean",
        help="How the image scores of one group (device) are combined: mean, max or majority vote",
    )
    parser.add_argument("--ood-components", type=non_negative_int, default=32,
                        help="Unfamiliar images (dinov2/eval/ood.py): principal directions of the training features")
    parser.add_argument("--ood-quantile", type=_quantile, default=0.99,
                        help="Unfamiliar images: flagged above this quantile of held-out training images")
    add_inference_arguments(parser)


def add_transform_arguments(parser: argparse.ArgumentParser) -> None:
    """The eval transform's options (the probes' defaults)."""
    parser.add_argument("--resize-size", type=int, default=256, help="Eval transform: resize the short side to this")
    parser.add_argument("--crop-size", type=int, default=224, help="Eval transform: center crop size")
    parser.add_argument(
        "--draft-reducing-gap",
        type=float,
        default=2.0,
        help="Eval transform: decode JPEGs at the coarsest DCT scale (1/2, 1/4, 1/8) that keeps the short side at "
        "least this many times --resize-size (3-4x faster on 12 MP photos; features within rounding of a full "
        "decode); 0 decodes at full size, as upstream",
    )


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _quantile(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of every command that scores images with the frozen backbone (the probes and `dinov2.eval.predict`):
    extraction workers, feature cache, compile, weight cast, and the FPR of the recall_at_fpr metric."""
    parser.add_argument("--num-workers", type=int, default=8, help="Data loader workers for feature extraction")
    parser.add_argument(
        "--features-dir", type=str, default=None, help="Feature cache directory (default: <output-dir>/features)"
    )
    parser.add_argument(
        "--fpr-target", type=float, default=0.01, help="False-positive rate for the recall_at_fpr metric"
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the backbone blocks for feature extraction (default backend: inductor; pays off on "
        "large datasets on a GPU)",
    )
    parser.add_argument(
        "--cast-weights",
        action="store_true",
        help="Extract features with the backbone cast to the inference dtype (compute_precision.teacher.backbone "
        "param_dtype, on a GPU) instead of autocast over float32 weights: less memory traffic; the features differ "
        "by rounding (the residual stream is then bf16/fp16 too)",
    )


def check_qc_arguments(args: argparse.Namespace) -> None:
    """Fail early on a bad threshold policy (commands that set no threshold have none), FPR target, draft gap or
    compile backend, before any feature is extracted."""
    if getattr(args, "threshold_policy", None) is not None:
        parse_policy(args.threshold_policy)
    if not 0.0 <= args.fpr_target <= 1.0:
        raise ValueError(f"--fpr-target must be in [0, 1], got {args.fpr_target}")
    if args.draft_reducing_gap != 0 and args.draft_reducing_gap < 1:
        raise ValueError(f"--draft-reducing-gap must be 0 (full-size decode) or >= 1, got {args.draft_reducing_gap}")
    if args.compile:
        check_compile_options(args.compile, None, backend_key="--compile")
