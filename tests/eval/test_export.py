"""dinov2.eval.export: backbone + saved probe classifier as one ONNX model, checked against torch; OnnxPredictor."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from eval_helpers import CLASSIFIER_FILES, dataset_str

from dinov2.eval import export
from dinov2.eval.ood import ood_summary
from dinov2.eval.predictor import OnnxPredictor, Predictor
from dinov2.eval.saved_probe import load_probe_classifier

METADATA_KEYS = ["format_version", "probe", "class_names", "thresholds", "eval_transform", "input", "outputs", "ood",
                 "backbone_sha256", "pretrained_weights", "config_file", "classifier", "classifier_sha256", "torch",
                 "exporter", "opset"]
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECK_KEYS = ["images", "n_images", "max_abs_score_diff", "worst_image", "max_abs_unfamiliarity_diff", "tolerance",
              "decisions_differ", "onnxruntime"]


def export_args(eval_config, weights, classifier, output_dir, *extra: str):
    argv = ["--config-file", str(eval_config), "--pretrained-weights", str(weights), "--classifier", str(classifier),
            "--output-dir", str(output_dir), *extra]
    return export.get_args_parser().parse_args(argv)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, teacher_run, sample_root, eval_config, teacher_checkpoint):
    """Each probe's classifier exported with the default exporter, checked on the test split."""
    teacher_dir, _ = teacher_run
    outputs = {}
    for probe, name in CLASSIFIER_FILES.items():
        output_dir = tmp_path_factory.mktemp(f"export_{probe}")
        args = export_args(eval_config, teacher_checkpoint, teacher_dir / name, output_dir,
                           "--check-datasets", dataset_str(sample_root, "TEST"), "--batch-size", "4")
        outputs[probe] = output_dir, export.run_export(args)
    return outputs


@pytest.mark.parametrize("probe", ["knn", "linear", "log_regression"])
def test_onnx_decisions_equal_the_predictor(probe, exported, teacher_run, sample_root, eval_config,
                                            teacher_checkpoint):
    teacher_dir, _ = teacher_run
    output_dir, result = exported[probe]
    saved = load_probe_classifier(str(teacher_dir / CLASSIFIER_FILES[probe]))
    assert list(result) == [*METADATA_KEYS, "files", "check"] and list(result["check"]) == CHECK_KEYS
    assert result["files"] == ["model.onnx"]
    assert json.loads((output_dir / "model.json").read_text()) == result
    assert (result["probe"], result["class_names"], result["thresholds"]) == (probe, saved.class_names,
                                                                              saved.thresholds)
    assert result["backbone_sha256"] == saved.source["backbone_sha256"]
    assert result["ood"] == ood_summary(saved.ood_params) and result["ood"]["threshold"] > 0
    check = result["check"]
    assert check["n_images"] == 6 and check["max_abs_score_diff"] <= 1e-4
    assert check["max_abs_unfamiliarity_diff"] <= 1e-4
    threshold = saved.thresholds["image"]["threshold"]
    for flip in check["decisions_differ"]:  # only a score at the threshold, to rounding, may be decided either way
        assert abs(flip["torch_score"] - flip["onnx_score"]) <= check["max_abs_score_diff"]
        assert min(flip["torch_score"], flip["onnx_score"]) < threshold <= max(flip["torch_score"], flip["onnx_score"])

    photos = sorted((sample_root / "test").glob("*/*.jpeg"))
    groups = [photo.parent.name for photo in photos]
    onnx_decision = OnnxPredictor(str(output_dir / "model.onnx")).score(photos, groups)
    torch_decision = Predictor(str(eval_config), str(teacher_checkpoint),
                               str(teacher_dir / CLASSIFIER_FILES[probe])).score(photos, groups)
    for kind in ("images", "groups"):
        onnx_rows, torch_rows = onnx_decision[kind], torch_decision[kind]
        assert [r.get("path") for r in onnx_rows] == [r.get("path") for r in torch_rows]
        assert [r["group_id"] for r in onnx_rows] == [r["group_id"] for r in torch_rows]
        assert [r["score"] for r in onnx_rows] == pytest.approx([r["score"] for r in torch_rows], abs=1e-5)
        if kind == "images":
            assert [r["unfamiliarity"] for r in onnx_rows] == pytest.approx([r["unfamiliarity"] for r in torch_rows],
                                                                            abs=1e-5)
            for o, t in zip(onnx_rows, torch_rows):
                if abs(t["unfamiliarity"] - result["ood"]["threshold"]) > 1e-5:
                    assert o["unfamiliar"] == t["unfamiliar"]
        else:
            assert [r["n_unfamiliar"] for r in onnx_rows] == [r["n_unfamiliar"] for r in torch_rows]
        threshold = saved.thresholds["image" if kind == "images" else "group"]["threshold"]
        for o, t in zip(onnx_rows, torch_rows):
            if abs(t["score"] - threshold) > 1e-5:
                assert o["positive"] == t["positive"]


def test_graph_inputs_outputs_and_metadata(exported):
    output_dir, result = exported["linear"]
    model = onnx.load(str(output_dir / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["probabilities", "score", "positive", "unfamiliarity", "unfamiliar"]
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 64, 64] and isinstance(dims[0], str)  # free batch size, the classifier's crop
    assert "Resize" not in {node.op_type for node in model.graph.node}  # position embedding baked in
    metadata = {k: v for k, v in result.items() if k not in ("files", "check")}
    assert export.read_metadata(str(output_dir / "model.onnx")) == metadata
    session = onnxruntime.InferenceSession(str(output_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1)).numpy()
    probabilities, score, positive, unfamiliarity, unfamiliar = session.run(None, {"images": images})
    assert probabilities.shape == (5, 2) and probabilities.dtype == np.float64
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(score, 1.0 - probabilities[:, 0])
    np.testing.assert_array_equal(positive, score >= result["thresholds"]["image"]["threshold"])
    assert unfamiliarity.dtype == np.float64 and np.all(unfamiliarity >= 0)
    np.testing.assert_array_equal(unfamiliar, unfamiliarity > result["ood"]["threshold"])


def test_torchscript_exporter_from_the_command_line(tmp_path, exported, teacher_run, eval_config, teacher_checkpoint):
    """`python -m dinov2.eval.export --exporter torchscript` (the default before torch 2.9) writes the same model."""
    teacher_dir, _ = teacher_run
    argv = [sys.executable, "-m", "dinov2.eval.export", "--config-file", str(eval_config), "--pretrained-weights",
            str(teacher_checkpoint), "--classifier", str(teacher_dir / "log_regression_classifier.json"),
            "--output-dir", str(tmp_path), "--exporter", "torchscript", "--check-images", "5", "--batch-size", "2"]
    subprocess.run(argv, check=True, cwd=REPO_ROOT, capture_output=True)
    result = json.loads((tmp_path / "model.json").read_text())
    assert result["exporter"] == "torchscript" and result["check"]["n_images"] == 5
    assert result["check"]["images"] == "5 seeded random images" and result["check"]["max_abs_score_diff"] <= 1e-4
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)).numpy()
    runs = [onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": images}) for folder in (tmp_path, exported["log_regression"][0])]
    for traced, dynamo in zip(*runs):
        np.testing.assert_allclose(traced, dynamo, atol=1e-6)


def test_bad_inputs_are_named(tmp_path, teacher_run, sample_root, eval_config, teacher_checkpoint):
    teacher_dir, _ = teacher_run
    classifier = teacher_dir / "linear_classifier.pth"
    with pytest.raises(ValueError, match="--pretrained-weights random .* is not the backbone the classifier"):
        export.run_export(export_args(eval_config, "random", classifier, tmp_path / "a"))
    with pytest.raises(ValueError, match="results_eval_knn.json is not a log_regression_classifier.json written by"):
        export.run_export(export_args(eval_config, teacher_checkpoint, teacher_dir / "results_eval_knn.json",
                                      tmp_path / "b"))
    with pytest.raises(ValueError, match="--check-images and --batch-size must be >= 1, got 0, 32"):
        export.run_export(export_args(eval_config, teacher_checkpoint, classifier, tmp_path / "c",
                                      "--check-images", "0"))
    with pytest.raises(ValueError, match="no check images: .*empty.json"):
        export.run_export(export_args(eval_config, teacher_checkpoint, classifier, tmp_path / "d", "--check-datasets",
                                      dataset_str(sample_root, "TEST", "empty.json")))
    assert not (tmp_path / "d" / "model.onnx").exists() and not (tmp_path / "d" / "model.json").exists()
    not_onnx = tmp_path / "not.onnx"
    not_onnx.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=f"{not_onnx} is not an ONNX model"):
        OnnxPredictor(str(not_onnx))
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(plain))
    with pytest.raises(ValueError, match=f"{plain} has no 'dinov2_qc' metadata"):
        export.read_metadata(str(plain))
    with pytest.raises(FileNotFoundError, match="missing.onnx: no such file"):
        OnnxPredictor(str(tmp_path / "missing.onnx"))


def test_a_runtime_that_disagrees_fails_the_export(tmp_path, monkeypatch, teacher_run, eval_config,
                                                   teacher_checkpoint):
    """Scores of ONNX Runtime beyond --tolerance from torch's: the export fails naming the image, and the export
    already in the directory is left as it was."""
    teacher_dir, _ = teacher_run
    args = export_args(eval_config, teacher_checkpoint, teacher_dir / "knn_classifier.pth", tmp_path, "--check-images",
                       "3")
    export.run_export(args)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix in (".onnx", ".json")}
    assert sorted(before) == ["model.json", "model.onnx"]
    run = onnxruntime.InferenceSession.run

    def drifting_run(self, output_names, feed, *rest):
        return [out + 0.01 if name == "score" else out for name, out in zip(output_names, run(self, output_names,
                                                                                               feed, *rest))]

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", drifting_run)
    with pytest.raises(RuntimeError, match=r"score of random image \d differs from torch.s by 0.01, its unfamiliarity"):
        export.run_export(args)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix in (".onnx", ".json")} == before
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no temporary directory left


def test_large_weights_go_beside_the_graph(tmp_path, monkeypatch, exported, teacher_run, sample_root, eval_config,
                                           teacher_checkpoint):
    """Weights past EXTERNAL_DATA_BYTES (ViT-g's exceed the 2 GB of an ONNX file) are written to model.onnx.data; the
    model scores as the one-file export. A later one-file export removes the stale weights file."""
    teacher_dir, _ = teacher_run
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    args = export_args(eval_config, teacher_checkpoint, teacher_dir / "linear_classifier.pth", tmp_path)
    result = export.run_export(args)
    assert result["files"] == ["model.onnx.data", "model.onnx"]
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    photos = sorted((sample_root / "test").glob("*/*.jpeg"))
    split, single = (OnnxPredictor(str(folder / "model.onnx")).score(photos)
                     for folder in (tmp_path, exported["linear"][0]))
    assert [r["score"] for r in split["images"]] == pytest.approx([r["score"] for r in single["images"]], abs=1e-6)
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1 << 30)
    assert export.run_export(args)["files"] == ["model.onnx"] and not (tmp_path / "model.onnx.data").exists()
