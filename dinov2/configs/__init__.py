"""Config files shipped with the package, loaded with OmegaConf.

`ssl_default_config.yaml` is the one default file; every other config only overrides keys of it.
"""

import pathlib
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

CONFIGS_DIR = pathlib.Path(__file__).parent.resolve()


class ConfigError(ValueError):
    """A config file or an override names a key that the default config does not have, or a bad value."""


def _check_shapes(base: Any, other: Any, source: str, prefix: str = "") -> None:
    """Struct mode still lets a mapping replace a value and a value replace a mapping (`optim.epochs.warmup=5` would
    turn `optim.epochs` into `{'warmup': 5}`, `compute_precision.teacher=3` drop a whole section): refuse both,
    naming the key."""
    for key, value in other.items():
        if key not in base:
            continue  # the merge names unknown keys
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not isinstance(base[key], dict):
            keys = ", ".join(f"{name}.{k}" for k in value)
            raise ConfigError(f"Unknown config key(s) {keys} in {source}: {name} takes a value, not a mapping")
        if isinstance(base[key], dict) and not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} in {source}: {name} is a section ({', '.join(base[key])}), set its "
                              "keys instead")  # fmt: skip
        if isinstance(value, dict):
            _check_shapes(base[key], value, source, f"{name}.")


def merge_configs(base: DictConfig, *others: DictConfig, source: str = "config") -> DictConfig:
    """Merge `others` into `base` in struct mode, so a key missing from `base` raises a ConfigError naming it."""
    plain_base = OmegaConf.to_container(base, resolve=False)
    for other in others:
        _check_shapes(plain_base, OmegaConf.to_container(other, resolve=False), source)
    OmegaConf.set_struct(base, True)
    try:
        merged = OmegaConf.merge(base, *others)
    except (ConfigAttributeError, ConfigKeyError) as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or str(e)
        raise ConfigError(
            f"Unknown config key {key!r} in {source}: it is not in dinov2/configs/ssl_default_config.yaml "
            f"(check the spelling; every option has a default there)"
        ) from None
    OmegaConf.set_struct(merged, False)
    return merged


def load_config(config_name: str) -> DictConfig:
    """Load `<config_name>.yaml` relative to this folder (e.g. "train/bbu_sample")."""
    config_filename = config_name if config_name.endswith(".yaml") else config_name + ".yaml"
    path = CONFIGS_DIR / config_filename
    if not path.is_file():
        raise FileNotFoundError(f"No config named {config_name!r}: {path} does not exist")
    return OmegaConf.load(path)


dinov2_default_config = load_config("ssl_default_config")


def load_and_merge_config(config_name: str) -> DictConfig:
    """Default config merged with the packaged config `config_name` (unknown keys are an error)."""
    return merge_configs(OmegaConf.create(dinov2_default_config), load_config(config_name), source=config_name)
