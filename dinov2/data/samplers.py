"""Samplers with upstream's orders (EPOCH, INFINITE, SHARDED_INFINITE[_NEW]) plus `advance` for exact resumption.

Every sampler yields this rank's share of the indices (`start` = rank, `step` = world size by default). `advance=k`
makes the sampler yield exactly what it would have yielded after skipping its first k indices, so a run resumed at
iteration `it` with `advance = it * batch_size` sees the same data order as an uninterrupted run. For the infinite
samplers `advance` applies to every `iter()`; for the finite ones (EPOCH, DISTRIBUTED) only to the next `iter()`
(the rest of the interrupted epoch), later epochs are whole.
"""

import itertools
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data.sampler import Sampler

from dinov2 import distributed


def _get_numpy_dtype(size: int) -> np.dtype:
    return np.dtype(np.int32) if size <= 2**31 else np.dtype(np.int64)


def _get_torch_dtype(size: int) -> torch.dtype:
    return torch.int32 if size <= 2**31 else torch.int64


def _rank_and_world(start: Optional[int], step: Optional[int]) -> tuple:
    start = distributed.get_global_rank() if start is None else start
    step = distributed.get_global_size() if step is None else step
    if step < 1 or not 0 <= start < step:
        raise ValueError(f"need 0 <= start < step, got start={start}, step={step}")
    return start, step


def _check_advance(advance: int) -> int:
    if advance < 0:
        raise ValueError(f"advance must be >= 0, got {advance}")
    return advance


def _generate_randperm_indices(*, size: int, generator: torch.Generator) -> Iterator[int]:
    """A random permutation of range(size), yielded lazily (Fisher-Yates: position i swaps with U[i, size))."""
    perm = np.arange(size, dtype=_get_numpy_dtype(size))
    for i in range(size):
        j = int(torch.randint(i, size, size=(1,), generator=generator).item())
        perm[i], perm[j] = perm[j], perm[i]
        yield int(perm[i])


def _slice_count(size: int, step: int) -> int:
    count = size // step
    if size != count * step:
        warnings.warn(f"# of dropped samples: {size - count * step}")
    return count


def _shuffle_tensor_slice(
    *, tensor: torch.Tensor, start: int = 0, step: int = 1, generator: torch.Generator
) -> np.ndarray:
    """Shuffle `tensor[start::step]` (truncated to len // step items) with an inside-out Fisher-Yates loop."""
    count = _slice_count(len(tensor), step)
    values = tensor.numpy()[start::step][:count]
    result = np.empty(count, dtype=_get_numpy_dtype(len(tensor)))
    for i in range(count):
        j = int(torch.randint(0, i + 1, size=(1,), generator=generator).item()) if i > 0 else 0
        result[i] = result[j]
        result[j] = values[i]
    return result


def _new_shuffle_tensor_slice(
    *, tensor: torch.Tensor, start: int = 0, step: int = 1, generator: torch.Generator
) -> np.ndarray:
    """Same contract as `_shuffle_tensor_slice`, shuffled by one `torch.randperm` (much faster)."""
    count = _slice_count(len(tensor), step)
    order = torch.randperm(count, dtype=torch.int64, generator=generator)
    return tensor[start::step][:count][order].numpy()


def _make_seed(seed: int, start: int, iter_count: int) -> int:
    return seed + start + (iter_count << 24)


class EpochSampler(Sampler):
    """`size` indices per epoch (range(sample_count) tiled), shuffled per epoch with seed `seed * epoch` (or `epoch`
    when seed is 0) if `shuffle`; this rank takes every `step`-th from `start`. Call `set_epoch` between epochs."""

    def __init__(
        self,
        *,
        size: int,
        sample_count: int,
        shuffle: bool = False,
        seed: int = 0,
        start: Optional[int] = None,
        step: Optional[int] = None,
        advance: int = 0,
    ) -> None:
        self._size = size
        self._sample_count = sample_count
        self._shuffle = shuffle
        self._seed = seed
        self._start, self._step = _rank_and_world(start, step)
        self._advance = _check_advance(advance)
        self._epoch = 0

    def _epoch_indices(self) -> np.ndarray:
        count = (self._size + self._sample_count - 1) // self._sample_count
        tiled = np.tile(np.arange(self._sample_count), count)
        if not self._shuffle:
            return tiled[: self._size]
        seed = self._seed * self._epoch if self._seed != 0 else self._epoch
        return np.random.default_rng(seed).choice(tiled, self._size, replace=False)

    def __iter__(self) -> Iterator[int]:
        skip, self._advance = self._advance, 0
        indices = self._epoch_indices()[self._start :: self._step][skip:]
        return iter(indices.tolist())

    def __len__(self) -> int:
        return max(0, (self._size - self._start + self._step - 1) // self._step - self._advance)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch


class InfiniteSampler(Sampler):
    """Endless passes over range(sample_count); with `shuffle`, each pass is a new permutation drawn from one torch
    generator seeded once with `seed`. This rank takes every `step`-th index of each pass from `start`."""

    def __init__(
        self,
        *,
        sample_count: int,
        shuffle: bool = False,
        seed: int = 0,
        start: Optional[int] = None,
        step: Optional[int] = None,
        advance: int = 0,
    ) -> None:
        self._sample_count = sample_count
        self._seed = seed
        self._shuffle = shuffle
        self._start, self._step = _rank_and_world(start, step)
        if sample_count < self._step:
            raise ValueError(f"sample_count ({sample_count}) must be >= the number of ranks ({self._step})")
        self._advance = _check_advance(advance)

    def __iter__(self) -> Iterator[int]:
        if self._shuffle:
            return itertools.islice(self._shuffled_iterator(), self._advance, None)
        pass_length = len(range(self._start, self._sample_count, self._step))
        return itertools.islice(self._iterator(), self._advance % pass_length, None)

    def _iterator(self) -> Iterator[int]:
        while True:
            yield from range(self._start, self._sample_count, self._step)

    def _shuffled_iterator(self) -> Iterator[int]:
        # The generator is made here, not in __init__, so that the sampler stays picklable.
        generator = torch.Generator().manual_seed(self._seed)
        while True:
            perm = _generate_randperm_indices(size=self._sample_count, generator=generator)
            yield from itertools.islice(perm, self._start, None, self._step)


class ShardedInfiniteSampler(InfiniteSampler):
    """Endless passes; with `shuffle`, one global permutation (seed `seed`) is sharded across ranks once, and each pass
    reshuffles this rank's shard with a generator re-seeded from (seed, start, pass), so whole passes can be skipped
    cheaply. Shards hold len // world indices each (the remainder is dropped, with a warning). Without `shuffle` the
    order is `InfiniteSampler`'s. Other keyword arguments: those of `InfiniteSampler`."""

    def __init__(self, *, use_new_shuffle_tensor_slice: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shuffle_tensor_slice_fn = (
            _new_shuffle_tensor_slice if use_new_shuffle_tensor_slice else _shuffle_tensor_slice
        )

    def __iter__(self) -> Iterator[int]:
        if not self._shuffle:
            return super().__iter__()
        pass_length = self._sample_count // self._step
        first_pass, skip = divmod(self._advance, pass_length)
        return itertools.islice(self._sharded_iterator(first_pass), skip, None)

    def _sharded_iterator(self, first_pass: int) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self._seed)
        perm = torch.randperm(self._sample_count, dtype=_get_torch_dtype(self._sample_count), generator=generator)
        for iter_count in itertools.count(first_pass):
            generator.manual_seed(_make_seed(self._seed, self._start, iter_count))
            shard = self._shuffle_tensor_slice_fn(tensor=perm, start=self._start, step=self._step, generator=generator)
            yield from shard.tolist()


class DistributedSampler(torch.utils.data.DistributedSampler):
    """torch's DistributedSampler (no dropped samples: the last indices are repeated to even out ranks), with rank and
    world size taken from `dinov2.distributed` and a one-shot `advance` like `EpochSampler`."""

    def __init__(self, dataset, *, shuffle: bool = True, seed: int = 0, advance: int = 0) -> None:
        super().__init__(
            dataset,
            num_replicas=distributed.get_global_size(),
            rank=distributed.get_global_rank(),
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self._advance = _check_advance(advance)

    def __iter__(self) -> Iterator[int]:
        skip, self._advance = self._advance, 0
        return itertools.islice(super().__iter__(), skip, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self._advance)
