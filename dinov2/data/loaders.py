"""Dataset strings (`Name[:key=value]*`) resolved through a registry, samplers and the DataLoader factory."""

import inspect
import logging
from enum import Enum
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
from torch.utils.data import Dataset, Sampler

from .datasets import BBUDataset, ImageFolder, ImageNet, ImageNet22k
from .samplers import DistributedSampler, EpochSampler, InfiniteSampler, ShardedInfiniteSampler

logger = logging.getLogger("dinov2")

DATASET_REGISTRY: Dict[str, Type] = {}

# Constructor arguments that make_dataset passes itself; never part of a dataset string.
_NON_STRING_ARGUMENTS = ("transforms", "transform", "target_transform")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SamplerType(Enum):
    DISTRIBUTED = 0
    EPOCH = 1
    INFINITE = 2
    SHARDED_INFINITE = 3
    SHARDED_INFINITE_NEW = 4


def register_dataset(name: str) -> Callable[[Type], Type]:
    """Class decorator: make `name` usable as the first token of a dataset string. The keys a string may carry are
    the class's keyword arguments (except the transforms)."""

    def register(cls: Type) -> Type:
        if DATASET_REGISTRY.get(name, cls) is not cls:
            raise ValueError(f'dataset name "{name}" is already registered for {DATASET_REGISTRY[name].__name__}')
        DATASET_REGISTRY[name] = cls
        return cls

    return register


register_dataset("BBU")(BBUDataset)
register_dataset("ImageFolder")(ImageFolder)
register_dataset("ImageNet")(ImageNet)
register_dataset("ImageNet22k")(ImageNet22k)


def dataset_string_keys(cls: Type) -> Dict[str, inspect.Parameter]:
    """The keys a dataset string for `cls` accepts, with their constructor parameters."""
    parameters = inspect.signature(cls.__init__).parameters
    return {
        name: p
        for name, p in parameters.items()
        if name != "self" and name not in _NON_STRING_ARGUMENTS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def _value_type(parameter: inspect.Parameter) -> Optional[type]:
    """bool, int or None (string) for a constructor parameter, from its annotation or else its default."""
    annotation = parameter.annotation
    for candidate in (bool, int):
        if annotation is candidate or annotation == candidate.__name__:
            return candidate
    if annotation is inspect.Parameter.empty and isinstance(parameter.default, (bool, int)):
        return type(parameter.default)
    return None


def _convert_value(cls: Type, key: str, parameter: inspect.Parameter, value: str, dataset_str: str) -> Any:
    value_type = _value_type(parameter)
    if key == "split" and hasattr(cls, "Split"):
        return cls.Split.parse(value)
    if value_type is bool:
        if value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f'"{key}={value}" in "{dataset_str}": expected one of {", ".join(_TRUE + _FALSE)}')
    if value_type is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f'"{key}={value}" in "{dataset_str}": expected an integer') from None
    return value


def _parse_dataset_str(dataset_str: str) -> Tuple[Type, Dict[str, Any]]:
    name, *tokens = dataset_str.split(":")
    if name not in DATASET_REGISTRY:
        registered = ", ".join(sorted(DATASET_REGISTRY))
        raise ValueError(f'Unsupported dataset "{name}" in "{dataset_str}"; registered datasets: {registered}')
    cls = DATASET_REGISTRY[name]
    keys = dataset_string_keys(cls)
    kwargs: Dict[str, Any] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f'"{token}" in "{dataset_str}" is not of the form key=value')
        if key not in keys:
            raise ValueError(
                f'unknown key "{key}" for dataset {name} in "{dataset_str}"; allowed keys: {", ".join(keys)}'
            )
        if key in kwargs:
            raise ValueError(f'key "{key}" given twice in "{dataset_str}"')
        kwargs[key] = _convert_value(cls, key, keys[key], value, dataset_str)
    missing = [k for k, p in keys.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ValueError(f'dataset string "{dataset_str}" lacks required key(s): {", ".join(missing)}')
    return cls, kwargs


def make_dataset(
    *,
    dataset_str: str,
    transform: Optional[Callable] = None,
    target_transform: Optional[Callable] = None,
) -> Dataset:
    """Build the dataset a string describes, e.g. `BBU:root=data/bbu_sample:split=TRAIN`."""
    logger.info(f'using dataset: "{dataset_str}"')
    class_, kwargs = _parse_dataset_str(dataset_str)
    dataset = class_(transform=transform, target_transform=target_transform, **kwargs)
    logger.info(f"# of dataset samples: {len(dataset):,d}")
    # Aggregated datasets may not expose these attributes; callers rely on them.
    if not hasattr(dataset, "transform"):
        dataset.transform = transform
    if not hasattr(dataset, "target_transform"):
        dataset.target_transform = target_transform
    return dataset


def _make_sampler(
    *,
    dataset,
    type: Optional[SamplerType] = None,
    shuffle: bool = False,
    seed: int = 0,
    size: int = -1,
    advance: int = 0,
) -> Optional[Sampler]:
    sample_count = len(dataset)
    if type == SamplerType.INFINITE:
        logger.info("sampler: infinite")
        if size > 0:
            raise ValueError("sampler size > 0 is invalid for an infinite sampler")
        return InfiniteSampler(sample_count=sample_count, shuffle=shuffle, seed=seed, advance=advance)
    if type in (SamplerType.SHARDED_INFINITE, SamplerType.SHARDED_INFINITE_NEW):
        logger.info("sampler: sharded infinite")
        if size > 0:
            raise ValueError("sampler size > 0 is invalid for an infinite sampler")
        return ShardedInfiniteSampler(
            sample_count=sample_count,
            shuffle=shuffle,
            seed=seed,
            advance=advance,
            use_new_shuffle_tensor_slice=type == SamplerType.SHARDED_INFINITE_NEW,
        )
    if type == SamplerType.EPOCH:
        logger.info("sampler: epoch")
        size = size if size > 0 else sample_count
        logger.info(f"# of samples / epoch: {size:,d}")
        return EpochSampler(size=size, sample_count=sample_count, shuffle=shuffle, seed=seed, advance=advance)
    if type == SamplerType.DISTRIBUTED:
        logger.info("sampler: distributed")
        if size > 0:
            raise ValueError("sampler size > 0 is invalid for the distributed sampler")
        return DistributedSampler(dataset, shuffle=shuffle, seed=seed, advance=advance)
    if type is not None:
        raise ValueError(f"unknown sampler type {type!r}; allowed: {', '.join(t.name for t in SamplerType)} or None")
    logger.info("sampler: none")
    if advance > 0:
        raise ValueError("sampler_advance > 0 needs a sampler type")
    return None


def make_data_loader(
    *,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool = True,
    seed: int = 0,
    sampler_type: Optional[SamplerType] = SamplerType.INFINITE,
    sampler_size: int = -1,
    sampler_advance: int = 0,
    drop_last: bool = True,
    persistent_workers: bool = False,
    collate_fn: Optional[Callable[[List[Any]], Any]] = None,
) -> torch.utils.data.DataLoader:
    """DataLoader over `dataset` with the given sampler; `sampler_advance` = number of samples this rank already
    consumed (resumption replays the same order). Memory is pinned only when CUDA is available."""
    sampler = _make_sampler(
        dataset=dataset, type=sampler_type, shuffle=shuffle, seed=seed, size=sampler_size, advance=sampler_advance
    )
    logger.info("using PyTorch data loader")
    data_loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
    )
    try:
        logger.info(f"# of batches: {len(data_loader):,d}")
    except TypeError:  # infinite samplers have no length
        logger.info("infinite data loader")
    return data_loader
