"""Evaluation helpers shared by the probes: feature-model wrappers, `evaluate` and distributed `extract_features`."""

import contextlib
import functools
import logging
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import dinov2.distributed as distributed
from dinov2.data import DatasetWithEnumeratedTargets
from dinov2.logging import MetricLogger

logger = logging.getLogger("dinov2")

T = TypeVar("T")


def run_on_main_process(probe: Callable[..., T], *args: Any) -> Optional[T]:
    """`probe(*args)` on the main process only (None on the other ranks), then a barrier, so that no rank moves on
    (or exits) before the main process has written the results."""
    results = probe(*args) if distributed.is_main_process() else None
    distributed.barrier()
    return results


def make_autocast_ctx(
    autocast_dtype: torch.dtype, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """Autocast context factory; a no-op for float32 (always the case on CPU, see `setup_and_build_model`)."""
    if autocast_dtype == torch.float32:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=autocast_dtype)


class ModelWithNormalize(nn.Module):
    """L2-normalised output (the CLS token of the backbone): the k-NN feature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(samples), dim=1, p=2)


class ModelWithIntermediateLayers(nn.Module):
    """Frozen backbone -> `(patch_tokens, class_token)` of its last `n_last_blocks` blocks (final norm applied)."""

    def __init__(self, feature_model: nn.Module, n_last_blocks: int, autocast_ctx: Callable):
        super().__init__()
        self.feature_model = feature_model
        self.feature_model.eval()
        self.n_last_blocks = n_last_blocks
        self.autocast_ctx = autocast_ctx

    def forward(self, images: torch.Tensor) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
        with torch.inference_mode():
            with self.autocast_ctx():
                return self.feature_model.get_intermediate_layers(
                    images, self.n_last_blocks, return_class_token=True
                )


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data_loader: Iterable,
    postprocessors: Dict[str, nn.Module],
    metrics: Dict[str, Any],
    device: torch.device,
    criterion: Optional[nn.Module] = None,
) -> Tuple[Dict[str, float], Dict[str, Dict[str, torch.Tensor]]]:
    """Run `model` over `data_loader`; each postprocessor maps (outputs, targets) to its metric collection's inputs.

    Returns (averaged logged values, {metric name: computed metrics}).
    """
    model.eval()
    if criterion is not None:
        criterion.eval()
    for metric in metrics.values():
        metric.reset()
    metric_logger = MetricLogger(delimiter="  ")
    for samples, targets in metric_logger.log_every(data_loader, 10, "Test:"):
        outputs = model(samples.to(device))
        targets = targets.to(device)
        if criterion is not None:
            metric_logger.update(loss=criterion(outputs, targets).item())
        for name, metric in metrics.items():
            metric.update(**postprocessors[name](outputs, targets))
    metric_logger.synchronize_between_processes()
    logger.info(f"Averaged stats: {metric_logger}")
    stats = {name: metric.compute() for name, metric in metrics.items()}
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}, stats


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of all ranks along dim 0 (rank order)."""
    parts = [torch.empty_like(tensor) for _ in range(distributed.get_global_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def extract_features(
    model: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, gather_on_cpu: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 and labels (N,) in dataset order; label -1 marks an unlabelled sample.

    Rank r processes samples r, r + W, ... (no padding, no duplicates); with a process group the shards are
    all-gathered so every rank returns the full arrays. Works with world size 1 and no process group. Results are
    on CPU when `gather_on_cpu` or the model is on CPU, else on the model's device. The model runs in inference mode,
    the gather outside it (torch 2.4's all_gather fails on tensors made in inference mode).
    """
    rank, world_size = distributed.get_global_rank(), distributed.get_global_size()
    device = _model_device(model)
    n = len(dataset)
    shard = Subset(DatasetWithEnumeratedTargets(dataset), range(rank, n, world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, shuffle=False, drop_last=False,
                        pin_memory=device.type == "cuda")  # else each batch's copy to the GPU blocks the host
    indices, features, labels = [], [], []
    metric_logger = MetricLogger(delimiter="  ")
    for samples, (index, target) in metric_logger.log_every(loader, 10, "Extracting features:"):
        with torch.inference_mode():
            features.append(model(samples.to(device, non_blocking=True)).float())
        indices.append(torch.as_tensor(index, device=device).long())
        labels.append(torch.as_tensor(target, device=device).long())
    dim = features[0].shape[1] if features else 0
    if world_size > 1:
        gather_device = distributed.collective_device()
        shard_size = (n + world_size - 1) // world_size
        dims = torch.tensor([dim], device=gather_device)
        torch.distributed.all_reduce(dims, op=torch.distributed.ReduceOp.MAX)
        dim = int(dims.item())
        local_index = torch.full((shard_size,), -1, dtype=torch.long, device=gather_device)
        local_features = torch.zeros(shard_size, dim, device=gather_device)
        local_labels = torch.full((shard_size,), -1, dtype=torch.long, device=gather_device)
        count = len(shard)
        if count:
            local_index[:count] = torch.cat(indices).to(gather_device)
            local_features[:count] = torch.cat(features).to(gather_device)
            local_labels[:count] = torch.cat(labels).to(gather_device)
        index_all, features_all, labels_all = map(_all_gather, (local_index, local_features, local_labels))
        valid = index_all >= 0
        index_all, features_all, labels_all = index_all[valid], features_all[valid], labels_all[valid]
    else:
        index_all = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
        features_all = torch.cat(features) if features else torch.zeros(0, dim, device=device)
        labels_all = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    out_device = torch.device("cpu") if gather_on_cpu else device
    result_features = torch.zeros(n, dim, device=out_device)
    result_labels = torch.full((n,), -1, dtype=torch.long, device=out_device)
    result_features[index_all.to(out_device)] = features_all.to(out_device)
    result_labels[index_all.to(out_device)] = labels_all.to(out_device)
    if len(index_all) != n:
        raise RuntimeError(f"feature extraction returned {len(index_all)} of {n} samples")
    logger.info(f"Features shape: {tuple(result_features.shape)}, labels shape: {tuple(result_labels.shape)}")
    return result_features, result_labels
