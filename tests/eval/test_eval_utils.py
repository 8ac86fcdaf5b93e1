"""dinov2.eval.utils: extract_features order/labels (world size 1, no process group), wrappers, evaluate."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dinov2.eval.metrics import MetricType, build_metric
from dinov2.eval.utils import ModelWithNormalize, evaluate, extract_features


class IndexDataset(Dataset):
    """Sample i = (tensor [i, 2i], label), label -1 for every third (unlabelled) sample."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, index: int):
        return torch.tensor([float(index), 2.0 * index]), (-1 if index % 3 == 2 else index % 2)


def test_extract_features_keeps_dataset_order_and_unlabelled_targets():
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    features, labels = extract_features(model, IndexDataset(), batch_size=3, num_workers=0)
    inputs = torch.stack([IndexDataset()[i][0] for i in range(7)])
    assert features.shape == (7, 3) and torch.allclose(features, model(inputs).detach())
    assert labels.tolist() == [0, 1, -1, 1, 0, -1, 0]


def test_model_with_normalize_gives_unit_rows():
    model = ModelWithNormalize(nn.Linear(4, 5))
    out = model(torch.randn(6, 4))
    assert torch.allclose(out.norm(dim=1), torch.ones(6), atol=1e-6)


def test_evaluate_computes_top1():
    model = nn.Linear(2, 2, bias=False)
    model.weight.data = torch.eye(2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.9], [0.7, 0.1]])
    y = torch.tensor([0, 1, 0, 1])
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    metrics = {"logits": build_metric(MetricType.MEAN_ACCURACY, num_classes=2)}
    postprocessors = {"logits": lambda outputs, targets: {"preds": outputs, "target": targets}}
    criterion = nn.CrossEntropyLoss()
    stats, results = evaluate(model, loader, postprocessors, metrics, torch.device("cpu"), criterion=criterion)
    assert results["logits"]["top-1"].item() == pytest.approx(0.5)
    assert "loss" in stats
