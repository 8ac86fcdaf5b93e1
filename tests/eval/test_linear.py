"""dinov2.eval.linear: grid names and training on cached features, saved classifier + thresholds, CLI outputs."""

import csv

import numpy as np
import pytest
import torch
from eval_helpers import cached_feature_set, dataset_str, probe_args, read_results

from dinov2.eval import linear
from dinov2.eval.features import EXTRACTION_COUNTS, FeatureSet
from dinov2.eval.linear import _batches, classifier_name, load_linear_classifier, predict, train_linear_grid


def toy_features(n: int = 40, seed: int = 0) -> FeatureSet:
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2).numpy()
    cls = torch.randn(n, 4, 6, generator=generator)
    cls[:, :, 0] += torch.from_numpy(labels).float()[:, None] * 6  # separable along one dimension
    return FeatureSet("toy", cls, torch.randn(n, 6, generator=generator), labels.astype(np.int64),
                      [str(i // 2) for i in range(n)], [f"{i}.jpg" for i in range(n)], ["negative", "positive"])


def test_classifier_names_follow_upstream():
    assert classifier_name(1, False, 0.001) == "classifier_1_blocks_avgpool_False_lr_0_00100"
    assert classifier_name(4, True, 0.1) == "classifier_4_blocks_avgpool_True_lr_0_10000"


@pytest.mark.parametrize("n_blocks, avgpool", [(1, False), (4, True)])
def test_classifier_head_reads_upstreams_linear_input(n_blocks, avgpool):
    """predict (and so the saved classifier's head): softmax of the classifier on the concatenated class tokens of
    the last n blocks (+ the mean patch token), computed here by hand; a classifier reading more blocks than were
    extracted is refused."""
    generator = torch.Generator().manual_seed(3)
    cls, patch_mean = torch.randn(6, 4, 5, generator=generator), torch.randn(6, 5, generator=generator)
    features = FeatureSet("d", cls, patch_mean, np.zeros(6, dtype=np.int64), list("aabbcc"), ["a", "b"] * 3,
                          ["negative", "positive"])
    classifier = linear.LinearClassifier(5 * (n_blocks + avgpool), n_blocks, avgpool, 2)
    x = torch.cat([cls[:, 4 - n_blocks + i] for i in range(n_blocks)] + ([patch_mean] if avgpool else []), dim=1)
    expected = torch.softmax(x @ classifier.linear.weight.T + classifier.linear.bias, dim=1).double()
    np.testing.assert_allclose(predict(classifier, features), expected.detach().numpy(), rtol=0, atol=1e-7)
    one_block = FeatureSet("d", cls[:, -1:], patch_mean, features.labels, features.group_ids, features.img_paths,
                           features.class_names)
    with pytest.raises(ValueError, match="the classifier reads 4 blocks, 1 were extracted"):
        predict(linear.LinearClassifier(20, 4, False, 2), one_block)


def test_confident_negatives_keep_distinct_positive_scores():
    """The score 1 - p(negative) of logit gaps of 17 to 30 is exp(-gap) / (1 + exp(-gap)), 4e-8 down to 9e-14: a
    float32 softmax rounds all of them to 0 (ties that move AUROC/AP), the float64 one resolves them."""
    gaps = torch.tensor([12.0, 17.0, 18.0, 20.0, 25.0, 30.0])
    classifier = linear.LinearClassifier(1, 1, False, 2)
    with torch.no_grad():
        classifier.linear.weight.copy_(torch.tensor([[1.0], [0.0]]))
        classifier.linear.bias.zero_()
    features = FeatureSet("d", gaps.view(-1, 1, 1), torch.zeros(6, 1), np.zeros(6, dtype=np.int64), list("abcdef"),
                          list("abcdef"), ["negative", "positive"])  # fmt: skip
    scores = 1.0 - predict(classifier, features)[:, 0]
    exact = np.exp(-gaps.double().numpy()) / (1 + np.exp(-gaps.double().numpy()))
    np.testing.assert_allclose(scores, exact, rtol=0, atol=2e-16)  # 1 - p: float64 rounding of p, ~1e-16
    assert (np.diff(scores) < 0).all()


def test_grid_trains_deterministically_on_cached_features():
    train = toy_features()
    classifiers, grid = train_linear_grid(train, [0.01, 5.0], epochs=2, epoch_length=15, batch_size=8, seed=3)
    expected = [classifier_name(n, a, lr) for n in (1, 4) for a in (False, True) for lr in (0.01, 5.0)]
    assert sorted(grid) == sorted(expected)
    assert grid[classifier_name(4, True, 5.0)] == {"n_last_blocks": 4, "avgpool": True, "lr": 5.0,
                                                   "scaled_lr": 5.0 * 8 / 256}
    assert classifiers[classifier_name(4, True, 5.0)].linear.in_features == 4 * 6 + 6
    assert classifiers[classifier_name(1, False, 5.0)].linear.in_features == 6
    again, _ = train_linear_grid(train, [0.01, 5.0], epochs=2, epoch_length=15, batch_size=8, seed=3)
    for name in grid:
        assert torch.equal(classifiers[name].linear.weight, again[name].linear.weight)
    accuracy = (predict(classifiers[classifier_name(1, False, 5.0)], train).argmax(1) == train.labels).mean()
    assert accuracy >= 0.9


def test_linear_results_and_checkpoint(teacher_run, sample_root):
    output_dir, _ = teacher_run
    results = read_results(output_dir, "linear")
    test_str, val_str = (f"BBU:root={sample_root}:split={s}" for s in ("TEST", "VAL"))
    assert list(results["datasets"]) == [test_str]
    assert len(results["grid"]) == 2 * 2 * 2 and results["best_classifier"]["name"] in results["grid"]
    entry = results["datasets"][test_str]
    assert entry["settings"]["classifier"] == results["best_classifier"]["name"]
    assert entry["settings"]["lr"] in (0.01, 0.1) and entry["settings"]["n_last_blocks"] in (1, 4)
    assert results[f"{test_str}_accuracy"] == pytest.approx(100 * entry["image"]["top-1"])
    assert results["thresholds"]["chosen_on"] == val_str
    classifier, payload = load_linear_classifier(str(output_dir / "linear_classifier.pth"))
    assert payload["thresholds"] == results["thresholds"] and payload["name"] == results["best_classifier"]["name"]
    assert payload["class_names"] == ["negative", "positive"]
    assert (classifier.use_n_blocks, classifier.use_avgpool) == (entry["settings"]["n_last_blocks"],
                                                                 entry["settings"]["avgpool"])
    assert classifier.linear.in_features == 192 * (classifier.use_n_blocks + int(classifier.use_avgpool))
    with open(output_dir / "predictions_linear_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    threshold = payload["thresholds"]["image"]["threshold"]
    predicted = np.array([int(r["prediction"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    assert np.array_equal(predicted, (scores >= threshold).astype(int))
    labels = np.array([int(r["label"]) for r in rows])
    assert entry["image"]["confusion_matrix"] == [[int(((predicted == p) & (labels == t)).sum()) for p in (0, 1)]
                                                  for t in (0, 1)]
    reproduced = 1.0 - predict(classifier, cached_feature_set(output_dir, "test"))[:, 0]
    assert reproduced == pytest.approx(scores, abs=1e-5)


def test_edge_cases_end_to_end(tmp_path, teacher_run, sample_root, eval_config, teacher_checkpoint):
    """Validation without positives (threshold fallback), one-class, empty and mixed-label test splits; the training
    features come from the shared --features-dir."""
    teacher_dir, _ = teacher_run
    EXTRACTION_COUNTS.clear()
    one_class = dataset_str(sample_root, "VAL", "val_negatives.json")
    empty, mixed = dataset_str(sample_root, "TEST", "empty.json"), dataset_str(sample_root, "TEST", "mixed.json")
    args = probe_args(linear, eval_config, teacher_checkpoint, tmp_path, "--train-dataset",
                      dataset_str(sample_root, "TRAIN"), "--val-dataset", one_class, "--test-datasets", one_class,
                      empty, mixed, "--epochs", "1", "--epoch-length", "5", "--learning-rates", "0.1",
                      "--threshold-policy", "youden", "--features-dir", str(teacher_dir / "features"))
    results = linear.run_eval_linear(args)
    assert dataset_str(sample_root, "TRAIN") not in EXTRACTION_COUNTS
    thresholds = results["thresholds"]
    assert thresholds["threshold_fallback"] and thresholds["image"]["threshold"] == 0.5
    assert "no positives" in thresholds["image"]["reason"] and thresholds["group"]["fallback"]
    assert results["datasets"][one_class]["image"]["threshold_fallback"] is True
    neg = results["datasets"][one_class]["image"]
    assert neg["auroc"] is None and neg["n_positive"] == 0 and any("one-class" in w for w in neg["warnings"])
    assert neg["specificity"] == pytest.approx(neg["accuracy"])
    e = results["datasets"][empty]
    assert e["image"]["n_samples"] == 0 and e["group"]["n_samples"] == 0 and e["image"]["accuracy"] is None
    assert any("empty" in w for w in e["image"]["warnings"])
    m = results["datasets"][mixed]["group"]
    assert m["n_mixed_label_groups"] == 1 and m["n_positive"] == 2  # the flipped photo makes its group positive
    with open(tmp_path / "predictions_linear_empty.csv") as f:
        assert f.read().strip() == "img_path,group_id,label,score,prediction"


def test_three_classes_end_to_end(tmp_path, sample_root, eval_config, teacher_checkpoint):
    train = dataset_str(sample_root, "TRAIN", "train_3class.json")
    val = dataset_str(sample_root, "VAL", "val_3class.json")
    args = probe_args(linear, eval_config, teacher_checkpoint, tmp_path, "--train-dataset", train, "--val-dataset",
                      val, "--epochs", "1", "--epoch-length", "5", "--learning-rates", "0.1")
    results = linear.run_eval_linear(args)
    assert results["class_names"] == ["ok", "missing_module", "alarm"]
    image = results["datasets"][val]["image"]
    assert set(image["multiclass"]["per_class"]) == {"ok", "missing_module", "alarm"}
    assert np.asarray(image["multiclass"]["confusion_matrix"]).sum() == 6 and image["n_positive"] == 3
    assert "multiclass" not in results["datasets"][val]["group"]
    with open(tmp_path / "predictions_linear_val_3class.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[5:] == ["prob_ok", "prob_missing_module", "prob_alarm"]
    assert {int(r["label"]) for r in rows} == {0, 1}  # the one positive validation group is class 1
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in ("ok", "missing_module", "alarm")]
        assert float(r["score"]) == pytest.approx(1 - probs[0], abs=1e-12) and sum(probs) == pytest.approx(1, abs=1e-5)


def test_fused_grid_equals_independent_sgd_per_classifier():
    """Each classifier of the fused grid follows upstream's own SGD (momentum 0.9, cosine lr) from the same start."""
    train = toy_features(n=24, seed=1)
    lrs, epochs, epoch_length, batch_size = [0.5, 3.0], 2, 6, 8
    initial, _ = train_linear_grid(train, lrs, epochs=0, epoch_length=epoch_length, batch_size=batch_size, seed=5)
    trained, grid = train_linear_grid(train, lrs, epochs, epoch_length, batch_size, seed=5)
    labels = torch.from_numpy(train.labels)
    for name, settings in grid.items():
        reference = initial[name]
        x = train.linear_input(settings["n_last_blocks"], settings["avgpool"])
        optimizer = torch.optim.SGD(reference.parameters(), lr=settings["scaled_lr"], momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * epoch_length, eta_min=0)
        batches = _batches(len(train), batch_size, torch.Generator().manual_seed(5))
        for _ in range(epochs * epoch_length):
            index = next(batches)
            loss = torch.nn.functional.cross_entropy(reference(x[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        assert torch.allclose(reference.linear.weight, trained[name].linear.weight, atol=1e-6), name
        assert torch.allclose(reference.linear.bias, trained[name].linear.bias, atol=1e-6), name
