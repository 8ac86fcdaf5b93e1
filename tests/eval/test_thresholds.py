"""dinov2.eval.thresholds: policies on constructed scores, tie rule, explicit fallbacks, group thresholds."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from dinov2.eval.thresholds import FALLBACK_THRESHOLD, choose_thresholds, parse_policy, select_threshold

LABELS = np.array([0, 0, 0, 1, 1, 1])
SCORES = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])


def test_f1_policy_maximises_f1_over_candidates():
    choice = select_threshold(LABELS, SCORES, "f1")
    assert (choice.threshold, choice.fallback) == (0.4, False)
    best = max(f1_score(LABELS, SCORES >= t) for t in SCORES)
    assert f1_score(LABELS, SCORES >= choice.threshold) == pytest.approx(best)


def test_youden_policy_breaks_ties_towards_the_lower_threshold():
    # J(0.7) = 2/3 - 0 and J(0.4) = 1 - 1/3 are equal: the lower threshold (fewer missed defects) wins
    assert select_threshold(LABELS, SCORES, "youden").threshold == 0.4
    assert select_threshold(np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.6]), "youden").threshold == 0.6


@pytest.mark.parametrize("policy,expected", [("recall@0.3", 0.9), ("recall@0.6", 0.7), ("recall@1.0", 0.4)])
def test_recall_policy_takes_the_highest_threshold_reaching_the_recall(policy, expected):
    choice = select_threshold(LABELS, SCORES, policy)
    assert choice.threshold == expected and not choice.fallback
    assert ((SCORES >= choice.threshold) & (LABELS == 1)).sum() / 3 >= parse_policy(policy)


@pytest.mark.parametrize("policy", ["f1", "youden", "recall@0.9"])
def test_no_positives_falls_back_explicitly(policy):
    choice = select_threshold(np.zeros(4, dtype=int), np.array([0.1, 0.2, 0.9, 0.3]), policy)
    assert choice.threshold == FALLBACK_THRESHOLD and choice.fallback and "no positives" in choice.reason


def test_empty_split_and_youden_without_negatives_fall_back():
    assert select_threshold(np.zeros(0), np.zeros(0), "f1").reason == "the validation split is empty"
    choice = select_threshold(np.ones(3, dtype=int), np.array([0.2, 0.4, 0.8]), "youden")
    assert choice.fallback and "no negatives" in choice.reason
    f1_choice = select_threshold(np.ones(3, dtype=int), np.array([0.2, 0.4, 0.8]), "f1")
    assert (f1_choice.threshold, f1_choice.fallback) == (0.2, False)


@pytest.mark.parametrize("policy", ["F1", "recall@1.5", "recall@0", "recall@x", "precision@0.9"])
def test_bad_policy_is_rejected(policy):
    with pytest.raises(ValueError, match="threshold-policy"):
        parse_policy(policy)


def test_choose_thresholds_image_and_group():
    groups = ["a", "a", "b", "b", "c", "c"]
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.3, 0.8, 0.6, 0.2, 0.5])
    probs = np.stack([1 - scores, scores], axis=1)
    t = choose_thresholds(probs, labels, groups, "f1", "mean")
    # image f1: 0.5 -> tp 3, fp 0; group means a=0.2 (0), b=0.7 (1), c=0.35 (1) -> best f1 at 0.35
    assert t["image"]["threshold"] == 0.5 and t["group"]["threshold"] == pytest.approx(0.35)
    assert (t["policy"], t["group_aggregation"], t["threshold_fallback"]) == ("f1", "mean", False)
    vote = choose_thresholds(probs, labels, groups, "f1", "vote")
    assert vote["group"] == {"threshold": 0.5, "fallback": False, "reason": None}
    none = choose_thresholds(probs, np.zeros(6, dtype=int), groups, "f1", "max")
    assert none["threshold_fallback"] and none["image"]["fallback"] and none["group"]["fallback"]
    # a vote counts images positive at the image threshold: when that is the fallback, so is the group decision
    vote_none = choose_thresholds(probs, np.zeros(6, dtype=int), groups, "f1", "vote")
    assert vote_none["group"] == {"threshold": 0.5, "fallback": True, "reason": vote_none["image"]["reason"]}
    assert vote_none["image"]["fallback"] and vote_none["image"]["reason"]
