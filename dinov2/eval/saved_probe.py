"""Probe classifiers loaded from their files, for scoring new images (`dinov2.eval.predict`, `dinov2.eval.predictor`).

The k-NN probe's `knn_classifier.pth` (training features, k, temperature), the linear probe's `linear_classifier.pth`
and the log-reg probe's `log_regression_classifier.json` each hold the thresholds and the source of their training
features (dinov2/eval/features.py): the backbone's state-dict fingerprint, its config and the eval transform.
`check_backbone` refuses a backbone other than the classifier's, or one configured to compute other features from the
same weights: its scores would mean nothing.
"""

import dataclasses
import functools
import json
import os
import pickle
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from dinov2.eval import knn, linear, log_regression
from dinov2.eval.features import FeatureSet
from dinov2.eval.ood import OodHead

_LOG_REGRESSION_KEYS = ("coef", "intercept", "classes", "class_names", "thresholds")
SCORE_CHUNK = 1024  # images scored at once: bounds the k-NN similarity matrix
# config.student keys that change the features without changing the state dict (how the position embedding is
# interpolated to another grid); the state-dict fingerprint covers the others (arch, patch size, registers, ...)
FEATURE_CONFIG_KEYS = ("interpolate_offset", "interpolate_antialias")


@dataclasses.dataclass
class SavedProbe:
    """A probe classifier loaded from its file. `head` maps class tokens (N, n, D) of the last n >= head.n_blocks
    blocks and mean patch tokens (N, D) to (N, C) float64 class probabilities (the probe's maths: predict, the
    predictor and the ONNX export share it)."""

    probe: str  # "knn", "linear" or "log_regression", as in the output file names
    path: str
    payload: Dict[str, object]
    head: nn.Module

    @property
    def class_names(self) -> List[str]:
        return list(self.payload["class_names"])

    @property
    def thresholds(self) -> Dict[str, object]:
        return self.payload["thresholds"]

    @property
    def ood_params(self) -> Optional[Dict[str, object]]:
        """The model of unfamiliar images saved with the classifier (dinov2/eval/ood.py); None in classifiers written
        before it, or trained on a split with no group to hold out."""
        return self.payload.get("ood")

    @functools.cached_property
    def ood(self) -> Optional[OodHead]:
        """`ood_params` as a module."""
        return None if self.ood_params is None else OodHead(self.ood_params).eval()

    @property
    def source(self) -> Dict[str, object]:
        """What the training features were extracted with; raises if the file predates this record."""
        source = self.payload.get("features")
        if not source or "backbone_sha256" not in source or "eval_transform" not in source:
            raise ValueError(f"--classifier {self.path} does not record the backbone and eval transform its training "
                             "features came from (written by an older version): run the probe again to rewrite it")
        return source

    def score(self, features: FeatureSet) -> np.ndarray:
        """(N, C) class probabilities of a split's features."""
        return self.score_tokens(features.cls, features.patch_mean)

    @torch.inference_mode()
    def score_tokens(self, cls: torch.Tensor, patch_mean: torch.Tensor) -> np.ndarray:
        """(N, C) class probabilities of class tokens (N, n, D) of the last n blocks and mean patch tokens (N, D)."""
        if cls.shape[1] < self.head.n_blocks:
            raise ValueError(f"--classifier {self.path} reads {self.head.n_blocks} blocks, {cls.shape[1]} given")
        chunks = [self.head(cls[i : i + SCORE_CHUNK], patch_mean[i : i + SCORE_CHUNK])
                  for i in range(0, len(cls), SCORE_CHUNK)]
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, len(self.class_names)))


def _load_log_regression(path: str) -> SavedProbe:
    with open(path, "rb") as f:
        try:
            payload = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--classifier {path}: invalid JSON ({e})") from None
    missing = [k for k in _LOG_REGRESSION_KEYS if k not in payload] if isinstance(payload, dict) else ["all"]
    if missing:
        raise ValueError(f"--classifier {path} is not a {log_regression.CLASSIFIER_NAME} written by the log-reg probe "
                         f"(missing {missing})")
    train_dtype = payload.get("settings", {}).get("train_dtype", "float64")
    head = log_regression.LogRegressionHead(payload, len(payload["class_names"]), train_dtype)
    return SavedProbe("log_regression", path, payload, head.eval())


def _load_torch_classifier(path: str) -> SavedProbe:
    """A k-NN or linear classifier: told apart by their keys."""
    expected = f"{knn.CLASSIFIER_NAME} or {linear.CHECKPOINT_NAME} written by a probe"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and "train_features" in payload:
            head = knn.KnnHead(payload["train_features"], payload["train_labels"], int(payload["k"]),
                               float(payload["temperature"]), len(payload["class_names"]))
            return SavedProbe("knn", path, payload, head.eval())
        classifier = linear.linear_classifier_from_payload(payload)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--classifier {path} is not a {expected} ({type(e).__name__}: {e})") from None
    return SavedProbe("linear", path, payload, linear.LinearProbeHead(classifier).eval())


def load_probe_classifier(path: str) -> SavedProbe:
    """The k-NN or linear (.pth) or log-reg (.json) classifier at `path`, with its thresholds; raises naming the
    file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--classifier {path}: no such file")
    return _load_log_regression(path) if path.endswith(".json") else _load_torch_classifier(path)


def check_backbone(saved: SavedProbe, fingerprint: str, pretrained_weights: str, student: Mapping[str, Any]) -> None:
    """Raise naming both weights when the backbone with state-dict SHA-256 `fingerprint` is not the classifier's, and
    naming the key when its config `student` (config.student) computes other features (`FEATURE_CONFIG_KEYS`)."""
    source = saved.source
    if fingerprint != source["backbone_sha256"]:
        raise ValueError(
            f"--pretrained-weights {pretrained_weights} (state dict SHA-256 {fingerprint}) is not the backbone the "
            f"classifier {saved.path} was trained on ({source['pretrained_weights']}, SHA-256 "
            f"{source['backbone_sha256']})"
        )
    trained = source.get("model", {})
    for key in FEATURE_CONFIG_KEYS:
        if key in trained and student.get(key) != trained[key]:
            raise ValueError(
                f"student.{key} is {student.get(key)!r} in this config but was {trained[key]!r} for the features the "
                f"classifier {saved.path} was trained on: the position embedding would be interpolated otherwise and "
                f"the features would differ; use the probe's config (or --opts student.{key}={trained[key]})"
            )
