"""dinov2.eval.explain and Predictor.explain: the explained devices are the predictor's, scored as it scores them,
selected as asked, with their figures, maps and report."""

import csv
import json

import numpy as np
import pytest
from eval_helpers import CLASSIFIER_FILES, dataset_str
from test_predict import write_annotations

from dinov2.eval import explain
from dinov2.eval.predictor import Predictor
from dinov2.eval.saliency import map_peak

GROUP_KEYS = ["group_id", "n_images", "score", "positive", "n_unfamiliar", "label", "figure", "maps", "images"]
IMAGE_KEYS = ["path", "group_id", "score", "positive", "unfamiliarity", "unfamiliar", "evidence_peak", "label",
              "anomaly_peak"]


def read_rows(path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def run_explain(config, weights, classifier, output_dir, *extra: str) -> dict:
    argv = ["--config-file", str(config), "--pretrained-weights", str(weights), "--classifier", str(classifier),
            "--output-dir", str(output_dir), "--decode-threads", "2", "--batch-size", "2", *extra]
    return explain.run_explain(explain.get_args_parser().parse_args(argv))


@pytest.mark.parametrize("probe", ["knn", "linear", "log_regression"])
def test_explained_scores_are_the_predictors(probe, teacher_run, sample_root, eval_config, teacher_checkpoint):
    teacher_dir, _ = teacher_run
    predictor = Predictor(str(eval_config), str(teacher_checkpoint), str(teacher_dir / CLASSIFIER_FILES[probe]))
    photos = sorted((sample_root / "test").glob("*/*.jpeg"))[:6]
    groups = [photo.parent.name for photo in photos]
    result, explanation, batch = predictor.explain(photos, groups)
    scored = predictor.score(photos, groups)
    peaks = [image.pop("evidence_peak") for image in result["images"]]
    assert result == scored
    assert peaks == [map_peak(e, 16) for e in explanation.evidence]
    assert explanation.evidence.shape == explanation.attention.shape == (6, 4, 4)  # 64 px crops, 16 px patches
    assert explanation.pca.shape == (6, 4, 4, 3) and tuple(batch.shape) == (6, 3, 64, 64)
    # a classifier whose score moves with the photo has evidence; one that ignores it (a fit to the prior) has none
    assert (np.ptp(explanation.log_odds) > 1e-9) == (np.abs(explanation.evidence).max() > 0)
    assert ((explanation.attention > 0).all() and (explanation.attention.sum(axis=(1, 2)) < 1).all())  # + class token
    encoded, _, _ = predictor.explain_encoded([p.read_bytes() for p in photos], [p.name for p in photos], groups)
    assert [i["score"] for i in encoded["images"]] == [i["score"] for i in result["images"]]


def test_cli_explains_the_selected_devices_highest_score_first(tmp_path, teacher_run, sample_root, eval_config,
                                                               teacher_checkpoint):
    teacher_dir, _ = teacher_run
    classifier = teacher_dir / "linear_classifier.pth"
    test = dataset_str(sample_root, "TEST")
    table = {row["group_id"]: row for row in read_rows(teacher_dir / "predictions_linear_test_groups.csv")}
    predictor = Predictor(str(eval_config), str(teacher_checkpoint), str(classifier))
    expected = {
        "all": list(table),
        "positive": [g for g, row in table.items() if row["prediction"] == "1"],
        "errors": [g for g, row in table.items() if row["prediction"] != row["label"]],
    }
    for select, groups in expected.items():
        output = tmp_path / select
        results = run_explain(eval_config, teacher_checkpoint, classifier, output, "--datasets", test,
                              "--select", select)
        assert list(results) == ["classifier", "probe", "pretrained_weights", "backbone_sha256", "class_names",
                                 "thresholds", "maps", "anomaly_reference", "datasets"]
        assert list(results["maps"]) == ["evidence", "attention", "pca"] and results["anomaly_reference"] is None
        entry = results["datasets"][test]
        explained = entry["groups"]
        assert sorted(g["group_id"] for g in explained) == sorted(groups)
        assert [g["score"] for g in explained] == sorted((g["score"] for g in explained), reverse=True)
        assert entry["selection"] == {"select": select, "n_groups": len(table), "n_candidates": len(groups),
                                      "n_explained": len(groups), "left_out_by_max_groups": []}
        assert json.loads((output / "explanations.json").read_text()) == results
        report = (output / "report.html").read_text()
        for group in explained:
            assert list(group) == GROUP_KEYS and all(list(image) == IMAGE_KEYS for image in group["images"])
            assert group["score"] == pytest.approx(float(table[group["group_id"]]["score"]), abs=1e-6)
            assert group["label"] == int(table[group["group_id"]]["label"])
            assert group["figure"] == f"devices/test_{group['group_id']}.png" and f"'{group['figure']}'" in report
            assert (output / group["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            maps = np.load(output / group["maps"])
            paths = [image["path"] for image in group["images"]]
            assert maps["paths"].tolist() == paths
            result, explanation, _ = predictor.explain(paths, [group["group_id"]] * len(paths))
            np.testing.assert_array_equal(maps["evidence"], explanation.evidence)
            np.testing.assert_array_equal(maps["attention"], explanation.attention)
            np.testing.assert_array_equal(maps["pca"], explanation.pca)
            assert maps["scores"].tolist() == [image["score"] for image in result["images"]]
            assert sorted(maps.files) == ["attention", "evidence", "paths", "pca", "scores"]
            assert all(image["anomaly_peak"] is None for image in group["images"])
        assert sorted(p.name for p in (output / "devices").iterdir()) == sorted(
            f"test_{g}.{ext}" for g in groups for ext in ("png", "npz"))
    # named devices, a cap on their number
    named = list(table)[::-1]
    results = run_explain(eval_config, teacher_checkpoint, classifier, tmp_path / "named", "--datasets", test,
                          "--groups", *named, "--max-groups", "1")
    entry = results["datasets"][test]
    by_score = sorted(named, key=lambda g: -float(table[g]["score"]))
    assert [g["group_id"] for g in entry["groups"]] == by_score[:1]
    assert entry["selection"] == {"select": "groups", "n_groups": len(table), "n_candidates": len(named),
                                  "n_explained": 1, "left_out_by_max_groups": by_score[1:]}


def test_bad_selections_are_named(tmp_path, teacher_run, sample_root, eval_config, teacher_checkpoint):
    teacher_dir, _ = teacher_run
    classifier = teacher_dir / "knn_classifier.pth"
    test = dataset_str(sample_root, "TEST")
    with pytest.raises(ValueError, match=r"--groups \['no-such-device'\] are not in .*split=TEST \(it has 2"):
        run_explain(eval_config, teacher_checkpoint, classifier, tmp_path, "--datasets", test,
                    "--groups", "no-such-device")
    unlabelled = write_annotations(sample_root, "explain_unlabelled.json", keep_labels=0)
    with pytest.raises(ValueError, match="--select errors needs every image labelled; .*explain_unlabelled"):
        run_explain(eval_config, teacher_checkpoint, classifier, tmp_path, "--datasets", unlabelled,
                    "--select", "errors")
    results = run_explain(eval_config, teacher_checkpoint, classifier, tmp_path / "u", "--datasets", unlabelled,
                          "--select", "all")
    assert all(g["label"] is None for g in results["datasets"][unlabelled]["groups"])
    three_class = dataset_str(sample_root, "VAL", "val_3class.json")
    with pytest.raises(ValueError, match="has classes \\['ok', 'missing_module', 'alarm'\\] but the classifier"):
        run_explain(eval_config, teacher_checkpoint, classifier, tmp_path, "--datasets", three_class)
    with pytest.raises(SystemExit):
        explain.get_args_parser().parse_args(["--classifier", "c", "--datasets", test, "--max-groups", "-1"])


def test_anomaly_map_is_zero_on_the_reference_photos(tmp_path, teacher_run, sample_root, eval_config,
                                                     teacher_checkpoint):
    """With the test split's own negative photos as the reference and a bank that holds all their patches, those
    photos are like the reference everywhere (anomaly 0) and the positive ones are not."""
    teacher_dir, _ = teacher_run
    test = dataset_str(sample_root, "TEST")
    results = run_explain(eval_config, teacher_checkpoint, teacher_dir / "linear_classifier.pth", tmp_path / "a",
                          "--datasets", test, "--select", "all", "--anomaly-reference", test,
                          "--anomaly-bank-size", "100000")
    annotations = json.loads((sample_root / "annotations" / "test.json").read_text())["data_list"]
    n_negative = sum(entry["gt_label"] == 0 for entry in annotations)
    assert results["anomaly_reference"] == {"dataset": test, "n_images": n_negative, "n_patches": 16 * n_negative,
                                            "seed": 0}
    assert list(results["maps"]) == ["evidence", "attention", "pca", "anomaly"]
    images = [image for group in results["datasets"][test]["groups"] for image in group["images"]]
    assert {image["label"] for image in images} == {0, 1}
    for group in results["datasets"][test]["groups"]:
        anomaly = np.load(tmp_path / "a" / group["maps"])["anomaly"]
        assert anomaly.shape == (group["n_images"], 4, 4)
        for image, grid in zip(group["images"], anomaly):
            assert image["anomaly_peak"]["value"] == pytest.approx(float(grid.max()))
            if image["label"] == 0:
                assert grid.max() < 1e-5
            else:
                assert grid.max() > 1e-3
    assert "most unlike the reference" in (tmp_path / "a" / "report.html").read_text()
    positives = dataset_str(sample_root, "TEST", "explain_positives.json")
    content = json.loads((sample_root / "annotations" / "test.json").read_text())
    content["data_list"] = [entry for entry in annotations if entry["gt_label"] == 1]
    (sample_root / "annotations" / "explain_positives.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match="--anomaly-reference .*explain_positives.json has no photo labelled "
                                         "'negative'"):
        run_explain(eval_config, teacher_checkpoint, teacher_dir / "linear_classifier.pth", tmp_path / "b",
                    "--datasets", test, "--anomaly-reference", positives)
