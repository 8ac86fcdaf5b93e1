import numpy as np

from dinov2.data import DatasetWithEnumeratedTargets
from dinov2.data.datasets import BBUDataset


def test_enumerated_targets(bbu_sample):
    root, _ = bbu_sample
    base = BBUDataset(root=root, split="TEST", transform=lambda im: im.size)
    dataset = DatasetWithEnumeratedTargets(base)
    assert len(dataset) == len(base)
    assert dataset[5] == ((64, 48), (5, base.get_target(5)))
    assert dataset.get_target(3) == (3, base.get_target(3))
    np.testing.assert_array_equal(dataset.get_targets(), base.get_targets())
    assert dataset.get_image_relpath(2) == base.get_image_relpath(2)
    assert dataset.get_image_data(2) == base.get_image_data(2)


def test_none_target_becomes_the_index():
    dataset = DatasetWithEnumeratedTargets([("a", None), ("b", 7)])
    assert dataset[0] == ("a", (0, 0)) and dataset[1] == ("b", (1, 7))
