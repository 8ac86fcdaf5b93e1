import itertools
import warnings

import numpy as np
import pytest
import torch

from dinov2.data.samplers import (
    DistributedSampler,
    EpochSampler,
    InfiniteSampler,
    ShardedInfiniteSampler,
    _new_shuffle_tensor_slice,
    _shuffle_tensor_slice,
)

INFINITE = {
    "infinite": lambda **kw: InfiniteSampler(**kw),
    "sharded": lambda **kw: ShardedInfiniteSampler(**kw),
    "sharded_new": lambda **kw: ShardedInfiniteSampler(use_new_shuffle_tensor_slice=True, **kw),
}


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("kind", sorted(INFINITE))
@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_partition_each_pass(kind, shuffle):
    n, w = 12, 3
    per_rank = [
        take(INFINITE[kind](sample_count=n, shuffle=shuffle, seed=5, start=r, step=w), 3 * n // w) for r in range(w)
    ]
    for p in range(3):
        passes = [chunk[p * n // w : (p + 1) * n // w] for chunk in per_rank]
        assert sorted(itertools.chain(*passes)) == list(range(n))


@pytest.mark.parametrize("kind", sorted(INFINITE))
def test_default_rank_comes_from_dinov2_distributed(kind, world):
    world(1, 3)
    implicit = take(INFINITE[kind](sample_count=9, shuffle=True, seed=2), 9)
    explicit = take(INFINITE[kind](sample_count=9, shuffle=True, seed=2, start=1, step=3), 9)
    assert implicit == explicit


@pytest.mark.parametrize("kind", ["sharded", "sharded_new"])
def test_sharded_drops_the_remainder_equally(kind):
    n, w = 13, 3
    with pytest.warns(UserWarning, match="# of dropped samples: 1"):
        shards = [take(INFINITE[kind](sample_count=n, shuffle=True, seed=0, start=r, step=w), 4) for r in range(w)]
    flat = list(itertools.chain(*shards))
    assert len(set(flat)) == 12 and set(flat) <= set(range(n))


def test_infinite_uneven_ranks_cover_everything():
    samplers = [InfiniteSampler(sample_count=13, shuffle=True, seed=0, start=r, step=3) for r in range(3)]
    shards = [take(sampler, 5 if rank == 0 else 4) for rank, sampler in enumerate(samplers)]
    assert sorted(itertools.chain(*shards)) == list(range(13))


@pytest.mark.parametrize("kind", sorted(INFINITE))
def test_deterministic_for_a_seed(kind):
    def make(seed):
        return take(INFINITE[kind](sample_count=20, shuffle=True, seed=seed, start=0, step=1), 60)

    assert make(7) == make(7)
    assert make(7) != make(8)
    first = make(7)
    assert sorted(first[:20]) == list(range(20)) and first[:20] != first[20:40]  # a new order every pass


@pytest.mark.parametrize("kind", sorted(INFINITE))
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("advance", [0, 1, 4, 5, 11, 23])
def test_advance_equals_skipping(kind, shuffle, advance):
    def make(adv):
        return INFINITE[kind](sample_count=11, shuffle=shuffle, seed=3, start=1, step=2, advance=adv)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert take(make(advance), 15) == take(make(0), advance + 15)[advance:]


def test_shuffle_slices_are_permutations_of_the_shard():
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    for fn in (_shuffle_tensor_slice, _new_shuffle_tensor_slice):
        generator = torch.Generator().manual_seed(1)
        with pytest.warns(UserWarning, match="# of dropped samples: 1"):
            out = fn(tensor=perm, start=1, step=3, generator=generator)
        assert sorted(out.tolist()) == sorted(perm[1::3][:3].tolist())


@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_sampler_partitions_and_reshuffles(shuffle):
    n, w = 12, 3
    samplers = [EpochSampler(size=n, sample_count=n, shuffle=shuffle, seed=4, start=r, step=w) for r in range(w)]
    assert [len(s) for s in samplers] == [4, 4, 4]
    assert sorted(itertools.chain(*[list(s) for s in samplers])) == list(range(n))
    first = list(samplers[0])
    samplers[0].set_epoch(1)
    assert (list(samplers[0]) != first) == shuffle


def test_epoch_sampler_tiles_to_size():
    sampler = EpochSampler(size=25, sample_count=10, shuffle=True, seed=1, start=0, step=1)
    counts = np.bincount(list(sampler), minlength=10)
    # upstream draws `size` of the 3 tiled copies without replacement: every index 1..3 times
    assert len(sampler) == 25 and counts.sum() == 25 and counts.min() >= 1 and counts.max() <= 3
    assert list(EpochSampler(size=25, sample_count=10, start=0, step=1)) == list(range(10)) * 2 + list(range(5))


@pytest.mark.parametrize("advance", [0, 1, 3, 4])
def test_epoch_sampler_advance_skips_in_the_current_epoch_only(advance):
    kwargs = dict(size=9, sample_count=9, shuffle=True, seed=2, start=1, step=2)
    reference = EpochSampler(**kwargs)
    resumed = EpochSampler(advance=advance, **kwargs)
    for s in (reference, resumed):
        s.set_epoch(3)
    full = list(reference)
    assert len(resumed) == 4 - advance
    assert list(resumed) == full[advance:]
    assert list(resumed) == full  # the next epoch is whole again
    assert len(resumed) == 4


@pytest.mark.parametrize("advance", [0, 2, 5])
def test_distributed_sampler_advance(world, advance):
    world(1, 2)
    dataset = list(range(11))
    reference = list(DistributedSampler(dataset, shuffle=True, seed=3))
    resumed = DistributedSampler(dataset, shuffle=True, seed=3, advance=advance)
    assert len(resumed) == 6 - advance
    assert list(resumed) == reference[advance:]
    world(0, 2)
    other = list(DistributedSampler(dataset, shuffle=True, seed=3))
    assert sorted(other + reference) == sorted(list(range(11)) + [other[0]])  # torch pads by repeating


def test_invalid_arguments():
    with pytest.raises(ValueError, match="advance must be >= 0"):
        InfiniteSampler(sample_count=3, start=0, step=1, advance=-1)
    with pytest.raises(ValueError, match=r"sample_count \(2\) must be >= the number of ranks \(3\)"):
        ShardedInfiniteSampler(sample_count=2, start=0, step=3)
    with pytest.raises(ValueError, match="need 0 <= start < step"):
        EpochSampler(size=3, sample_count=3, start=2, step=2)
