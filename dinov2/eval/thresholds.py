"""Operating threshold on the positive-class score, chosen on a validation split and applied unchanged to test splits.

Policies (`--threshold-policy`):
- `f1`: the threshold that maximises F1 of the positive class;
- `youden`: the threshold that maximises recall + specificity - 1 (Youden's J);
- `recall@R` (e.g. `recall@0.95`): the highest threshold whose recall is >= R (fewest false alarms at that recall).
Candidates are the distinct validation scores; a sample is positive when `score >= threshold`. Ties go to the lower
threshold (a missed defect costs more than a false alarm). When the policy is undefined on the validation data (no
samples, no positives, or no negatives for `youden`) the threshold falls back to `FALLBACK_THRESHOLD`, a warning is
logged and `fallback` is True; this is never silent.
"""

import logging
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from dinov2.eval.metrics import aggregate_groups, positive_scores, threshold_curve

logger = logging.getLogger("dinov2")

FALLBACK_THRESHOLD = 0.5
VOTE_THRESHOLD = 0.5  # majority: a group is positive when at least half of its images are


@dataclass
class ThresholdChoice:
    threshold: float
    fallback: bool
    reason: Optional[str] = None


def parse_policy(policy: str) -> Optional[float]:
    """Validate a policy string; return R for `recall@R`, else None."""
    if policy in ("f1", "youden"):
        return None
    if policy.startswith("recall@"):
        try:
            target = float(policy[len("recall@"):])
        except ValueError:
            target = -1.0
        if 0.0 < target <= 1.0:
            return target
    raise ValueError(f"--threshold-policy must be f1, youden or recall@R with 0 < R <= 1, got {policy!r}")


def select_threshold(labels: np.ndarray, scores: np.ndarray, policy: str = "f1") -> ThresholdChoice:
    """Threshold on `scores` for binary `labels` (1 = positive) according to `policy`."""
    recall_target = parse_policy(policy)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    reason = None
    if len(labels) == 0:
        reason = "the validation split is empty"
    elif n_pos == 0:
        reason = "the validation split has no positives"
    elif policy == "youden" and n_neg == 0:
        reason = "the validation split has no negatives (Youden's J needs both classes)"
    if reason is not None:
        logger.warning(f"threshold policy {policy!r}: {reason}; falling back to threshold {FALLBACK_THRESHOLD}")
        return ThresholdChoice(FALLBACK_THRESHOLD, True, reason)
    thresholds, tp, fp = threshold_curve(labels, scores)
    if recall_target is not None:
        index = int(np.flatnonzero(tp >= recall_target * n_pos - 1e-9)[0])
    else:
        if policy == "f1":
            objective = 2 * tp / (tp + fp + n_pos)
        else:
            objective = tp / n_pos - fp / n_neg
        index = int(np.flatnonzero(objective >= objective.max() - 1e-12)[-1])
    return ThresholdChoice(float(thresholds[index]), False)


def choose_thresholds(
    probs: np.ndarray, labels: np.ndarray, group_ids: Sequence[str], policy: str, aggregation: str
) -> Dict[str, object]:
    """Image and group thresholds chosen on one (validation) split; the JSON-able dict saved with the probe."""
    binary = (np.asarray(labels) != 0).astype(np.int64)
    scores = positive_scores(probs) if len(binary) else np.zeros(0)
    image = select_threshold(binary, scores, policy)
    if aggregation == "vote":  # a majority of the images positive at the image threshold: its fallback is the group's
        group = ThresholdChoice(VOTE_THRESHOLD, image.fallback, image.reason)
    else:
        _, g_labels, g_scores, _ = aggregate_groups(group_ids, binary, scores, aggregation, image.threshold)
        group = select_threshold(g_labels, g_scores, policy)
    return {
        "policy": policy,
        "group_aggregation": aggregation,
        "image": asdict(image),
        "group": asdict(group),
        "threshold_fallback": image.fallback or group.fallback,
    }
