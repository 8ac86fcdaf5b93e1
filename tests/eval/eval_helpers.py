"""Helpers of the evaluation tests (fixtures are in conftest.py)."""

import json
import pathlib

import torch
from omegaconf import OmegaConf

import dinov2.distributed as distributed
from dinov2.configs import dinov2_default_config, merge_configs
from dinov2.eval import features as features_module
from dinov2.eval.features import FeatureSet
from dinov2.eval import knn, linear, log_regression

EVAL_CONFIG = """\
student:
  arch: vit_tiny
  patch_size: 16
crops:
  global_crops_size: 64
train:
  seed: 0
"""
QC_ARGS = ["--resize-size", "64", "--crop-size", "64", "--num-workers", "0", "--batch-size", "8"]


def load_eval_config(path: pathlib.Path):
    return merge_configs(OmegaConf.create(dinov2_default_config), OmegaConf.load(path))


def dataset_str(root: pathlib.Path, split: str, annotation_file: str = "") -> str:
    extra = f":annotation_file=annotations/{annotation_file}" if annotation_file else ""
    return f"BBU:root={root}:split={split}{extra}"


def probe_args(module, config: pathlib.Path, weights, output_dir: pathlib.Path, *extra: str):
    argv = ["--config-file", str(config), "--pretrained-weights", str(weights), "--output-dir", str(output_dir)]
    return module.get_args_parser().parse_args([*argv, *QC_ARGS, *extra])


PROBES = {"knn": knn, "linear": linear, "log_regression": log_regression}
CLASSIFIER_FILES = {"knn": "knn_classifier.pth", "linear": "linear_classifier.pth",
                    "log_regression": "log_regression_classifier.json"}


def probe_options(probe: str, root) -> list:
    """Datasets and small settings of each probe in the tests: k-NN train -> test, linear and log-reg train, val ->
    test."""
    train, val, test = (dataset_str(root, s) for s in ("TRAIN", "VAL", "TEST"))
    if probe == "knn":
        return ["--train-dataset", train, "--val-dataset", test, "--nb_knn", "3", "5", "50", "--temperature", "0.07"]
    common = ["--train-dataset", train, "--val-dataset", val, "--test-datasets", test]
    if probe == "linear":
        return [*common, "--epochs", "2", "--epoch-length", "10", "--learning-rates", "0.01", "0.1"]
    return [*common, "--n-c", "3"]


def run_all_probes(root, config, weights, output_dir):
    """The three probes into one directory, in process; the extraction counts after each probe."""
    features_module.EXTRACTION_COUNTS.clear()
    counts = {}
    runners = {"knn": knn.run_eval_knn, "linear": linear.run_eval_linear,
               "log_regression": log_regression.run_eval_log_regression}
    try:
        for probe, module in PROBES.items():
            runners[probe](probe_args(module, config, weights, output_dir, *probe_options(probe, root)))
            counts[probe] = dict(features_module.EXTRACTION_COUNTS)
    finally:
        distributed.disable()  # session fixtures call this: leave no process group or exported variables behind
    return counts


def read_results(output_dir: pathlib.Path, probe: str) -> dict:
    return json.loads((output_dir / f"results_eval_{probe}.json").read_text())


def cached_feature_set(output_dir: pathlib.Path, tag: str, n_blocks: int = 4, dim: int = 192):
    """The FeatureSet of the single cached split `tag` of a run (metadata other than labels left empty)."""
    (path,) = (output_dir / "features").glob(f"{tag}_*.pt")
    payload = torch.load(path, weights_only=True)
    features, labels = payload["features"], payload["labels"].numpy()
    n = len(labels)
    cls = features[:, : n_blocks * dim].reshape(n, n_blocks, dim)
    return FeatureSet(payload["fields"]["dataset"], cls, features[:, n_blocks * dim :], labels, [""] * n, [""] * n,
                      ["negative", "positive"])
