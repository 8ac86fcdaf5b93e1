"""dinov2.eval.saved_probe: the probes' classifier files, what they record, and files that are not classifiers."""

import json

import pytest
import torch
from eval_helpers import CLASSIFIER_FILES, load_eval_config

from dinov2.eval.features import backbone_fingerprint
from dinov2.eval.saved_probe import load_probe_classifier
from dinov2.eval.setup import build_model_for_eval


def test_files_that_are_not_probe_classifiers_are_named(tmp_path, teacher_run, teacher_checkpoint):
    teacher_dir, _ = teacher_run
    with pytest.raises(FileNotFoundError, match="--classifier .*nope.pth: no such file"):
        load_probe_classifier(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match=r"results_eval_knn.json is not a log_regression_classifier.json written by "
                                         r"the log-reg probe \(missing \['coef', 'intercept', 'classes'\]\)"):
        load_probe_classifier(str(teacher_dir / "results_eval_knn.json"))
    with pytest.raises(ValueError, match=r"teacher_checkpoint.pth is not a knn_classifier.pth or "
                                         r"linear_classifier.pth written by a probe \(KeyError"):
        load_probe_classifier(str(teacher_checkpoint))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth is not a knn_classifier.pth or linear_classifier.pth"):
        load_probe_classifier(str(garbage))
    broken = tmp_path / "broken.json"
    broken.write_text('{"coef": [1')
    with pytest.raises(ValueError, match="--classifier .*broken.json: invalid JSON"):
        load_probe_classifier(str(broken))
    broken.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="--classifier .*broken.json: invalid JSON"):
        load_probe_classifier(str(broken))
    old = json.loads((teacher_dir / "log_regression_classifier.json").read_text())
    del old["features"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    saved = load_probe_classifier(str(tmp_path / "old.json"))
    with pytest.raises(ValueError, match="old.json does not record the backbone and eval transform"):
        saved.source


def test_saved_classifiers_record_their_features_source(teacher_run, eval_config, teacher_checkpoint):
    """The fixture's probes ran with --resize-size 64 --crop-size 64 on the teacher checkpoint."""
    teacher_dir, _ = teacher_run
    sources = [load_probe_classifier(str(teacher_dir / name)).source for name in CLASSIFIER_FILES.values()]
    linear_source = sources[1]
    assert sources[0] == linear_source == sources[2]
    assert list(linear_source) == ["backbone_sha256", "pretrained_weights", "model", "eval_transform"]
    assert linear_source["eval_transform"] == {"resize_size": 64, "crop_size": 64, "draft_reducing_gap": 2.0}
    assert linear_source["pretrained_weights"] == str(teacher_checkpoint)
    assert linear_source["model"]["arch"] == "vit_tiny" and linear_source["model"]["patch_size"] == 16
    model = build_model_for_eval(load_eval_config(eval_config), str(teacher_checkpoint))
    assert linear_source["backbone_sha256"] == backbone_fingerprint(model)
    with torch.no_grad():
        model.cls_token.add_(1e-3)
    assert backbone_fingerprint(model) != linear_source["backbone_sha256"]
