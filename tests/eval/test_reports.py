"""dinov2.eval.reports: unique file tags, group tables with unlabelled images, prediction CSVs."""

import csv

import numpy as np

from dinov2.eval.features import FeatureSet
from dinov2.eval.reports import group_scores, unique_tag, write_predictions

THRESHOLDS = {"group_aggregation": "mean", "image": {"threshold": 0.5}, "group": {"threshold": 0.4}}


def feature_set(labels) -> FeatureSet:
    n = len(labels)
    return FeatureSet("BBU:root=R:split=TEST", None, None, np.asarray(labels, dtype=np.int64),
                      ["a", "a", "b", "b", "c"][:n], [f"{i}.jpg" for i in range(n)], ["negative", "positive"])


def test_unique_tag_numbers_repeats():
    used = set()
    assert [unique_tag(t, used) for t in ("test", "val", "test", "test")] == ["test", "val", "test_2", "test_3"]
    assert used == {"test", "val", "test_2", "test_3"}
    used = set()  # a tag that looks numbered already (e.g. annotations/test_2.json) is not handed out twice
    assert [unique_tag(t, used) for t in ("test", "test_2", "test", "test")] == ["test", "test_2", "test_3", "test_4"]


def test_group_table_marks_groups_with_unlabelled_images():
    scores = np.array([0.2, 0.9, 0.1, 0.3, 0.7])
    ids, g_labels, g_scores, mixed = group_scores(feature_set([0, 1, -1, 0, 1]), scores, THRESHOLDS)
    assert ids == ["a", "b", "c"] and g_labels.tolist() == [1, -1, 1] and mixed == ["a"]
    assert g_scores.tolist() == [0.55, 0.2, 0.7]
    _, g_labels, _, mixed = group_scores(feature_set([-1, -1, 0, 1, 0]), scores, THRESHOLDS)
    assert g_labels.tolist() == [-1, 1, 0] and mixed == ["b"]  # "a" is unlabelled, never mixed


def test_prediction_csvs_apply_the_image_and_group_thresholds(tmp_path):
    scores = np.array([0.25, 0.875, 0.125, 0.5, 0.4375])  # dyadic: 1 - (1 - s) == s exactly
    probs = np.stack([1 - scores, scores], axis=1)
    files = write_predictions(str(tmp_path), "linear_new", feature_set([-1] * 5), probs, THRESHOLDS)
    assert files == ["predictions_linear_new.csv", "predictions_linear_new_groups.csv"]
    with open(tmp_path / files[0]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img_path", "group_id", "label", "score", "prediction"]
    assert [r[2:] for r in rows[1:]] == [["-1", repr(s), str(int(s >= 0.5))] for s in scores.tolist()]
    with open(tmp_path / files[1]) as f:
        groups = list(csv.reader(f))
    assert groups[1:] == [["a", "2", "-1", "0.5625", "1", "0"], ["b", "2", "-1", "0.3125", "0", "0"],
                          ["c", "1", "-1", "0.4375", "1", "0"]]  # group threshold 0.4, image threshold 0.5
