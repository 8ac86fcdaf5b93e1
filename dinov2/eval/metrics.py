"""Evaluation metrics: upstream's accuracy metric types and the quality-control (QC) metric suite.

Upstream keeps `MetricType` / `build_metric` (top-k accuracy collections). The QC suite adds, at image level and at
group level (the images sharing a `group_id`, e.g. the three photos of one BBU device), the binary metrics of the
*positive* (defect) class: accuracy, balanced accuracy, precision, recall, specificity, F1, ROC AUC, average precision,
confusion matrix and recall at a fixed false-positive rate. All values are fractions in [0, 1]; a value whose
denominator is zero is `None` (JSON null) and the reason is added to the `warnings` list of the result.

Conventions (documented choices):
- the positive-class score is `1 - p(class 0)`: class 0 is the OK / negative class (BBU: ["negative", "positive"]);
  with two classes this is p(class 1). Multi-class data gets per-class and macro metrics in addition.
- an image / group is predicted positive when its score is >= the threshold.
- a group is positive when ANY of its images is positive (label = max over images); groups whose images carry
  different labels are counted and listed as `mixed_label_groups`.
"""

import logging
from enum import Enum
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import dinov2.distributed as distributed

logger = logging.getLogger("dinov2")

GROUP_AGGREGATIONS = ("mean", "max", "vote")
SELECTION_METRICS = ("mean_accuracy", "mean_per_class_accuracy", "auroc", "average_precision")


class MetricType(Enum):
    MEAN_ACCURACY = "mean_accuracy"
    MEAN_PER_CLASS_ACCURACY = "mean_per_class_accuracy"
    PER_CLASS_ACCURACY = "per_class_accuracy"

    @property
    def accuracy_averaging(self) -> str:
        return {"mean_accuracy": "micro", "mean_per_class_accuracy": "macro", "per_class_accuracy": "none"}[self.value]

    def __str__(self) -> str:
        return self.value


class TopKAccuracy:
    """Top-k accuracy over `num_classes` classes, averaged "micro" (all samples), "macro" (mean over the classes that
    occur in the targets) or "none" (per class; NaN for a class without samples). Summed across ranks on compute."""

    def __init__(self, num_classes: int, top_k: int = 1, average: str = "micro"):
        if average not in ("micro", "macro", "none"):
            raise ValueError(f"average must be micro, macro or none, got {average!r}")
        if not 1 <= top_k <= num_classes:
            raise ValueError(f"top_k={top_k} needs 1 <= top_k <= num_classes={num_classes}")
        self.num_classes, self.top_k, self.average = num_classes, top_k, average
        self.reset()

    def reset(self) -> None:
        self.correct = torch.zeros(self.num_classes, dtype=torch.float64)
        self.total = torch.zeros(self.num_classes, dtype=torch.float64)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = preds.detach().cpu(), target.detach().cpu().long()
        hit = (preds.topk(self.top_k, dim=1).indices == target[:, None]).any(dim=1).double()
        self.correct.index_add_(0, target, hit)
        self.total.index_add_(0, target, torch.ones_like(hit))

    def compute(self) -> torch.Tensor:
        correct, total = self.correct.clone(), self.total.clone()
        if distributed.is_multi_process():
            counts = torch.stack([correct, total]).to(distributed.collective_device())
            torch.distributed.all_reduce(counts)
            correct, total = counts.cpu()
        if self.average == "micro":
            return correct.sum() / total.sum().clamp(min=1)
        per_class = correct / total
        if self.average == "none":
            return per_class
        return per_class[total > 0].mean()


class MetricCollection(dict):
    """Name -> metric; `update` feeds every metric, `compute` returns name -> value (upstream's torchmetrics API).
    The metric collections that `dinov2.eval.utils.evaluate` takes."""

    def update(self, **kwargs) -> None:
        for metric in self.values():
            metric.update(**kwargs)

    def compute(self) -> Dict[str, torch.Tensor]:
        return {name: metric.compute() for name, metric in self.items()}

    def reset(self) -> None:
        for metric in self.values():
            metric.reset()


def build_metric(metric_type: MetricType, *, num_classes: int, ks: Sequence[int] = (1, 5)) -> MetricCollection:
    """Upstream's `{"top-1", "top-5"}` accuracy collection; a top-k with k > num_classes is left out."""
    metric_type = MetricType(metric_type)
    return MetricCollection(
        {
            f"top-{k}": TopKAccuracy(num_classes, top_k=k, average=metric_type.accuracy_averaging)
            for k in ks
            if k <= num_classes
        }
    )


def positive_scores(probs: np.ndarray) -> np.ndarray:
    """Positive (defect) class score per row of class probabilities: 1 - p(class 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"expected (N, C>=2) class probabilities, got shape {probs.shape}")
    return 1.0 - probs[:, 0]


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num) / float(den) if den > 0 else None


def threshold_curve(labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every distinct score t (descending): (t, true positives, false positives) when predicting `score >= t`."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    tp, fp = np.cumsum(sorted_labels), np.cumsum(~sorted_labels)
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True] if len(scores) else np.zeros(0, dtype=bool)
    return sorted_scores[last_of_run], tp[last_of_run], fp[last_of_run]


def recall_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr_target: float) -> Optional[float]:
    """Highest recall of a threshold whose false-positive rate is <= `fpr_target` (None without both classes)."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, tp, fp = threshold_curve(labels, scores)
    allowed = fp / n_neg <= fpr_target
    return float(tp[allowed].max() / n_pos) if allowed.any() else 0.0


def binary_metrics(
    labels: np.ndarray, scores: np.ndarray, threshold: float, fpr_target: float = 0.01
) -> Dict[str, object]:
    """QC metrics of the positive class for binary `labels` (0/1) and positive-class `scores` at `threshold`."""
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be 1-D of equal length")
    if ((labels != 0) & (labels != 1)).any():
        raise ValueError(f"binary labels must be 0 or 1, got {sorted(set(labels.tolist()))}")
    warnings: List[str] = []
    n = len(labels)
    pos = labels == 1
    pred = scores >= threshold
    tp, fp = int((pred & pos).sum()), int((pred & ~pos).sum())
    fn, tn = int((~pred & pos).sum()), int((~pred & ~pos).sum())
    n_pos, n_neg = tp + fn, tn + fp
    recall, specificity = _ratio(tp, n_pos), _ratio(tn, n_neg)
    present = [v for v in (recall, specificity) if v is not None]
    if n == 0:
        warnings.append("empty split: no samples, every metric is null")
    elif n_pos == 0 or n_neg == 0:
        warnings.append(f"one-class split ({'no positives' if n_pos == 0 else 'no negatives'}): auroc, "
                        f"average_precision and recall_at_fpr are null")
    auroc = ap = None
    if n_pos > 0 and n_neg > 0:
        auroc = float(roc_auc_score(labels, scores))
        ap = float(average_precision_score(labels, scores))
    result = {
        "accuracy": _ratio(tp + tn, n),
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auroc": auroc,
        "average_precision": ap,
        "recall_at_fpr": recall_at_fpr(labels, scores, fpr_target),
        "fpr_target": float(fpr_target),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "threshold": float(threshold),
        "n_samples": n,
        "n_positive": n_pos,
        "n_negative": n_neg,
        "warnings": warnings,
    }
    for message in warnings:
        logger.warning(message)
    return result


def multiclass_metrics(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> Dict[str, object]:
    """Arg-max accuracy, balanced accuracy, C x C confusion matrix, and one-vs-rest per-class and macro metrics."""
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    pred = probs.argmax(axis=1) if len(labels) else np.zeros(0, dtype=np.int64)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    per_class = {}
    for c, name in enumerate(class_names):
        is_c, pred_c = labels == c, pred == c
        tp, fp, fn = int((is_c & pred_c).sum()), int((~is_c & pred_c).sum()), int((is_c & ~pred_c).sum())
        both = 0 < is_c.sum() < len(labels)
        per_class[name] = {
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "auroc": float(roc_auc_score(is_c, probs[:, c])) if both else None,
            "average_precision": float(average_precision_score(is_c, probs[:, c])) if both else None,
            "n_samples": int(is_c.sum()),
        }
    # Macro precision/recall/F1 as scikit-learn's: over the classes that occur in the labels or the predictions, an
    # undefined ratio counting 0 (a class never predicted has precision 0, not "left out"). Balanced accuracy is the
    # mean recall over the classes that occur in the labels; AUROC/AP over the classes where they are defined.
    seen = [m for c, m in enumerate(per_class.values()) if m["n_samples"] > 0 or (pred == c).any()]
    macro: Dict[str, Optional[float]] = {
        key: float(np.mean([m[key] or 0.0 for m in seen])) if seen else None
        for key in ("precision", "recall", "f1")
    }
    for key in ("auroc", "average_precision"):
        values = [m[key] for m in per_class.values() if m[key] is not None]
        macro[key] = float(np.mean(values)) if values else None
    recalls = [m["recall"] for m in per_class.values() if m["n_samples"] > 0]
    return {
        "accuracy": _ratio(int(np.trace(cm)), len(labels)),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
        "macro": macro,
    }


def aggregate_groups(
    group_ids: Sequence[str],
    labels: np.ndarray,
    scores: np.ndarray,
    method: str = "mean",
    image_threshold: Optional[float] = None,
) -> Tuple[List[str], np.ndarray, np.ndarray, List[str]]:
    """Combine image scores per group -> (group ids in first-seen order, group labels, group scores, mixed-label ids).

    `mean`/`max` combine the positive-class scores; `vote` is the fraction of the group's images predicted positive at
    `image_threshold` (the group is positive on a majority, i.e. vote >= 0.5). A group's label is the max of its
    binary image labels (one defective photo makes the device defective).
    """
    if method not in GROUP_AGGREGATIONS:
        raise ValueError(f"group aggregation must be one of {GROUP_AGGREGATIONS}, got {method!r}")
    if method == "vote" and image_threshold is None:
        raise ValueError("group aggregation 'vote' needs the image threshold")
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    members: Dict[str, List[int]] = {}
    for i, gid in enumerate(group_ids):
        members.setdefault(str(gid), []).append(i)
    ids = list(members)
    g_labels = np.zeros(len(ids), dtype=np.int64)
    g_scores = np.zeros(len(ids), dtype=np.float64)
    mixed = []
    for j, gid in enumerate(ids):
        idx = np.asarray(members[gid])
        g_labels[j] = labels[idx].max()
        if len(set(labels[idx].tolist())) > 1:
            mixed.append(gid)
        s = scores[idx]
        g_scores[j] = s.mean() if method == "mean" else s.max() if method == "max" else (s >= image_threshold).mean()
    return ids, g_labels, g_scores, mixed


def qc_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    group_ids: Sequence[str],
    class_names: Sequence[str],
    *,
    image_threshold: float,
    group_threshold: float,
    aggregation: str = "mean",
    fpr_target: float = 0.01,
) -> Dict[str, Dict[str, object]]:
    """Image- and group-level QC metrics of one probe on one split (plus multi-class metrics with > 2 classes)."""
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(labels), len(class_names))
    binary_labels = (labels != 0).astype(np.int64)
    scores = positive_scores(probs)
    image = binary_metrics(binary_labels, scores, image_threshold, fpr_target)
    image["top-1"] = _ratio(int((probs.argmax(axis=1) == labels).sum()), len(labels)) if len(labels) else None
    if len(class_names) > 2:
        image["multiclass"] = multiclass_metrics(labels, probs, class_names)
    ids, g_labels, g_scores, mixed = aggregate_groups(group_ids, binary_labels, scores, aggregation, image_threshold)
    group = binary_metrics(g_labels, g_scores, group_threshold, fpr_target)
    group["aggregation"] = aggregation
    group["n_images"] = len(labels)
    group["n_mixed_label_groups"] = len(mixed)
    group["mixed_label_groups"] = mixed
    if mixed:
        message = f"{len(mixed)} group(s) have images with different labels; group label = max (any positive image)"
        logger.warning(message)
        group["warnings"].append(message)
    return {"image": image, "group": group}


def selection_score(metric: str, probs: np.ndarray, labels: np.ndarray) -> float:
    """Validation score used to pick a probe setting (higher is better; -inf when undefined on this split).

    `mean_accuracy` / `mean_per_class_accuracy` are upstream's arg-max accuracies (micro / macro over present
    classes); `auroc` / `average_precision` rank the positive-class score.
    """
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(labels) == 0:
        return float("-inf")
    if metric in ("mean_accuracy", "mean_per_class_accuracy"):
        correct = probs.argmax(axis=1) == labels
        if metric == "mean_accuracy":
            return float(correct.mean())
        return float(np.mean([correct[labels == c].mean() for c in np.unique(labels)]))
    if metric not in ("auroc", "average_precision"):
        raise ValueError(f"selection metric must be one of {SELECTION_METRICS}, got {metric!r}")
    binary = labels != 0
    if binary.all() or not binary.any():
        return float("-inf")
    scores = positive_scores(probs)
    return float(roc_auc_score(binary, scores) if metric == "auroc" else average_precision_score(binary, scores))
