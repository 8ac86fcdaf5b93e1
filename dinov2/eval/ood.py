"""Unfamiliar images: new photos unlike the probe's training photos, whose scores should not be trusted.

A probe decides well only on photos like those it was trained on; a moved camera, new lighting, a dirty lens or a new
device variant give features the classifier has never seen, and it still answers. Every probe therefore also saves
a model of its training features in its classifier (`"ood"`): the mean and the top `--ood-components` principal
directions of the L2-normalised class tokens. A photo's *unfamiliarity* is the length of the part of its feature
that those directions do not explain (the PCA residual); it is *unfamiliar* above the `--ood-quantile` (default 0.99)
quantile of the unfamiliarity of held-out training photos: the directions are fitted on the other 90% of the training
groups, so about 1% of photos like the training ones are flagged, and a rising rate means the line has drifted.

`dinov2.eval.predict` counts and lists them, the `Predictor`, the ONNX export and the scoring service report them
per image, and the service's /stats gives the rate over the last images.
"""

import logging
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinov2.eval.features import FeatureSet, held_out_groups

logger = logging.getLogger("dinov2")

HOLD_OUT_SEED = 0  # the same held-out groups for the three probes


class OodHead(nn.Module):
    """Class tokens (N, n, D) -> (unfamiliarity (N,) float64, unfamiliar (N,) bool) of a saved `"ood"` model."""

    def __init__(self, params: Dict[str, object]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(params["mean"], dtype=torch.float64))
        self.register_buffer("components", torch.tensor(params["components"], dtype=torch.float64).reshape(
            -1, len(params["mean"])))
        self.register_buffer("threshold", torch.tensor(float(params["threshold"]), dtype=torch.float64))

    def unfamiliarity(self, cls: torch.Tensor) -> torch.Tensor:
        centred = F.normalize(cls[:, -1], dim=1, p=2).double() - self.mean
        residual = centred - (centred @ self.components.T) @ self.components
        return torch.sqrt((residual * residual).sum(dim=1))

    def forward(self, cls: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        unfamiliarity = self.unfamiliarity(cls)
        return unfamiliarity, unfamiliarity > self.threshold


def fit_ood(train: FeatureSet, n_components: int, quantile: float) -> Optional[Dict[str, object]]:
    """The `"ood"` model of a probe's training split (JSON-able), or None with a warning when the split has no group
    to hold out (a single group per label)."""
    if n_components < 0 or not 0.0 < quantile <= 1.0:
        raise ValueError(f"ood components must be >= 0 and the quantile in (0, 1], got {n_components}, {quantile}")
    fit_idx, held_idx = held_out_groups(train, HOLD_OUT_SEED)
    if len(held_idx) == 0 or len(fit_idx) == 0:
        logger.warning(f"{train.dataset_str}: no training groups to hold out, so no model of unfamiliar images is "
                       "saved with the classifier (it needs two groups of one label)")
        return None
    x = train.normalized_cls().double()
    fit = x[torch.from_numpy(fit_idx)]
    mean = fit.mean(dim=0)
    rank = min(n_components, len(fit_idx) - 1, x.shape[1])
    _, _, vh = torch.linalg.svd(fit - mean, full_matrices=False)
    params = {"method": "pca_residual", "n_components": rank, "quantile": quantile, "mean": mean.tolist(),
              "components": vh[:rank].tolist(), "threshold": float("inf")}
    held = OodHead(params).unfamiliarity(train.cls[torch.from_numpy(held_idx)]).numpy()
    params["threshold"] = float(np.quantile(held, quantile))
    n_held_groups = len(set(np.asarray(train.group_ids)[held_idx]))
    params["fitted_on"] = f"{train.dataset_str} ({len(fit_idx)} images)"
    params["threshold_on"] = f"{train.dataset_str} (held-out {n_held_groups} groups, {len(held_idx)} images)"
    logger.info(f"unfamiliar images: {rank} principal directions of {len(fit_idx)} training images; threshold "
                f"{params['threshold']:.4g} = {quantile} quantile of {len(held_idx)} held-out images")
    return params


def ood_summary(params: Optional[Dict[str, object]]) -> Optional[Dict[str, object]]:
    """The saved `"ood"` model without its arrays (for metadata and reports)."""
    if params is None:
        return None
    return {key: value for key, value in params.items() if key not in ("mean", "components")}
