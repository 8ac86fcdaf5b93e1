"""Probe classifiers loaded from their files, for scoring new images (`dinov2.eval.predict`, `dinov2.eval.predictor`).

The k-NN probe's `knn_classifier.pth` (training features, k, temperature), the linear probe's `linear_classifier.pth`
and the log-reg probe's `log_regression_classifier.json` each hold the thresholds and the source of their training
features (dinov2/eval/features.py): the backbone's state-dict fingerprint and the eval transform. `check_backbone`
refuses a backbone other than the classifier's: its scores would mean nothing.
"""

import dataclasses
import json
import os
import pickle
from typing import Callable, Dict, List

import numpy as np
import torch

from dinov2.eval import knn, linear, log_regression
from dinov2.eval.features import FeatureSet

_LOG_REGRESSION_KEYS = ("coef", "intercept", "classes", "class_names", "thresholds")


@dataclasses.dataclass
class SavedProbe:
    """A probe classifier loaded from its file: `score` maps a split's features to (N, C) class probabilities."""

    probe: str  # "knn", "linear" or "log_regression", as in the output file names
    path: str
    payload: Dict[str, object]
    score: Callable[[FeatureSet], np.ndarray]

    @property
    def class_names(self) -> List[str]:
        return list(self.payload["class_names"])

    @property
    def thresholds(self) -> Dict[str, object]:
        return self.payload["thresholds"]

    @property
    def source(self) -> Dict[str, object]:
        """What the training features were extracted with; raises if the file predates this record."""
        source = self.payload.get("features")
        if not source or "backbone_sha256" not in source or "eval_transform" not in source:
            raise ValueError(f"--classifier {self.path} does not record the backbone and eval transform its training "
                             "features came from (written by an older version): run the probe again to rewrite it")
        return source


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
    num_classes = len(payload["class_names"])
    dtype = payload.get("settings", {}).get("train_dtype", "float64")

    def score(features: FeatureSet) -> np.ndarray:
        x = features.normalized_cls().numpy().astype(dtype)
        return log_regression.log_regression_probabilities(payload, x, num_classes)

    return SavedProbe("log_regression", path, payload, score)


def _knn_probe(path: str, payload: Dict[str, object]) -> SavedProbe:
    train_x, train_y = payload["train_features"], payload["train_labels"]
    k, temperature, num_classes = int(payload["k"]), float(payload["temperature"]), len(payload["class_names"])

    def score(features: FeatureSet) -> np.ndarray:
        query = features.normalized_cls()
        return knn.knn_class_probabilities(train_x, train_y, query, [k], temperature, num_classes)[k]

    return SavedProbe("knn", path, payload, score)


def _load_torch_classifier(path: str) -> SavedProbe:
    """A k-NN or linear classifier: told apart by their keys."""
    expected = f"{knn.CLASSIFIER_NAME} or {linear.CHECKPOINT_NAME} written by a probe"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and "train_features" in payload:
            return _knn_probe(path, payload)
        classifier = linear.linear_classifier_from_payload(payload)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--classifier {path} is not a {expected} ({type(e).__name__}: {e})") from None
    return SavedProbe("linear", path, payload, lambda features: linear.predict(classifier, features))


def load_probe_classifier(path: str) -> SavedProbe:
    """The k-NN or linear (.pth) or log-reg (.json) classifier at `path`, with its thresholds; raises naming the
    file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--classifier {path}: no such file")
    return _load_log_regression(path) if path.endswith(".json") else _load_torch_classifier(path)


def check_backbone(saved: SavedProbe, fingerprint: str, pretrained_weights: str) -> None:
    """Raise naming both weights when the backbone with state-dict SHA-256 `fingerprint` is not the classifier's."""
    source = saved.source
    if fingerprint != source["backbone_sha256"]:
        raise ValueError(
            f"--pretrained-weights {pretrained_weights} (state dict SHA-256 {fingerprint}) is not the backbone the "
            f"classifier {saved.path} was trained on ({source['pretrained_weights']}, SHA-256 "
            f"{source['backbone_sha256']})"
        )
