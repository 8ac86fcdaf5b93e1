"""In-process scoring of new photos with a saved probe, for a production line that decides device by device.

    predictor = Predictor("config.yaml", "teacher_checkpoint.pth", "eval/final/teacher/linear_classifier.pth")
    decision = predictor.score(["7/7-0.jpeg", "7/7-1.jpeg", "7/7-2.jpeg"], group_ids=["7", "7", "7"])
    decision["groups"][0]["positive"]   # the device's decision at the saved group threshold

The backbone is built once and checked against the classifier (`dinov2.eval.saved_probe.check_backbone`). Each call
decodes its photos with the classifier's eval transform, runs the backbone on them as one batch and applies the
classifier and its thresholds: the maths of `dinov2.eval.predict`, without its start-up, cache and files.
`python scripts/benchmark.py predictor` measures the latency of a call.
"""

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from dinov2.data.datasets import ImagePaths
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.eval.features import MAX_BLOCKS, FeatureSet, ProbeFeatureModel, backbone_fingerprint, split_feature_rows
from dinov2.eval.metrics import positive_scores
from dinov2.eval.reports import group_scores
from dinov2.eval.saved_probe import check_backbone, load_probe_classifier
from dinov2.eval.setup import build_model_for_eval, get_autocast_dtype
from dinov2.eval.utils import make_autocast_ctx
from dinov2.utils.config import get_cfg_from_args

logger = logging.getLogger("dinov2")


class Predictor:
    """A backbone and a probe classifier (`knn_classifier.pth`, `linear_classifier.pth` or
    `log_regression_classifier.json`) that score photos in this process; `opts` are config overrides (key=value).
    The backbone runs on CUDA when available, with the config's teacher dtype there, as the probes' extraction. The
    photos of a call are decoded and transformed by `decode_threads` threads (Pillow and torch release the GIL)."""

    def __init__(self, config_file: str, pretrained_weights: str, classifier: str, opts: Sequence[str] = (),
                 decode_threads: int = 4) -> None:
        if decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {decode_threads}")
        self.saved = load_probe_classifier(classifier)
        source = self.saved.source
        config = get_cfg_from_args(argparse.Namespace(config_file=config_file, opts=list(opts)))
        model = build_model_for_eval(config, pretrained_weights)
        check_backbone(self.saved, backbone_fingerprint(model), pretrained_weights)
        self.device = next(model.parameters()).device
        autocast_dtype = get_autocast_dtype(config) if self.device.type == "cuda" else torch.float32
        self.n_blocks = min(MAX_BLOCKS, int(model.n_blocks))
        self.feature_model = ProbeFeatureModel(model, self.n_blocks, make_autocast_ctx(autocast_dtype, self.device))
        self.transform = make_classification_eval_transform(**source["eval_transform"])
        self._decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="predictor-decode")

    def score(self, paths: Sequence[str], group_ids: Optional[Sequence[str]] = None) -> Dict[str, List[Dict]]:
        """Score the image files `paths` (one device's photos, or several devices' with their `group_ids`; default:
        all one device) -> {"images": [{path, group_id, score, positive}], "groups": [{group_id, n_images, score,
        positive}]}: positive-class scores and the decisions at the saved image and group thresholds. A file that
        cannot be read raises `ImageDecodeError` naming it."""
        if not paths:
            raise ValueError("no images to score")
        group_ids = ["device"] * len(paths) if group_ids is None else [str(g) for g in group_ids]
        if len(group_ids) != len(paths):
            raise ValueError(f"{len(paths)} images but {len(group_ids)} group ids")
        dataset = ImagePaths(paths=paths, transform=self.transform)
        batch = torch.stack([image for image, _ in self._decoders.map(dataset.__getitem__, range(len(dataset)))])
        with torch.inference_mode():
            rows = self.feature_model(batch.to(self.device)).float().cpu()
            cls_tokens, patch_mean = split_feature_rows(rows, self.n_blocks)
            features = FeatureSet("in-process", cls_tokens, patch_mean, np.full(len(paths), -1, dtype=np.int64),
                                  group_ids, [str(p) for p in paths], self.saved.class_names, self.saved.source)
            scores = positive_scores(self.saved.score(features))
        thresholds = self.saved.thresholds
        image_t, group_t = thresholds["image"]["threshold"], thresholds["group"]["threshold"]
        ids, _, g_scores, _ = group_scores(features, scores, thresholds)
        return {
            "images": [{"path": path, "group_id": gid, "score": float(score), "positive": bool(score >= image_t)}
                       for path, gid, score in zip(features.img_paths, group_ids, scores)],
            "groups": [{"group_id": gid, "n_images": group_ids.count(gid), "score": float(score),
                        "positive": bool(score >= group_t)} for gid, score in zip(ids, g_scores)],
        }
