"""dinov2.utils.config: precedence default <- file <- overrides, unknown keys, scaling rule, config.yaml output."""

import argparse
import math
import pathlib

import pytest
from omegaconf import OmegaConf

from dinov2.configs import ConfigError
from dinov2.utils import config as config_module
from dinov2.utils.config import apply_scaling_rules_to_cfg, get_cfg_from_args, write_config


def make_args(tmp_path: pathlib.Path, config_file: str = "", opts=()) -> argparse.Namespace:
    return argparse.Namespace(config_file=config_file, output_dir=str(tmp_path / "out"), opts=list(opts))


def test_precedence_default_then_file_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  epochs: 7\n  warmup_epochs: 2\n")
    cfg = get_cfg_from_args(make_args(tmp_path, str(cfg_file), ["optim.warmup_epochs=3"]))
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.weight_decay) == (7, 3, 0.04)
    assert cfg.train.output_dir == str((tmp_path / "out").resolve())


@pytest.mark.parametrize("name", ["run #2", "a: b", "x=1"])
def test_output_dir_is_taken_as_it_is(tmp_path, name):
    """--output-dir is not parsed as YAML: a '#' does not cut it, ': ' does not make it a mapping."""
    args = argparse.Namespace(config_file="", output_dir=str(tmp_path / name), opts=[])
    cfg = get_cfg_from_args(args)
    assert cfg.train.output_dir == args.output_dir == str(tmp_path / name)


def test_output_dir_and_a_different_override_are_an_error(tmp_path):
    same = make_args(tmp_path, opts=[f"train.output_dir={tmp_path / 'out'}"])
    assert get_cfg_from_args(same).train.output_dir == str(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"--output-dir .*/out and the override train.output_dir=.*/elsewhere differ"):
        get_cfg_from_args(make_args(tmp_path, opts=[f"train.output_dir={tmp_path / 'elsewhere'}"]))


def test_without_output_dir_the_run_goes_to_train_output_dir(tmp_path, monkeypatch):
    """As upstream, no --output-dir means train.output_dir (default ".": the working directory)."""
    monkeypatch.setattr(config_module, "default_setup", lambda args, seed=None: None)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(config_file="", output_dir="", opts=["train.output_dir=runs/a"])
    cfg = config_module.setup(args)
    assert args.output_dir == cfg.train.output_dir == str(tmp_path / "runs" / "a")
    assert (tmp_path / "runs" / "a" / "config.yaml").is_file()
    args = argparse.Namespace(config_file="", output_dir="", opts=[])
    assert config_module.setup(args).train.output_dir == str(tmp_path)


def test_unknown_override_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.batchsize'.*command-line"):
        get_cfg_from_args(make_args(tmp_path, opts=["train.batchsize=3"]))


def test_unknown_key_in_config_file_names_the_file(tmp_path):
    cfg_file = tmp_path / "typo.yaml"
    cfg_file.write_text("student:\n  archh: vit_small\n")
    with pytest.raises(ConfigError, match=r"'student\.archh'.*typo\.yaml"):
        get_cfg_from_args(make_args(tmp_path, str(cfg_file)))


def test_override_without_equals_sign_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        get_cfg_from_args(make_args(tmp_path, opts=["optim.epochs"]))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        get_cfg_from_args(make_args(tmp_path, str(tmp_path / "missing.yaml")))


def test_sqrt_scaling_rule_single_process(tmp_path):
    cfg = get_cfg_from_args(make_args(tmp_path, opts=["train.batch_size_per_gpu=16", "optim.base_lr=0.004"]))
    apply_scaling_rules_to_cfg(cfg)
    assert cfg.optim.lr == pytest.approx(0.004 * math.sqrt(16 / 1024))


def test_unsupported_scaling_rule(tmp_path):
    cfg = get_cfg_from_args(make_args(tmp_path, opts=["optim.scaling_rule=linear"]))
    with pytest.raises(ConfigError, match="linear"):
        apply_scaling_rules_to_cfg(cfg)


def test_write_config_round_trip(tmp_path):
    cfg = get_cfg_from_args(make_args(tmp_path, opts=["optim.epochs=5"]))
    path = write_config(cfg, str(tmp_path / "out"))
    assert pathlib.Path(path).name == "config.yaml"
    assert OmegaConf.to_container(OmegaConf.load(path)) == OmegaConf.to_container(cfg)
    assert list((tmp_path / "out").iterdir()) == [pathlib.Path(path)]
