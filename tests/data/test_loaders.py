import os

import numpy as np
import pytest
import torch

from dinov2.data import DatasetWithEnumeratedTargets, SamplerType, make_data_loader, make_dataset, register_dataset
from dinov2.data.datasets import BBUDataset, ExtendedVisionDataset
from dinov2.data.loaders import DATASET_REGISTRY, _parse_dataset_str


def test_bbu_string(bbu_sample):
    root, summary = bbu_sample
    dataset = make_dataset(dataset_str=f"BBU:root={root}:split=val", target_transform=lambda _: ())
    assert isinstance(dataset, BBUDataset) and dataset.split == BBUDataset.Split.VAL
    assert len(dataset) == 3 * len(summary["val"])
    assert dataset[0][1] == ()


def test_parse_values(bbu_sample):
    root, _ = bbu_sample
    cls, kwargs = _parse_dataset_str(f"BBU:root={root}:split=TEST:skip_bad_images=true:annotation_file=a.json")
    assert cls is BBUDataset
    assert kwargs == dict(root=root, split=BBUDataset.Split.TEST, skip_bad_images=True, annotation_file="a.json")
    cls, kwargs = _parse_dataset_str("ImageNet22k:root=r:extra=e:mmap_cache_size=4")
    assert kwargs == {"root": "r", "extra": "e", "mmap_cache_size": 4}


@pytest.mark.parametrize(
    "dataset_str, message",
    [
        ("Imagenet:root=x", r'Unsupported dataset "Imagenet" .*datasets: BBU, ImageFolder, ImageNet, ImageNet22k'),
        ("BBU:root=x:spilt=TRAIN", r'unknown key "spilt" .*keys: root, split, annotation_file, skip_bad_images'),
        ("ImageNet:root=x:split=TRAIN", r"lacks required key\(s\): extra"),
        ("BBU:root=x:TRAIN", r'"TRAIN" in "BBU:root=x:TRAIN" is not of the form key=value'),
        ("BBU:root=x:root=y", r'key "root" given twice'),
        ("BBU:root=x:skip_bad_images=maybe", r'"skip_bad_images=maybe" .*expected one of 1, true'),
        ("ImageNet22k:root=r:extra=e:mmap_cache_size=big", r"expected an integer"),
        ("BBU:root=x:split=TRAINING", r'unknown split "TRAINING"; allowed: TRAIN, VAL, TEST'),
    ],
)
def test_bad_strings(dataset_str, message):
    with pytest.raises(ValueError, match=message):
        make_dataset(dataset_str=dataset_str)


def test_register_custom_dataset(monkeypatch):
    monkeypatch.setattr("dinov2.data.loaders.DATASET_REGISTRY", dict(DATASET_REGISTRY))

    @register_dataset("Blobs")
    class Blobs(ExtendedVisionDataset):
        def __init__(self, *, count: int, label: str = "x", transform=None, target_transform=None):
            super().__init__("blobs", transform=transform, target_transform=target_transform)
            self.count, self.label = count, label

        def get_image_data(self, index):
            return b""

        def get_target(self, index):
            return self.label

        def get_image_path(self, index):
            return "blob"

        def __len__(self):
            return self.count

    dataset = make_dataset(dataset_str="Blobs:count=5:label=y")
    assert isinstance(dataset, Blobs) and len(dataset) == 5 and dataset.get_target(0) == "y"
    with pytest.raises(ValueError, match='"Blobs" is already registered for Blobs'):
        register_dataset("Blobs")(BBUDataset)


def _indices_loader(count, **kwargs):
    dataset = DatasetWithEnumeratedTargets(list(zip(range(count), range(count))))
    collate = lambda batch: [target[0] for _, target in batch]  # noqa: E731
    return make_data_loader(dataset=dataset, batch_size=4, num_workers=0, collate_fn=collate, **kwargs)


def test_epoch_loader_covers_dataset(world):
    world(0, 1)
    loader = _indices_loader(10, sampler_type=SamplerType.EPOCH, drop_last=False, seed=1)
    batches = list(loader)
    assert len(loader) == 3 and sorted(sum(batches, [])) == list(range(10))


@pytest.mark.parametrize(
    "sampler_type", [SamplerType.INFINITE, SamplerType.SHARDED_INFINITE, SamplerType.SHARDED_INFINITE_NEW]
)
def test_sampler_advance_resumes_the_same_order(world, sampler_type):
    world(0, 1)
    iterator = iter(_indices_loader(10, sampler_type=sampler_type, seed=3))
    uninterrupted = [next(iterator) for _ in range(7)]
    resumed_iterator = iter(_indices_loader(10, sampler_type=sampler_type, seed=3, sampler_advance=3 * 4))
    assert [next(resumed_iterator) for _ in range(4)] == uninterrupted[3:]


def test_loader_sampler_errors(world):
    world(0, 1)
    with pytest.raises(ValueError, match="sampler size > 0 is invalid for an infinite sampler"):
        _indices_loader(10, sampler_type=SamplerType.INFINITE, sampler_size=5)
    with pytest.raises(ValueError, match="sampler_advance > 0 needs a sampler type"):
        _indices_loader(10, sampler_type=None, sampler_advance=2)
    loader = _indices_loader(10, sampler_type=None, shuffle=False)
    assert list(loader)[0] == [0, 1, 2, 3]


def test_loader_yields_real_samples(bbu_sample, world):
    world(0, 1)
    to_tensor = lambda im: torch.from_numpy(np.asarray(im).copy())  # noqa: E731
    dataset = make_dataset(dataset_str=f"BBU:root={bbu_sample[0]}:split=TRAIN", transform=to_tensor)
    loader = make_data_loader(dataset=dataset, batch_size=5, num_workers=0, sampler_type=SamplerType.SHARDED_INFINITE)
    images, targets = next(iter(loader))
    assert images.shape == (5, 48, 64, 3) and images.dtype == torch.uint8
    assert set(targets.tolist()) <= {0, 1}


def test_worker_errors_name_the_image(bbu_copy):
    dataset = make_dataset(dataset_str=f"BBU:root={bbu_copy}:split=TEST", transform=lambda im: np.asarray(im).shape)
    path = dataset.get_image_path(2)
    os.remove(path)
    loader = make_data_loader(
        dataset=dataset, batch_size=3, num_workers=2, shuffle=False, sampler_type=SamplerType.EPOCH, drop_last=False
    )
    iterator = iter(loader)
    with pytest.raises(RuntimeError, match="can not read image for sample 2") as info:
        next(iterator)
    assert path in str(info.value)
