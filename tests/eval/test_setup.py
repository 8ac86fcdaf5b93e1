"""dinov2.eval.setup: strict weight loading (clear errors instead of random weights), seeded random baseline, dtype,
the probes' option checks."""

import argparse

import pytest
import torch
from eval_helpers import load_eval_config, probe_args

from dinov2.eval import knn
from dinov2.eval.features import setup_feature_store
from dinov2.eval.setup import (
    build_model_for_eval,
    check_qc_arguments,
    get_args_parser,
    get_autocast_dtype,
    setup_and_build_model,
)


def test_teacher_checkpoint_is_loaded_exactly(eval_config, teacher_checkpoint):
    model = build_model_for_eval(load_eval_config(eval_config), str(teacher_checkpoint))
    saved = torch.load(teacher_checkpoint, weights_only=True)["teacher"]
    state = model.state_dict()
    assert {f"backbone.{k}" for k in state} == set(saved)
    for key, value in state.items():
        assert torch.equal(value, saved[f"backbone.{key}"]), key
    assert not model.training


def test_random_weights_are_seeded_by_train_seed(eval_config):
    cfg = load_eval_config(eval_config)
    first, second = build_model_for_eval(cfg, "random"), build_model_for_eval(cfg, "random")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    cfg.train.seed = 1
    other = build_model_for_eval(cfg, "random")
    assert not torch.equal(first.patch_embed.proj.weight, other.patch_embed.proj.weight)


@pytest.mark.parametrize(
    "override,key",
    [
        ({"patch_size": 8}, "patch_embed"),
        ({"arch": "vit_small"}, "cls_token|pos_embed|patch_embed|blocks"),
        ({"num_register_tokens": 4}, "register_tokens"),
    ],
)
def test_mismatching_checkpoint_raises_naming_the_keys(eval_config, teacher_checkpoint, override, key):
    cfg = load_eval_config(eval_config)
    for name, value in override.items():
        cfg.student[name] = value
    with pytest.raises((RuntimeError, ValueError, KeyError), match=key):
        build_model_for_eval(cfg, str(teacher_checkpoint))


def test_weights_argument_is_required(eval_config):
    with pytest.raises(ValueError, match="--pretrained-weights"):
        build_model_for_eval(load_eval_config(eval_config), None)


def test_autocast_dtype_from_config(eval_config):
    cfg = load_eval_config(eval_config)
    for name, dtype in (("fp16", torch.half), ("bf16", torch.bfloat16), ("fp32", torch.float)):
        cfg.compute_precision.teacher.backbone.mixed_precision.param_dtype = name
        assert get_autocast_dtype(cfg) == dtype


def test_setup_and_build_model_on_cpu(tmp_path, eval_config):
    args = get_args_parser().parse_args(
        ["--config-file", str(eval_config), "--pretrained-weights", "random", "--output-dir", str(tmp_path)]
    )
    model, autocast_dtype = setup_and_build_model(args)
    assert isinstance(args, argparse.Namespace) and (tmp_path / "config.yaml").is_file()
    assert autocast_dtype == torch.float32  # the config says fp16, but on CPU evaluation runs in fp32
    assert next(model.parameters()).device.type == "cpu" and model.embed_dim == 192


DATASETS = ["--train-dataset", "BBU:root=unused:split=TRAIN", "--val-dataset", "BBU:root=unused:split=VAL"]


@pytest.mark.parametrize("gap", ["0.5", "-1"])
def test_a_draft_gap_between_zero_and_one_is_refused_naming_the_option(tmp_path, eval_config, gap):
    args = probe_args(knn, eval_config, "random", tmp_path, *DATASETS, "--draft-reducing-gap", gap)
    with pytest.raises(ValueError, match=f"--draft-reducing-gap must be 0 .* or >= 1, got {gap}"):
        check_qc_arguments(args)


@pytest.mark.parametrize("gap, step", [(None, "DraftDecode(min_size=64, reducing_gap=2.0)"), ("3", "reducing_gap=3.0"),
                                       ("0", None)])  # fmt: skip
def test_the_probes_eval_transform_decodes_with_the_draft_gap(tmp_path, eval_config, gap, step):
    extra = DATASETS + ([] if gap is None else ["--draft-reducing-gap", gap])
    store = setup_feature_store(probe_args(knn, eval_config, "random", tmp_path, *extra))
    if step is None:
        assert "DraftDecode" not in repr(store.transform)
    else:
        assert step in repr(store.transform) and store.base_fields["transform"] == repr(store.transform)
