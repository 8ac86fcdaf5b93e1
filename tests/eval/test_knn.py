"""dinov2.eval.knn: weighted vote against a brute-force reference, leave-group-out, and the CLI outputs end to end."""

import csv
import json

import numpy as np
import pytest
import torch
from eval_helpers import cached_feature_set, read_results

from dinov2.eval.knn import KnnHead, _clip_ks, knn_class_probabilities

IMAGE_KEYS = {
    "accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auroc", "average_precision",
    "recall_at_fpr", "fpr_target", "confusion_matrix", "threshold", "n_samples", "n_positive", "n_negative",
    "warnings", "top-1", "threshold_fallback",
}
GROUP_EXTRA_KEYS = {"aggregation", "n_images", "n_mixed_label_groups", "mixed_label_groups"}


def reference_knn(train_x, train_y, query_x, k, temperature, num_classes, excluded=None):
    probs = np.zeros((len(query_x), num_classes))
    for i, q in enumerate(query_x):
        sims = train_x @ q
        candidates = [j for j in range(len(train_x)) if excluded is None or not excluded(i, j)]
        top = sorted(candidates, key=lambda j: -sims[j])[:k]
        weights = np.exp(sims[top] / temperature)
        weights /= weights.sum()
        for w, j in zip(weights, top):
            probs[i, train_y[j]] += w
    return probs


def test_knn_probabilities_match_brute_force():
    generator = torch.Generator().manual_seed(0)
    train_x = torch.nn.functional.normalize(torch.randn(12, 5, generator=generator), dim=1)
    query_x = torch.nn.functional.normalize(torch.randn(4, 5, generator=generator), dim=1)
    train_y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2, 0])
    probs = knn_class_probabilities(train_x, train_y, query_x, [1, 3, 7], 0.1, 3)
    for k in (1, 3, 7):
        expected = reference_knn(train_x.numpy(), train_y.numpy(), query_x.numpy(), k, 0.1, 3)
        assert probs[k] == pytest.approx(expected, abs=1e-5)
        assert probs[k].sum(axis=1) == pytest.approx(np.ones(4), abs=1e-6)


def test_saved_classifier_head_is_the_probe():
    """KnnHead (the saved classifier in predict, the predictor and the ONNX export) on raw class tokens: the probe's
    probabilities of the L2-normalised last token; k beyond the training features is refused."""
    generator = torch.Generator().manual_seed(2)
    train_x = torch.nn.functional.normalize(torch.randn(10, 6, generator=generator), dim=1)
    train_y = torch.tensor([0, 1, 1, 0, 2, 0, 1, 2, 2, 0])
    cls = 3 * torch.randn(5, 2, 6, generator=generator)  # two blocks, unnormalised; the head reads the last
    head = KnnHead(train_x, train_y, 4, 0.07, 3)
    expected = knn_class_probabilities(train_x, train_y, torch.nn.functional.normalize(cls[:, -1], dim=1), [4], 0.07,
                                       3)[4]
    probs = head(cls, torch.zeros(5, 6))
    assert probs.dtype == torch.float64 and torch.equal(probs, torch.from_numpy(expected))
    with pytest.raises(ValueError, match="k = 11 but the classifier holds 10 training features"):
        KnnHead(train_x, train_y, 11, 0.07, 3)


def test_neighbours_closer_than_float32_rounding_are_told_apart():
    """q.x1 = 1 and q.x2 = 1 + 2^-40 are the same float32 number, so a float32 product would leave the order of the
    two neighbours to rounding details; in float64 they are exact and x2 (label 1) is the nearest."""
    query = torch.tensor([[1.0, 2.0**-20]])
    train = torch.tensor([[1.0, 0.0], [1.0, 2.0**-20]])
    assert (query @ train.T)[0, 0] == (query @ train.T)[0, 1]
    probs = knn_class_probabilities(train, torch.tensor([0, 1]), query, [1], 0.07, 2)
    assert probs[1].tolist() == [[0.0, 1.0]]


def test_leave_group_out_excludes_the_own_group():
    generator = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(9, 4, generator=generator), dim=1)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1, 0])
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    probs = knn_class_probabilities(x, y, x, [2, 6], 0.5, 2, groups, groups)
    for k in (2, 6):
        expected = reference_knn(x.numpy(), y.numpy(), x.numpy(), k, 0.5, 2, lambda i, j: groups[i] == groups[j])
        assert probs[k] == pytest.approx(expected, abs=1e-5)


def test_k_is_clipped_to_the_training_set_size():
    assert _clip_ks([10, 20, 100, 200], 30) == [10, 20, 30]
    assert _clip_ks([5, 3], 30) == [3, 5]
    with pytest.raises(ValueError, match="nb_knn"):
        _clip_ks([0, 5], 30)


def test_knn_results_file(teacher_run, sample_root):
    output_dir, _ = teacher_run
    results = read_results(output_dir, "knn")
    test_str = f"BBU:root={sample_root}:split=TEST"
    assert list(results["datasets"]) == [test_str]
    entry = results["datasets"][test_str]
    assert entry["tag"] == "test" and set(entry["per_k"]) == {"3", "5", "18"}  # 50 clipped to the 18 train images
    assert entry["settings"]["k"] in (3, 5, 18) and entry["settings"]["temperature"] == 0.07
    assert set(entry["image"]) == IMAGE_KEYS
    assert set(entry["group"]) == IMAGE_KEYS - {"top-1"} | GROUP_EXTRA_KEYS
    assert (entry["image"]["n_samples"], entry["image"]["n_positive"]) == (6, 3)
    assert (entry["group"]["n_samples"], entry["group"]["n_positive"], entry["group"]["n_images"]) == (2, 1, 6)
    best = entry["per_k"][str(entry["settings"]["k"])]
    assert best["image"] == {k: v for k, v in entry["image"].items()}
    for k in ("3", "5", "18"):
        top1 = entry["per_k"][k]["image"]["top-1"]
        assert results[f"('full', {k}) Top 1"] == pytest.approx(100 * top1)
    for level in ("image", "group"):
        m = entry[level]
        for key in ("accuracy", "balanced_accuracy", "f1", "auroc", "average_precision"):
            assert m[key] is None or 0.0 <= m[key] <= 1.0
    settings = json.loads((output_dir / "knn_settings.json").read_text())
    assert settings["k"] == entry["settings"]["k"] and settings["thresholds"] == results["thresholds"]
    assert results["thresholds"]["chosen_on"].endswith("(leave-group-out k-NN scores)")
    assert results["random_init"] is False
    classifier = torch.load(output_dir / "knn_classifier.pth", weights_only=True)
    assert sorted(classifier) == ["class_names", "features", "k", "ood", "temperature", "thresholds", "train_dataset",
                                  "train_features", "train_labels"]
    train = cached_feature_set(output_dir, "train")
    assert torch.equal(classifier["train_features"], train.normalized_cls())
    assert torch.equal(classifier["train_labels"], torch.from_numpy(train.labels))
    assert (classifier["k"], classifier["temperature"]) == (settings["k"], 0.07)
    assert classifier["thresholds"] == results["thresholds"]


def test_knn_prediction_csvs_and_plots(teacher_run):
    output_dir, _ = teacher_run
    results = read_results(output_dir, "knn")
    entry = next(iter(results["datasets"].values()))
    with open(output_dir / "predictions_knn_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["img_path", "group_id", "label", "score", "prediction"]
    assert len(rows) == 6 and all(r["img_path"].startswith("test/") for r in rows)
    threshold = results["thresholds"]["image"]["threshold"]
    assert all(int(r["prediction"]) == int(float(r["score"]) >= threshold) for r in rows)
    tp = sum(int(r["prediction"]) == 1 and int(r["label"]) == 1 for r in rows)
    tn = sum(int(r["prediction"]) == 0 and int(r["label"]) == 0 for r in rows)
    assert entry["image"]["confusion_matrix"][1][1] == tp and entry["image"]["confusion_matrix"][0][0] == tn
    with open(output_dir / "predictions_knn_test_groups.csv") as f:
        groups = list(csv.DictReader(f))
    assert len(groups) == 2 and sorted({r["group_id"] for r in rows}) == sorted(g["group_id"] for g in groups)
    for g in groups:
        members = [float(r["score"]) for r in rows if r["group_id"] == g["group_id"]]
        assert float(g["score"]) == pytest.approx(np.mean(members), abs=1e-12)  # default aggregation: mean
    for level in ("image", "group"):
        png = output_dir / "plots" / f"knn_test_{level}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert entry["files"] == ["predictions_knn_test.csv", "predictions_knn_test_groups.csv",
                              "plots/knn_test_image.png", "plots/knn_test_group.png"]
