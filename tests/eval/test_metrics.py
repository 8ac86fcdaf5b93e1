"""dinov2.eval.metrics: QC metrics against scikit-learn and hand computations, group aggregation, edge cases."""

import itertools

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from dinov2.eval.metrics import (
    MetricType,
    aggregate_groups,
    binary_metrics,
    build_metric,
    multiclass_metrics,
    positive_scores,
    qc_metrics,
    recall_at_fpr,
    selection_score,
)

LABELS = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1])
SCORES = np.array([0.10, 0.40, 0.35, 0.80, 0.65, 0.90, 0.20, 0.55, 0.30, 0.70, 0.05, 0.62])


def test_binary_metrics_match_sklearn():
    m = binary_metrics(LABELS, SCORES, threshold=0.5, fpr_target=0.2)
    pred = (SCORES >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(LABELS, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(LABELS, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(LABELS, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(LABELS, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(LABELS, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(LABELS, pred))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(LABELS, SCORES))
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(LABELS, SCORES))
    assert m["confusion_matrix"] == skm.confusion_matrix(LABELS, pred).tolist()
    assert (m["n_samples"], m["n_positive"], m["n_negative"], m["threshold"]) == (12, 6, 6, 0.5)
    assert m["warnings"] == []


def test_auroc_equals_pairwise_ranking_by_hand():
    pos, neg = SCORES[LABELS == 1], SCORES[LABELS == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert binary_metrics(LABELS, SCORES, 0.5)["auroc"] == pytest.approx(wins / (len(pos) * len(neg)))


@pytest.mark.parametrize("fpr_target", [0.0, 0.1, 1 / 6, 0.34, 0.5, 1.0])
def test_recall_at_fpr_matches_roc_curve(fpr_target):
    fpr, tpr, _ = skm.roc_curve(LABELS, SCORES, drop_intermediate=False)
    assert recall_at_fpr(LABELS, SCORES, fpr_target) == pytest.approx(tpr[fpr <= fpr_target + 1e-12].max())


def test_recall_at_fpr_with_tied_scores():
    labels, scores = np.array([0, 1, 1, 0, 1]), np.array([0.5, 0.5, 0.9, 0.1, 0.2])
    # threshold 0.9 -> recall 1/3 at FPR 0; 0.5 -> recall 2/3 at FPR 1/2; 0.2 -> recall 1 at FPR 1/2
    assert recall_at_fpr(labels, scores, 0.0) == pytest.approx(1 / 3)
    assert recall_at_fpr(labels, scores, 0.5) == pytest.approx(1.0)


def test_group_aggregation_by_hand():
    groups = ["a", "a", "a", "b", "b", "c"]
    labels = np.array([0, 0, 1, 0, 0, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.3, 0.4, 0.6])
    ids, g_labels, g_mean, mixed = aggregate_groups(groups, labels, scores, "mean")
    assert ids == ["a", "b", "c"] and g_labels.tolist() == [1, 0, 1] and mixed == ["a"]
    assert g_mean == pytest.approx([0.4, 0.35, 0.6])
    assert aggregate_groups(groups, labels, scores, "max")[2] == pytest.approx([0.9, 0.4, 0.6])
    assert aggregate_groups(groups, labels, scores, "vote", image_threshold=0.5)[2] == pytest.approx([1 / 3, 0, 1])
    with pytest.raises(ValueError, match="vote"):
        aggregate_groups(groups, labels, scores, "vote")
    with pytest.raises(ValueError, match="median"):
        aggregate_groups(groups, labels, scores, "median")


def test_qc_metrics_group_level_by_hand():
    groups = ["a", "a", "a", "b", "b", "c", "d"]
    labels = np.array([0, 0, 1, 0, 0, 1, 0])
    scores = np.array([0.1, 0.2, 0.9, 0.3, 0.4, 0.6, 0.7])
    probs = np.stack([1 - scores, scores], axis=1)
    r = qc_metrics(probs, labels, groups, ["negative", "positive"], image_threshold=0.5, group_threshold=0.5)
    g = r["group"]
    # mean scores a=0.4 (label 1), b=0.35 (0), c=0.6 (1), d=0.7 (0) -> at 0.5: FN, TN, TP, FP
    assert g["confusion_matrix"] == [[1, 1], [1, 1]]
    assert (g["n_samples"], g["n_positive"], g["n_images"], g["n_mixed_label_groups"]) == (4, 2, 7, 1)
    assert g["mixed_label_groups"] == ["a"] and any("different labels" in w for w in g["warnings"])
    assert g["auroc"] == pytest.approx(skm.roc_auc_score([1, 0, 1, 0], [0.4, 0.35, 0.6, 0.7]))
    assert r["image"]["confusion_matrix"] == [[4, 1], [0, 2]]
    assert r["image"]["top-1"] == pytest.approx(6 / 7)
    vote = qc_metrics(probs, labels, groups, ["n", "p"], image_threshold=0.5, group_threshold=0.5, aggregation="vote")
    # votes a=1/3, b=0, c=1, d=1 -> predicted b: no, a: no, c: yes, d: yes
    assert vote["group"]["confusion_matrix"] == [[1, 1], [1, 1]] and vote["group"]["aggregation"] == "vote"


def test_one_class_split_gives_null_auroc_and_a_warning():
    labels, scores = np.zeros(4, dtype=int), np.array([0.1, 0.6, 0.3, 0.2])
    m = binary_metrics(labels, scores, 0.5)
    assert m["auroc"] is None and m["average_precision"] is None and m["recall_at_fpr"] is None
    assert m["recall"] is None and m["specificity"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75) and m["f1"] == 0.0 and m["precision"] == 0.0
    assert any("one-class" in w for w in m["warnings"])


def test_empty_split_is_defined():
    m = binary_metrics(np.zeros(0), np.zeros(0), 0.5)
    assert m["n_samples"] == 0 and m["confusion_matrix"] == [[0, 0], [0, 0]]
    for key in ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auroc"):
        assert m[key] is None, key
    r = qc_metrics(np.zeros((0, 2)), np.zeros(0), [], ["n", "p"], image_threshold=0.5, group_threshold=0.5)
    assert r["group"]["n_samples"] == 0 and r["image"]["top-1"] is None


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 2, 0])
    probs = rng.dirichlet(np.ones(3), size=len(labels))
    names = ["ok", "scratch", "dent"]
    m = multiclass_metrics(labels, probs, names)
    pred = probs.argmax(1)
    p, r, f, support = skm.precision_recall_fscore_support(labels, pred, zero_division=0)
    for c, name in enumerate(names):
        pc = m["per_class"][name]
        assert (pc["precision"] or 0.0, pc["recall"], pc["f1"]) == pytest.approx((p[c], r[c], f[c]))
        assert pc["auroc"] == pytest.approx(skm.roc_auc_score(labels == c, probs[:, c]))
        assert pc["n_samples"] == support[c]
    assert m["macro"]["recall"] == pytest.approx(r.mean())
    assert m["macro"]["f1"] == pytest.approx(f.mean())
    assert m["macro"]["auroc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr"))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
    assert m["confusion_matrix"] == skm.confusion_matrix(labels, pred, labels=[0, 1, 2]).tolist()
    r3 = qc_metrics(probs, labels, [str(i) for i in range(12)], names, image_threshold=0.5, group_threshold=0.5)
    assert r3["image"]["multiclass"]["accuracy"] == m["accuracy"]
    assert r3["image"]["auroc"] == pytest.approx(skm.roc_auc_score(labels != 0, 1 - probs[:, 0]))


@pytest.mark.parametrize(
    "labels, pred",
    [
        ([0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 0, 0]),  # defect classes never predicted: precision 0, not left out
        ([0, 0, 1, 1, 0, 1], [0, 2, 1, 1, 2, 0]),  # class 2 predicted but absent from the labels
        ([2, 2, 2, 1], [2, 2, 1, 1]),  # class 0 neither in the labels nor predicted
    ],
)
def test_multiclass_macro_metrics_count_undefined_classes_as_sklearn(labels, pred):
    labels = np.array(labels)
    probs = np.full((len(labels), 3), 0.1)
    probs[np.arange(len(labels)), pred] = 0.8
    m = multiclass_metrics(labels, probs, ["ok", "scratch", "dent"])
    p, r, f, _ = skm.precision_recall_fscore_support(labels, pred, average="macro", zero_division=0)
    assert (m["macro"]["precision"], m["macro"]["recall"], m["macro"]["f1"]) == pytest.approx((p, r, f))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))


def test_positive_scores():
    assert positive_scores(np.array([[0.7, 0.3], [0.2, 0.8]])) == pytest.approx([0.3, 0.8])
    assert positive_scores(np.array([[0.5, 0.2, 0.3]])) == pytest.approx([0.5])
    with pytest.raises(ValueError, match="shape"):
        positive_scores(np.array([0.1, 0.2]))


def test_build_metric_top_k_and_averaging():
    assert list(build_metric(MetricType.MEAN_ACCURACY, num_classes=2)) == ["top-1"]
    assert list(build_metric(MetricType.MEAN_ACCURACY, num_classes=6)) == ["top-1", "top-5"]
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    target = torch.tensor([0, 1, 1, 1, 1])
    micro = build_metric(MetricType.MEAN_ACCURACY, num_classes=2)
    micro.update(preds=logits, target=target)
    assert micro.compute()["top-1"].item() == pytest.approx(3 / 5)
    macro = build_metric(MetricType.MEAN_PER_CLASS_ACCURACY, num_classes=2)
    macro.update(preds=logits, target=target)
    assert macro.compute()["top-1"].item() == pytest.approx((1.0 + 2 / 4) / 2)
    per_class = build_metric("per_class_accuracy", num_classes=3)
    per_class.update(preds=torch.eye(3)[[0, 1, 1]], target=torch.tensor([0, 1, 0]))
    values = per_class.compute()["top-1"]
    assert values[:2].tolist() == pytest.approx([0.5, 1.0]) and torch.isnan(values[2])


def test_selection_score():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    assert selection_score("mean_accuracy", probs, labels) == pytest.approx(3 / 4)  # arg-max 0, 1, 1, 0
    assert selection_score("mean_per_class_accuracy", probs, labels) == pytest.approx((2 / 3 + 1) / 2)
    assert selection_score("auroc", probs, labels) == pytest.approx(skm.roc_auc_score(labels, probs[:, 1]))
    assert selection_score("auroc", probs, np.zeros(4)) == float("-inf")
    assert selection_score("mean_accuracy", np.zeros((0, 2)), np.zeros(0)) == float("-inf")
