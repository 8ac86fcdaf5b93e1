"""dinov2.eval.predict: saved probe classifiers applied to new (unlabelled) images, the same scores as the probes,
refusal of another backbone and of other class lists, a feature cache that notices re-shot images."""

import csv
import json
import os
import shutil

import pytest
from eval_helpers import CLASSIFIER_FILES, cached_feature_set, dataset_str, load_eval_config, read_results
from PIL import Image, ImageOps

import dinov2.distributed as distributed
from dinov2.eval import predict
from dinov2.eval.features import EXTRACTION_COUNTS, backbone_fingerprint
from dinov2.eval.ood import ood_summary
from dinov2.eval.saved_probe import load_probe_classifier
from dinov2.eval.setup import build_model_for_eval


def predict_args(config, weights, classifier, output_dir, *datasets: str):
    argv = ["--config-file", str(config), "--pretrained-weights", str(weights), "--output-dir", str(output_dir),
            "--classifier", str(classifier), "--datasets", *datasets, "--num-workers", "0", "--batch-size", "4"]
    return predict.get_args_parser().parse_args(argv)


def run_predict(*args):
    try:
        return predict.run_predict(predict_args(*args))
    finally:
        distributed.disable()


def read_csv(path) -> list:
    with open(path) as f:
        return list(csv.reader(f))


def write_annotations(sample_root, name: str, keep_labels: int) -> str:
    """The TEST split's annotations with `gt_label` removed from all but the first `keep_labels` entries."""
    content = json.loads((sample_root / "annotations" / "test.json").read_text())
    for entry in content["data_list"][keep_labels:]:
        del entry["gt_label"]
    (sample_root / "annotations" / name).write_text(json.dumps(content))
    return dataset_str(sample_root, "TEST", name)


@pytest.mark.parametrize("probe", ["knn", "linear", "log_regression"])
def test_predictions_equal_the_probes_on_their_test_split(probe, tmp_path, teacher_run, sample_root, eval_config,
                                                          teacher_checkpoint):
    """A fresh extraction (own output directory, no shared cache) reproduces the probe's scores, decisions, group
    table and metrics exactly."""
    teacher_dir, _ = teacher_run
    test = dataset_str(sample_root, "TEST")
    results = run_predict(eval_config, teacher_checkpoint, teacher_dir / CLASSIFIER_FILES[probe], tmp_path, test, test)
    assert list(results["datasets"]) == [test]  # given twice, scored once
    for suffix in ("", "_groups"):
        name = f"predictions_{probe}_test{suffix}.csv"
        assert read_csv(tmp_path / name) == read_csv(teacher_dir / name)
    entry, expected = results["datasets"][test], read_results(teacher_dir, probe)["datasets"][test]
    assert entry["image"] == expected["image"] and entry["group"] == expected["group"]
    assert sorted(entry["files"]) == sorted(expected["files"])
    rows = read_csv(tmp_path / f"predictions_{probe}_test.csv")[1:]
    group_rows = read_csv(tmp_path / f"predictions_{probe}_test_groups.csv")[1:]
    assert (entry["n_images"], entry["n_labelled"], entry["n_groups"]) == (6, 6, 2)
    assert entry["n_positive_images"] == sum(int(r[4]) for r in rows)
    assert entry["n_positive_groups"] == sum(int(r[4]) for r in group_rows)
    assert results["probe"] == probe and results["thresholds"] == read_results(teacher_dir, probe)["thresholds"]
    saved = load_probe_classifier(str(teacher_dir / CLASSIFIER_FILES[probe]))
    assert results["ood"] == ood_summary(saved.ood_params)
    unfamiliarity, unfamiliar = saved.ood(cached_feature_set(teacher_dir, "test").cls)
    ood_rows = read_csv(tmp_path / f"unfamiliarity_{probe}_test.csv")
    assert ood_rows[0] == ["img_path", "group_id", "unfamiliarity", "unfamiliar"]
    assert [r[:2] for r in ood_rows[1:]] == [r[:2] for r in rows]
    assert [float(r[2]) for r in ood_rows[1:]] == pytest.approx(unfamiliarity.tolist(), abs=1e-6)
    assert [r[3] for r in ood_rows[1:]] == [str(int(flag)) for flag in unfamiliar]
    assert entry["n_unfamiliar_images"] == int(unfamiliar.sum())
    assert entry["unfamiliar_images"] == [r[0] for r in ood_rows[1:] if r[3] == "1"]
    model = build_model_for_eval(load_eval_config(eval_config), str(teacher_checkpoint))
    assert results["backbone_sha256"] == backbone_fingerprint(model)
    assert json.loads((tmp_path / "predictions.json").read_text()) == results


def test_unlabelled_and_partly_labelled_datasets_get_predictions_only(tmp_path, teacher_run, sample_root,
                                                                      eval_config, teacher_checkpoint):
    teacher_dir, _ = teacher_run
    unlabelled = write_annotations(sample_root, "predict_unlabelled.json", keep_labels=0)
    partly = write_annotations(sample_root, "predict_partly.json", keep_labels=2)
    empty = dataset_str(sample_root, "TEST", "empty.json")
    results = run_predict(eval_config, teacher_checkpoint, teacher_dir / "linear_classifier.pth", tmp_path,
                          unlabelled, partly, empty)
    assert {k: v for k, v in results["datasets"][empty].items() if k.startswith("n_")} == {
        "n_images": 0, "n_labelled": 0, "n_positive_images": 0, "n_groups": 0, "n_positive_groups": 0,
        "n_unfamiliar_images": 0}
    assert read_csv(tmp_path / "predictions_linear_empty_groups.csv") == [
        ["group_id", "n_images", "label", "score", "prediction", "mixed_labels"]]
    labelled_rows = read_csv(teacher_dir / "predictions_linear_test.csv")
    labelled_groups = read_csv(teacher_dir / "predictions_linear_test_groups.csv")
    for dataset, tag, n_labelled in ((unlabelled, "predict_unlabelled", 0), (partly, "predict_partly", 2)):
        entry = results["datasets"][dataset]
        assert "image" not in entry and "group" not in entry and entry["n_labelled"] == n_labelled
        assert entry["files"] == [f"predictions_linear_{tag}.csv", f"predictions_linear_{tag}_groups.csv"]
        rows = read_csv(tmp_path / f"predictions_linear_{tag}.csv")
        assert rows[0] == labelled_rows[0]
        for row, reference in zip(rows[1:], labelled_rows[1:]):
            assert row[:2] + row[3:] == reference[:2] + reference[3:]  # same path, group, score, decision
        assert [r[2] for r in rows[1:]] == [labelled_rows[i][2] for i in range(1, n_labelled + 1)] + ["-1"] * (
            6 - n_labelled)
        groups = read_csv(tmp_path / f"predictions_linear_{tag}_groups.csv")
        assert [g[:2] + g[3:5] for g in groups[1:]] == [g[:2] + g[3:5] for g in labelled_groups[1:]]
        assert [g[2] for g in groups[1:]] == ["-1", "-1"] and [g[5] for g in groups[1:]] == ["0", "0"]
        assert entry["n_positive_images"] == sum(int(r[4]) for r in rows[1:])
    assert not (tmp_path / "plots").exists()


def test_another_backbone_is_refused_before_anything_is_written(tmp_path, teacher_run, sample_root, eval_config):
    teacher_dir, _ = teacher_run
    classifier = teacher_dir / "linear_classifier.pth"
    with pytest.raises(ValueError, match=r"--pretrained-weights random .* is not the backbone the classifier "
                                         rf"{classifier} was trained on \(.*teacher_checkpoint.pth, SHA-256"):
        run_predict(eval_config, "random", classifier, tmp_path, dataset_str(sample_root, "TEST"))
    assert not list(tmp_path.glob("predictions*"))


def test_labels_with_other_classes_are_refused(tmp_path, teacher_run, sample_root, eval_config, teacher_checkpoint):
    teacher_dir, _ = teacher_run
    three = dataset_str(sample_root, "VAL", "val_3class.json")
    expected = (r"val_3class.json has classes \['ok', 'missing_module', 'alarm'\] but the classifier "
                r".*linear_classifier.pth was trained on \['negative', 'positive'\]")
    with pytest.raises(ValueError, match=expected):
        run_predict(eval_config, teacher_checkpoint, teacher_dir / "linear_classifier.pth", tmp_path, three)


def test_images_overwritten_under_their_names_are_extracted_again(tmp_path, teacher_run, sample_root, eval_config,
                                                                  teacher_checkpoint):
    """The feature cache of predict covers each image's size and mtime: a re-shot photo is not scored from stale
    features, an unchanged dataset is not extracted twice, and a missing photo is named."""
    teacher_dir, _ = teacher_run
    root = tmp_path / "line"
    shutil.copytree(sample_root / "test", root / "test")
    (root / "annotations").mkdir()
    shutil.copy(sample_root / "annotations" / "test.json", root / "annotations" / "test.json")
    test = dataset_str(root, "TEST")
    classifier = teacher_dir / "linear_classifier.pth"
    EXTRACTION_COUNTS.clear()
    first = run_predict(eval_config, teacher_checkpoint, classifier, tmp_path / "out", test)
    again = run_predict(eval_config, teacher_checkpoint, classifier, tmp_path / "out", test)
    assert EXTRACTION_COUNTS[test] == 1 and again["datasets"] == first["datasets"]
    before = read_csv(tmp_path / "out" / "predictions_linear_test.csv")
    reshot = root / before[1][0]
    stat = os.stat(reshot)
    ImageOps.mirror(Image.open(reshot)).save(reshot)
    os.utime(reshot, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    run_predict(eval_config, teacher_checkpoint, classifier, tmp_path / "out", test)
    assert EXTRACTION_COUNTS[test] == 2
    after = read_csv(tmp_path / "out" / "predictions_linear_test.csv")
    assert after[1][3] != before[1][3] and after[2:] == before[2:]
    reshot.unlink()
    with pytest.raises(FileNotFoundError, match=f"image not found: {reshot}"):
        run_predict(eval_config, teacher_checkpoint, classifier, tmp_path / "out", test)
