"""dinov2.eval.log_regression: saved coefficients reproduce scikit-learn, group-disjoint hold-out, CLI outputs."""

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from eval_helpers import cached_feature_set, read_results
from sklearn.linear_model import LogisticRegression

from dinov2.eval.log_regression import (
    LogRegressionHead, c_grid, classifier_parameters, log_regression_probabilities,
)


@pytest.mark.parametrize("classes", [[0, 1], [0, 1, 2], [0, 2]])
def test_saved_parameters_reproduce_predict_proba(classes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = np.array(classes)[rng.integers(0, len(classes), 60)]
    model = LogisticRegression(C=0.7, max_iter=500).fit(x, y)
    params = json.loads(json.dumps(classifier_parameters(model, 0.7)))  # through JSON, as saved
    probs = log_regression_probabilities(params, x, num_classes=3)
    assert probs[:, classes] == pytest.approx(model.predict_proba(x), abs=1e-9)
    missing = [c for c in range(3) if c not in classes]
    assert np.all(probs[:, missing] == 0)


@pytest.mark.parametrize("train_dtype", ["float64", "float32"])
def test_saved_classifier_head_is_the_probe(train_dtype):
    """LogRegressionHead on raw class tokens: the probabilities of the L2-normalised last token in the probe's
    training dtype, as the probe computes them."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4))
    y = rng.integers(0, 2, 40)
    params = classifier_parameters(LogisticRegression(C=2.0).fit(x, y), 2.0)
    cls = torch.from_numpy(rng.normal(size=(7, 3, 4)).astype(np.float32))
    features = torch.nn.functional.normalize(cls[:, -1], dim=1).numpy().astype(train_dtype)
    probs = LogRegressionHead(params, 2, train_dtype)(cls, torch.zeros(7, 4))
    assert probs.dtype == torch.float64
    np.testing.assert_array_equal(probs.numpy(), log_regression_probabilities(params, features, 2))


def test_c_grid_is_upstreams_by_default():
    grid = c_grid(argparse.Namespace(c_values=None, n_c=45))
    assert len(grid) == 45 and grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
    assert grid == pytest.approx(list(10 ** np.linspace(-6, 5, 45)))
    assert c_grid(argparse.Namespace(c_values=[0.1, 2.0], n_c=45)) == [0.1, 2.0]
    with pytest.raises(ValueError, match="n-c"):
        c_grid(argparse.Namespace(c_values=None, n_c=0))


def test_log_regression_results_and_classifier(teacher_run, sample_root):
    output_dir, _ = teacher_run
    results = read_results(output_dir, "log_regression")
    val_str, test_str = (f"BBU:root={sample_root}:split={s}" for s in ("VAL", "TEST"))
    assert list(results["datasets"]) == [val_str, test_str]
    assert results["best_C"] in c_grid(argparse.Namespace(c_values=None, n_c=3)) and len(results["grid"]) == 3
    assert results["settings"]["solver"] == "sklearn"
    assert results["thresholds"]["chosen_on"] == f"BBU:root={sample_root}:split=TRAIN (held-out 2 groups)"
    saved = json.loads((output_dir / "log_regression_classifier.json").read_text())
    assert saved["C"] == results["best_C"] and saved["thresholds"] == results["thresholds"]
    assert np.asarray(saved["coef"]).shape == (1, 192) and saved["classes"] == [0, 1]
    features = cached_feature_set(output_dir, "test")
    scores = log_regression_probabilities(saved, features.normalized_cls().double().numpy(), 2)[:, 1]
    with open(output_dir / "predictions_log_regression_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["score"]) for r in rows] == pytest.approx(scores, abs=1e-5)
    entry = results["datasets"][test_str]
    assert results[f"{test_str} top-1"] == pytest.approx(100 * entry["image"]["top-1"])
    assert entry["settings"] == {"C": results["best_C"]}
