"""dinov2.eval.predictor: in-process scoring, device by device, with the probes' scores and decisions."""

import csv

import pytest
import torch
from eval_helpers import CLASSIFIER_FILES, cached_feature_set, dataset_str

import dinov2.distributed as distributed
from dinov2.data.datasets import ImageDecodeError
from dinov2.eval import export, predict
from dinov2.eval.predictor import OnnxPredictor, Predictor
from dinov2.eval.saved_probe import load_probe_classifier


def read_rows(path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("probe", ["knn", "linear", "log_regression"])
def test_device_by_device_scores_equal_the_probes(probe, teacher_run, sample_root, eval_config, teacher_checkpoint):
    teacher_dir, _ = teacher_run
    classifier = teacher_dir / CLASSIFIER_FILES[probe]
    predictor = Predictor(str(eval_config), str(teacher_checkpoint), str(classifier))
    thresholds = load_probe_classifier(str(classifier)).thresholds
    images = read_rows(teacher_dir / f"predictions_{probe}_test.csv")
    groups = read_rows(teacher_dir / f"predictions_{probe}_test_groups.csv")
    for group in groups:
        rows = [r for r in images if r["group_id"] == group["group_id"]]
        decision = predictor.score([sample_root / r["img_path"] for r in rows], [group["group_id"]] * len(rows))
        assert [d["path"] for d in decision["images"]] == [str(sample_root / r["img_path"]) for r in rows]
        for d, r in zip(decision["images"], rows):
            assert d["score"] == pytest.approx(float(r["score"]), abs=1e-6)
            if abs(float(r["score"]) - thresholds["image"]["threshold"]) > 1e-6:
                assert d["positive"] == bool(int(r["prediction"]))
        (device,) = decision["groups"]
        assert (device["group_id"], device["n_images"]) == (group["group_id"], int(group["n_images"]))
        assert device["score"] == pytest.approx(float(group["score"]), abs=1e-6)
        if abs(float(group["score"]) - thresholds["group"]["threshold"]) > 1e-6:
            assert device["positive"] == bool(int(group["prediction"]))
    everything = predictor.score([sample_root / r["img_path"] for r in images], [r["group_id"] for r in images])
    assert [g["group_id"] for g in everything["groups"]] == [g["group_id"] for g in groups]
    assert [g["score"] for g in everything["groups"]] == pytest.approx([float(g["score"]) for g in groups], abs=1e-6)


def test_bad_calls_and_another_backbone_are_refused(tmp_path, teacher_run, sample_root, eval_config,
                                                    teacher_checkpoint):
    teacher_dir, _ = teacher_run
    classifier = str(teacher_dir / "linear_classifier.pth")
    with pytest.raises(ValueError, match="--pretrained-weights random .* is not the backbone the classifier"):
        Predictor(str(eval_config), "random", classifier)
    # the same weights, but another interpolation of the position embedding: other features, refused by key
    for opt, message in [("student.interpolate_offset=0.0", "student.interpolate_offset is 0.0 in this config but "
                                                            "was 0.1"),
                         ("student.interpolate_antialias=true", "student.interpolate_antialias is True")]:
        with pytest.raises(ValueError, match=message):
            Predictor(str(eval_config), str(teacher_checkpoint), classifier, opts=[opt])
    predictor = Predictor(str(eval_config), str(teacher_checkpoint), classifier)
    photo = str(next((sample_root / "test").glob("*/*.jpeg")))
    decision = predictor.score([photo])
    assert decision["groups"][0]["group_id"] == "device" and decision["groups"][0]["n_images"] == 1
    with pytest.raises(ValueError, match="no images to score"):
        predictor.score([])
    with pytest.raises(ValueError, match="2 images but 1 group ids"):
        predictor.score([photo, photo], ["a"])
    missing = tmp_path / "7-0.jpeg"
    with pytest.raises(ImageDecodeError, match=f"sample 1: {missing}"):
        predictor.score([photo, missing])
    with pytest.raises(ValueError, match="decode_threads must be >= 1, got 0"):
        Predictor(str(eval_config), str(teacher_checkpoint), classifier, decode_threads=0)


def test_decode_threads_do_not_change_the_scores(teacher_run, sample_root, eval_config, teacher_checkpoint):
    teacher_dir, _ = teacher_run
    photos = sorted((sample_root / "test").glob("*/*.jpeg"))
    scores = [Predictor(str(eval_config), str(teacher_checkpoint), str(teacher_dir / "linear_classifier.pth"),
                        decode_threads=threads).score(photos) for threads in (1, 3)]
    assert scores[0] == scores[1]


def test_unfamiliarity_is_predicts_and_absent_without_a_model(tmp_path, teacher_run, sample_root, eval_config,
                                                              teacher_checkpoint):
    """Each photo's unfamiliarity and flag as predict's unfamiliarity CSV; a classifier saved without a model of
    unfamiliar images (before it existed) scores the same, with None in their place, in the Predictor, predict and
    the ONNX export."""
    teacher_dir, _ = teacher_run
    photos = sorted((sample_root / "test").glob("*/*.jpeg"))
    groups = [photo.parent.name for photo in photos]
    classifier = teacher_dir / "linear_classifier.pth"
    decision = Predictor(str(eval_config), str(teacher_checkpoint), str(classifier)).score(photos, groups)
    saved = load_probe_classifier(str(classifier))
    unfamiliarity, unfamiliar = saved.ood(cached_feature_set(teacher_dir, "test").cls)
    by_path = {str(sample_root / row["img_path"]): i for i, row in enumerate(
        read_rows(teacher_dir / "predictions_linear_test.csv"))}
    for image in decision["images"]:
        i = by_path[image["path"]]
        assert image["unfamiliarity"] == pytest.approx(float(unfamiliarity[i]), abs=1e-6)
        assert image["unfamiliar"] == bool(unfamiliar[i])
    for group in decision["groups"]:
        assert group["n_unfamiliar"] == sum(image["unfamiliar"] for image in decision["images"]
                                            if image["group_id"] == group["group_id"])

    payload = torch.load(classifier, weights_only=True)
    del payload["ood"]
    older = tmp_path / "linear_classifier.pth"
    torch.save(payload, older)
    plain = Predictor(str(eval_config), str(teacher_checkpoint), str(older)).score(photos, groups)
    assert [i["score"] for i in plain["images"]] == [i["score"] for i in decision["images"]]
    assert {(i["unfamiliarity"], i["unfamiliar"]) for i in plain["images"]} == {(None, None)}
    assert {g["n_unfamiliar"] for g in plain["groups"]} == {None}
    try:
        results = predict.run_predict(predict.get_args_parser().parse_args([
            "--config-file", str(eval_config), "--pretrained-weights", str(teacher_checkpoint), "--classifier",
            str(older), "--datasets", dataset_str(sample_root, "TEST"), "--output-dir", str(tmp_path / "predict"),
            "--num-workers", "0"]))
    finally:
        distributed.disable()
    entry = results["datasets"][dataset_str(sample_root, "TEST")]
    assert results["ood"] is None and (entry["n_unfamiliar_images"], entry["unfamiliar_images"]) == (None, None)
    assert not list((tmp_path / "predict").glob("unfamiliarity_*.csv"))
    exported = export.run_export(export.get_args_parser().parse_args([
        "--config-file", str(eval_config), "--pretrained-weights", str(teacher_checkpoint), "--classifier",
        str(older), "--output-dir", str(tmp_path / "export"), "--check-images", "2"]))
    assert exported["ood"] is None and exported["outputs"] == ["probabilities", "score", "positive"]
    assert exported["check"]["max_abs_unfamiliarity_diff"] is None
    onnx_plain = OnnxPredictor(str(tmp_path / "export" / "model.onnx")).score(photos, groups)
    assert {(i["unfamiliarity"], i["unfamiliar"]) for i in onnx_plain["images"]} == {(None, None)}
