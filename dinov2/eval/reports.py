"""Probe outputs in the output directory: results JSON, per-image/per-group prediction CSVs, PNG plots, report.md.

Files (for probe P in knn / linear / log_regression and split tag S, e.g. "test"):
    results_eval_P.json                 metrics per evaluated dataset, keys "image" and "group" (see metrics.py)
    predictions_P_S.csv                 img_path, group_id, label, score, prediction (+ prob_<class> if > 2 classes);
                                        score = positive-class score (full precision), prediction = score >=
                                        the image threshold
    predictions_P_S_groups.csv          group_id, n_images, label, score, prediction, mixed_labels
    plots/P_S_{image,group}.png         ROC, precision-recall, confusion matrix, score histogram per class
    report.md                           all probes of the directory, rebuilt after each probe
"""

import argparse
import csv
import json
import logging
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from dinov2.eval.features import FeatureSet
from dinov2.eval.metrics import aggregate_groups, positive_scores, qc_metrics
from dinov2.eval.ood import OodHead
from dinov2.eval.setup import RANDOM_WEIGHTS
from dinov2.utils.utils import atomic_write

logger = logging.getLogger("dinov2")

PROBES = ("knn", "linear", "log_regression")
GroupTable = Tuple[List[str], np.ndarray, np.ndarray, List[str]]  # group ids, labels, scores, mixed-label ids
KEY_METRICS = (
    "accuracy", "balanced_accuracy", "precision", "recall", "f1", "auroc", "average_precision", "recall_at_fpr"
)


def results_path(output_dir: str, probe: str) -> str:
    return os.path.join(output_dir, f"results_eval_{probe}.json")


def write_json_atomic(path: str, obj: object) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), binary=False)


def write_csv_atomic(path: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    def write(f) -> None:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)

    atomic_write(path, write, binary=False)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _plot_level(path: str, title: str, labels: np.ndarray, scores: np.ndarray, metrics: Dict[str, object],
                class_names: Sequence[str]) -> None:
    """One PNG with four panels: ROC, precision-recall, confusion matrix at the threshold, score histogram per class."""
    figure = Figure(figsize=(11, 9))
    FigureCanvasAgg(figure)
    (roc_ax, pr_ax), (cm_ax, hist_ax) = figure.subplots(2, 2)
    binary = (labels != 0).astype(np.int64)
    has_both = 0 < binary.sum() < len(binary)
    if has_both:
        fpr, tpr, _ = roc_curve(binary, scores)
        roc_ax.plot(fpr, tpr, label=f"AUROC {_fmt(metrics['auroc'])}")
        precision, recall, _ = precision_recall_curve(binary, scores)
        pr_ax.plot(recall, precision, label=f"AP {_fmt(metrics['average_precision'])}")
        roc_ax.legend(loc="lower right")
        pr_ax.legend(loc="lower left")
    else:
        for ax in (roc_ax, pr_ax):
            ax.text(0.5, 0.5, "undefined: one class only", ha="center", va="center")
    roc_ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    roc_ax.set(xlabel="false-positive rate", ylabel="recall", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    cm = np.asarray(metrics["confusion_matrix"])
    cm_ax.imshow(cm, cmap="Blues")
    for (i, j), count in np.ndenumerate(cm):
        colour = "white" if count > cm.max() / 2 else "black"
        cm_ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=14)
    cm_ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["pred neg", "pred pos"], yticklabels=["neg", "pos"],
              title=f"Confusion matrix at threshold {metrics['threshold']:.4f}")
    bins = np.linspace(0.0, 1.0, 26)
    for c in np.unique(labels):
        name = class_names[c] if c < len(class_names) else str(c)
        hist_ax.hist(scores[labels == c], bins=bins, alpha=0.5, label=f"{name} (n={(labels == c).sum()})")
    hist_ax.axvline(metrics["threshold"], color="red", linestyle="--", label="threshold")
    hist_ax.set(xlabel="positive-class score", ylabel="count", title="Score histogram per class")
    hist_ax.legend(loc="upper center")
    figure.suptitle(title)
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=80))


def evaluate_split(
    output_dir: str,
    probe: str,
    features: FeatureSet,
    probs: np.ndarray,
    thresholds: Dict[str, object],
    fpr_target: float,
    tag: Optional[str] = None,
    write_files: bool = True,
    ood: Optional[Dict[str, object]] = None,
) -> Dict[str, object]:
    """QC metrics of class probabilities `probs` (N, C) on one split at the saved thresholds; with `write_files`,
    also the prediction CSVs and the plots; with a probe's model of unfamiliar images `ood` (dinov2/eval/ood.py),
    how many of the split's images it flags. Returns {"image": ..., "group": ..., ["unfamiliar": ...,]
    "files": [...]}."""
    tag = tag or features.tag
    aggregation = thresholds["group_aggregation"]
    image_t, group_t = thresholds["image"]["threshold"], thresholds["group"]["threshold"]
    probs = np.asarray(probs, dtype=np.float64).reshape(len(features), len(features.class_names))
    result = qc_metrics(probs, features.labels, features.group_ids, features.class_names, image_threshold=image_t,
                        group_threshold=group_t, aggregation=aggregation, fpr_target=fpr_target)
    for level in ("image", "group"):
        result[level]["threshold_fallback"] = bool(thresholds[level]["fallback"])
    if ood is not None:
        with torch.inference_mode():
            _, unfamiliar = OodHead(ood)(features.cls)
        result["unfamiliar"] = {"n_images": int(unfamiliar.sum()),
                                "share": float(unfamiliar.double().mean()) if len(features) else None,
                                "expected_share": 1.0 - ood["quantile"], "threshold": ood["threshold"]}
    if not write_files:
        return result
    stem = f"{probe}_{tag}"
    scores = positive_scores(probs) if len(probs) else np.zeros(0)
    groups = group_scores(features, scores, thresholds)
    files = write_predictions(output_dir, stem, features, probs, thresholds, scores=scores, groups=groups)
    _, g_labels, g_scores, _ = groups
    plots_dir = os.path.join(output_dir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    group_names = ["negative group", "positive group"]
    for level, labels, level_scores, names in (("image", features.labels, scores, features.class_names),
                                               ("group", g_labels, g_scores, group_names)):
        path = os.path.join(plots_dir, f"{stem}_{level}.png")
        _plot_level(path, f"{probe} on {tag}: {level} level", labels, level_scores, result[level], names)
        files.append(os.path.relpath(path, output_dir))
    result["files"] = files
    return result


def group_scores(features: FeatureSet, scores: np.ndarray, thresholds: Dict[str, object]) -> GroupTable:
    """`aggregate_groups` of positive-class `scores` with the saved aggregation: (group ids, group labels, group
    scores, mixed-label ids). A group with an unlabelled image (-1) has label -1 and is never mixed."""
    labels = np.asarray(features.labels)
    binary = (labels != 0).astype(np.int64)
    ids, g_labels, g_scores, mixed = aggregate_groups(features.group_ids, binary, scores,
                                                      thresholds["group_aggregation"], thresholds["image"]["threshold"])
    unlabelled = {gid for gid, label in zip(features.group_ids, labels) if label < 0}
    g_labels = np.array([-1 if gid in unlabelled else label for gid, label in zip(ids, g_labels)], dtype=np.int64)
    return ids, g_labels, g_scores, [gid for gid in mixed if gid not in unlabelled]


def write_predictions(
    output_dir: str,
    stem: str,
    features: FeatureSet,
    probs: np.ndarray,
    thresholds: Dict[str, object],
    scores: Optional[np.ndarray] = None,
    groups: Optional[GroupTable] = None,
) -> List[str]:
    """`predictions_<stem>.csv` (one row per image) and `predictions_<stem>_groups.csv` (one row per group) of class
    probabilities `probs` (N, C) at the saved thresholds; unlabelled images and groups have label -1. `scores` and
    `groups` (`positive_scores(probs)` and `group_scores`) are computed unless the caller has them. Returns the file
    names."""
    image_t, group_t = thresholds["image"]["threshold"], thresholds["group"]["threshold"]
    if scores is None:
        scores = positive_scores(probs) if len(probs) else np.zeros(0)
    header = ["img_path", "group_id", "label", "score", "prediction"]
    multiclass = len(features.class_names) > 2
    if multiclass:
        header += [f"prob_{name}" for name in features.class_names]
    rows = []
    for i in range(len(features)):
        row = [features.img_paths[i], features.group_ids[i], int(features.labels[i]), float(scores[i]),
               int(scores[i] >= image_t)]
        rows.append(row + ([float(p) for p in probs[i]] if multiclass else []))
    image_csv = os.path.join(output_dir, f"predictions_{stem}.csv")
    write_csv_atomic(image_csv, header, rows)
    ids, g_labels, g_scores, mixed = groups if groups is not None else group_scores(features, scores, thresholds)
    sizes = Counter(features.group_ids)
    mixed_ids = set(mixed)
    group_rows = [[gid, sizes[gid], int(g_labels[j]), float(g_scores[j]), int(g_scores[j] >= group_t),
                   int(gid in mixed_ids)] for j, gid in enumerate(ids)]
    group_csv = os.path.join(output_dir, f"predictions_{stem}_groups.csv")
    write_csv_atomic(group_csv, ["group_id", "n_images", "label", "score", "prediction", "mixed_labels"], group_rows)
    return [os.path.basename(image_csv), os.path.basename(group_csv)]


def unique_tag(tag: str, used: set) -> str:
    """`tag`, or `tag_<n>` (the smallest n >= 2 not yet taken) when another dataset of the same run already writes
    files under it; records it in `used`."""
    unique, n = tag, 2
    while unique in used:
        unique, n = f"{tag}_{n}", n + 1
    used.add(unique)
    return unique


def results_header(args: argparse.Namespace, probe: str, train: FeatureSet, settings: Dict[str, object],
                   thresholds: Dict[str, object]) -> Dict[str, object]:
    """The fields every `results_eval_<probe>.json` starts with; `datasets` is filled by the probe."""
    return {
        "probe": probe,
        "pretrained_weights": args.pretrained_weights,
        "random_init": args.pretrained_weights == RANDOM_WEIGHTS,
        "config_file": args.config_file,
        "train_dataset": train.dataset_str,
        "class_names": train.class_names,
        "threshold_policy": args.threshold_policy,
        "group_aggregation": args.group_aggregation,
        "fpr_target": args.fpr_target,
        "settings": settings,
        "thresholds": thresholds,
        "datasets": {},
    }


def write_results(output_dir: str, probe: str, results: Dict[str, object]) -> str:
    """Write `results_eval_<probe>.json` atomically, then rebuild report.md; returns the JSON path."""
    path = results_path(output_dir, probe)
    write_json_atomic(path, results)
    write_report(output_dir)
    logger.info(f"Wrote {path}")
    return path


def load_results(output_dir: str) -> Dict[str, Dict[str, object]]:
    """probe -> results of the `results_eval_<probe>.json` files present in `output_dir`."""
    found = {}
    for probe in PROBES:
        path = results_path(output_dir, probe)
        if os.path.isfile(path):
            with open(path) as f:
                try:
                    found[probe] = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: invalid JSON ({e})") from None
    return found


def write_report(output_dir: str) -> str:
    """report.md: for each probe, settings, thresholds and a metric table per dataset and level, with links."""
    lines: List[str] = ["# Frozen-feature evaluation report", ""]
    for probe, results in load_results(output_dir).items():
        thresholds = results["thresholds"]
        weights = "random initialisation (baseline)" if results["random_init"] else results["pretrained_weights"]
        lines += [
            f"## {probe}",
            "",
            f"- weights: {weights}",
            f"- train dataset: `{results['train_dataset']}`; classes: {', '.join(results['class_names'])}",
            f"- settings: {json.dumps(results['settings'])}",
            f"- threshold policy `{thresholds['policy']}` chosen on {thresholds['chosen_on']}: image "
            f"{thresholds['image']['threshold']:.4f}, group {thresholds['group']['threshold']:.4f} "
            f"(group aggregation `{thresholds['group_aggregation']}`)"
            + (" - FALLBACK, see warnings" if thresholds["threshold_fallback"] else ""),
            "",
            "| dataset | level | n | n_pos | " + " | ".join(KEY_METRICS) + " |",
            "|" + "---|" * (4 + len(KEY_METRICS)),
        ]
        notes = []
        for dataset_str, entry in results["datasets"].items():
            for level in ("image", "group"):
                m = entry[level]
                values = " | ".join(_fmt(m[k]) for k in KEY_METRICS)
                lines.append(f"| {entry['tag']} | {level} | {m['n_samples']} | {m['n_positive']} | {values} |")
                notes += [f"{entry['tag']} ({level}): {w}" for w in m["warnings"]]
            if entry.get("unfamiliar", {}).get("share") is not None:
                u = entry["unfamiliar"]
                notes.append(f"{entry['tag']}: {u['n_images']} of {entry['image']['n_samples']} images unfamiliar "
                             f"({u['share']:.1%}; about {u['expected_share']:.0%} expected of images like the "
                             "training ones)")
            files = ", ".join(f"[{os.path.basename(p)}]({p})" for p in entry.get("files", []))
            if files:
                notes.append(f"{entry['tag']} files: {files}")
        lines += [""] + [f"- {note}" for note in notes] + [""]
    path = os.path.join(output_dir, "report.md")
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"), binary=False)
    return path
