"""Fixtures of the evaluation tests: a tiny sample BBU dataset, a ViT-Ti/16 eval config on 64 px crops, a teacher
checkpoint in the training layout, and one run of the three probes for the teacher and for random weights."""

import json
import pathlib

import pytest
import torch
from eval_helpers import EVAL_CONFIG, load_eval_config, run_all_probes

from dinov2.data.sample_bbu import make_sample_bbu
from dinov2.models import build_model_from_cfg


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> pathlib.Path:
    """10 groups x 3 views of 64 x 48 px: train 6 groups, val 2, test 2; plus edge-case annotation files."""
    root = tmp_path_factory.mktemp("bbu")
    make_sample_bbu(str(root), groups=10, size=64, seed=0)
    annotations = root / "annotations"
    val = json.loads((annotations / "val.json").read_text())
    test = json.loads((annotations / "test.json").read_text())
    negatives = {**val, "data_list": [e for e in val["data_list"] if e["gt_label"] == 0]}
    (annotations / "val_negatives.json").write_text(json.dumps(negatives))
    (annotations / "empty.json").write_text(json.dumps({**test, "data_list": []}))
    mixed = json.loads(json.dumps(test))
    first_negative = next(e for e in mixed["data_list"] if e["gt_label"] == 0)
    first_negative["gt_label"] = 1  # one photo of a negative device labelled positive
    (annotations / "mixed.json").write_text(json.dumps(mixed))
    for split in ("train", "val"):  # three classes: the positive groups alternate between class 1 and class 2
        content = json.loads((annotations / f"{split}.json").read_text())
        positives = sorted({e["group_id"] for e in content["data_list"] if e["gt_label"] == 1})
        for entry in content["data_list"]:
            if entry["gt_label"] == 1:
                entry["gt_label"] = 1 + positives.index(entry["group_id"]) % 2
        content["metainfo"]["classes"] = ["ok", "missing_module", "alarm"]
        (annotations / f"{split}_3class.json").write_text(json.dumps(content))
    return root


@pytest.fixture(scope="session")
def eval_config(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("config") / "eval_tiny.yaml"
    path.write_text(EVAL_CONFIG)
    return path


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory, eval_config) -> pathlib.Path:
    """`{"teacher": {"backbone.<key>": tensor}}` as training writes it, from a model built with another seed."""
    torch.manual_seed(1234)
    model, _ = build_model_from_cfg(load_eval_config(eval_config), only_teacher=True)
    path = tmp_path_factory.mktemp("teacher") / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, sample_root, eval_config, teacher_checkpoint):
    output_dir = tmp_path_factory.mktemp("eval_teacher")
    counts = run_all_probes(sample_root, eval_config, teacher_checkpoint, output_dir)
    return output_dir, counts


@pytest.fixture(scope="session")
def random_run(tmp_path_factory, sample_root, eval_config):
    output_dir = tmp_path_factory.mktemp("eval_random")
    counts = run_all_probes(sample_root, eval_config, "random", output_dir)
    return output_dir, counts