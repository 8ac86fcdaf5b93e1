"""In-process scoring of new photos with a saved probe, for a production line that decides device by device.

    predictor = Predictor("config.yaml", "teacher_checkpoint.pth", "eval/final/teacher/linear_classifier.pth")
    decision = predictor.score(["7/7-0.jpeg", "7/7-1.jpeg", "7/7-2.jpeg"], group_ids=["7", "7", "7"])
    decision["groups"][0]["positive"]   # the device's decision at the saved group threshold

The backbone is built once and checked against the classifier (`dinov2.eval.saved_probe.check_backbone`). Each call
decodes its photos with the classifier's eval transform, runs the backbone on them as one batch and applies the
classifier and its thresholds: the maths of `dinov2.eval.predict`, without its start-up, cache and files.
`OnnxPredictor("model.onnx")` does the same with a model exported by `dinov2.eval.export`, run by ONNX Runtime: it needs
neither the config, the weights nor the classifier file. `python scripts/benchmark.py predictor` measures the latency
of a call.
"""

import abc
import argparse
import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dinov2.data.datasets import EncodedImages, ImagePaths
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.eval.export import INPUT_NAME, read_metadata
from dinov2.eval.features import ProbeFeatureModel, backbone_fingerprint, split_feature_rows
from dinov2.eval.metrics import aggregate_groups, positive_scores
from dinov2.eval.saliency import Explainer, Explanation, map_peak
from dinov2.eval.saved_probe import check_backbone, load_probe_classifier
from dinov2.eval.setup import build_model_for_eval, get_autocast_dtype
from dinov2.eval.utils import make_autocast_ctx
from dinov2.utils.config import get_cfg_from_args

logger = logging.getLogger("dinov2")


class PhotoScorer(abc.ABC):
    """Decodes the photos of a call with an eval transform on `decode_threads` threads (Pillow and torch release the
    GIL), scores them as one batch (`_image_scores`) and decides images and groups at the saved thresholds."""

    def __init__(self, eval_transform: Dict[str, object], thresholds: Dict[str, object], decode_threads: int,
                 ood_threshold: Optional[float]) -> None:
        if decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {decode_threads}")
        self.thresholds = thresholds
        self.ood_threshold = ood_threshold  # None: the classifier has no model of unfamiliar images
        self.transform = make_classification_eval_transform(
            **{key: eval_transform[key] for key in ("resize_size", "crop_size", "draft_reducing_gap")})
        self._decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="predictor-decode")

    @abc.abstractmethod
    def _image_scores(self, batch: torch.Tensor) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Positive-class scores (N,) and unfamiliarity (N,) (None without a model of it, dinov2/eval/ood.py) of a
        batch of transformed images."""

    def score(self, paths: Sequence[str], group_ids: Optional[Sequence[str]] = None) -> Dict[str, List[Dict]]:
        """Score the image files `paths` (one device's photos, or several devices' with their `group_ids`; default:
        all one device) -> {"images": [{path, group_id, score, positive, unfamiliarity, unfamiliar}], "groups":
        [{group_id, n_images, score, positive, n_unfamiliar}]}: positive-class scores and the decisions at the saved
        image and group thresholds; the unfamiliarity of each photo and whether it is beyond the saved threshold
        (None without a model of it). A file that cannot be read raises `ImageDecodeError` naming it."""
        return self._score(ImagePaths(paths=paths, transform=self.transform), [str(p) for p in paths], group_ids)

    def score_encoded(self, images: Sequence[bytes], names: Optional[Sequence[str]] = None,
                      group_ids: Optional[Sequence[str]] = None) -> Dict[str, List[Dict]]:
        """`score` for encoded images in memory (JPEG, PNG, ... bytes); `names` (default "image <i>") stand in for
        the paths."""
        return self._score(*self._encoded_dataset(images, names), group_ids)

    def _encoded_dataset(self, images: Sequence[bytes], names: Optional[Sequence[str]]) -> Tuple[EncodedImages,
                                                                                              List[str]]:
        names = [f"image {i}" for i in range(len(images))] if names is None else [str(n) for n in names]
        return EncodedImages(images=images, names=names, transform=self.transform), names

    def _score(self, dataset, names: List[str], group_ids: Optional[Sequence[str]]) -> Dict[str, List[Dict]]:
        group_ids = self._check_group_ids(dataset, group_ids)
        scores, unfamiliarity = self._image_scores(self._decode(dataset))
        return self._decide(names, group_ids, scores, unfamiliarity)

    @staticmethod
    def _check_group_ids(dataset, group_ids: Optional[Sequence[str]]) -> List[str]:
        if not len(dataset):
            raise ValueError("no images to score")
        group_ids = ["device"] * len(dataset) if group_ids is None else [str(g) for g in group_ids]
        if len(group_ids) != len(dataset):
            raise ValueError(f"{len(dataset)} images but {len(group_ids)} group ids")
        return group_ids

    def _decode(self, dataset) -> torch.Tensor:
        """The transformed images of a dataset as one batch, decoded on the decode threads."""
        return torch.stack([image for image, _ in self._decoders.map(dataset.__getitem__, range(len(dataset)))])

    def _decide(self, names: List[str], group_ids: List[str], scores: np.ndarray,
                unfamiliarity: Optional[np.ndarray]) -> Dict[str, List[Dict]]:
        """`score`'s result from the images' positive-class scores and unfamiliarity."""
        image_t, group_t = self.thresholds["image"]["threshold"], self.thresholds["group"]["threshold"]
        ids, _, g_scores, _ = aggregate_groups(group_ids, np.zeros(len(names), dtype=np.int64), scores,
                                               self.thresholds["group_aggregation"], image_t)
        if unfamiliarity is None:
            ood = [(None, None)] * len(names)
        else:
            ood = [(float(u), bool(u > self.ood_threshold)) for u in unfamiliarity]
        images = [{"path": name, "group_id": gid, "score": float(score), "positive": bool(score >= image_t),
                   "unfamiliarity": u, "unfamiliar": flag}
                  for name, gid, score, (u, flag) in zip(names, group_ids, scores, ood)]
        groups = [{"group_id": gid, "n_images": group_ids.count(gid), "score": float(score),
                   "positive": bool(score >= group_t),
                   "n_unfamiliar": None if unfamiliarity is None else sum(
                       bool(image["unfamiliar"]) for image in images if image["group_id"] == gid)}
                  for gid, score in zip(ids, g_scores)]
        return {"images": images, "groups": groups}


class Predictor(PhotoScorer):
    """A backbone and a probe classifier (`knn_classifier.pth`, `linear_classifier.pth` or
    `log_regression_classifier.json`) that score photos in this process; `opts` are config overrides (key=value).
    The backbone runs on CUDA when available, with the config's teacher dtype there, as the probes' extraction."""

    def __init__(self, config_file: str, pretrained_weights: str, classifier: str, opts: Sequence[str] = (),
                 decode_threads: int = 4) -> None:
        self.saved = load_probe_classifier(classifier)
        self.ood = self.saved.ood
        super().__init__(self.saved.source["eval_transform"], self.saved.thresholds, decode_threads,
                         None if self.ood is None else float(self.ood.threshold))
        config = get_cfg_from_args(argparse.Namespace(config_file=config_file, opts=list(opts)))
        model = build_model_for_eval(config, pretrained_weights)
        check_backbone(self.saved, backbone_fingerprint(model), pretrained_weights, config.student)
        self.device = next(model.parameters()).device
        autocast_dtype = get_autocast_dtype(config) if self.device.type == "cuda" else torch.float32
        self.n_blocks = self.saved.head.n_blocks
        self.backbone, self.autocast_ctx = model, make_autocast_ctx(autocast_dtype, self.device)
        self.feature_model = ProbeFeatureModel(model, self.n_blocks, self.autocast_ctx)
        self.explainer = Explainer(model, copy.deepcopy(self.saved.head).to(self.device), self.autocast_ctx)
        self.patch_size = int(model.patch_size)

    def _image_scores(self, batch: torch.Tensor) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        with torch.inference_mode():
            rows = self.feature_model(batch.to(self.device)).float().cpu()
            cls, patch_mean = split_feature_rows(rows, self.n_blocks)
            unfamiliarity = None if self.ood is None else self.ood.unfamiliarity(cls).numpy()
        return positive_scores(self.saved.score_tokens(cls, patch_mean)), unfamiliarity

    def patch_tokens(self, paths: Sequence[str], batch_size: int = 32) -> Iterator[torch.Tensor]:
        """The last block's normalised patch tokens (n, P, D) float32 of image files, `batch_size` photos at a time:
        `Explanation.patch_tokens` of the same photos, without gradients (for `dinov2.eval.saliency.PatchBank`)."""
        dtype = next(self.backbone.parameters()).dtype
        for start in range(0, len(paths), batch_size):
            batch = self._decode(ImagePaths(paths=paths[start : start + batch_size], transform=self.transform))
            with torch.inference_mode(), self.autocast_ctx():
                tokens = self.backbone.forward_features(batch.to(self.device, dtype))["x_norm_patchtokens"]
            yield tokens.float().cpu()

    def explain(self, paths: Sequence[str], group_ids: Optional[Sequence[str]] = None
                ) -> Tuple[Dict[str, List[Dict]], Explanation, torch.Tensor]:
        """`score` of image files with the maps that explain each image's score (`dinov2.eval.saliency`): returns
        `score`'s result, whose images also get the patch of most positive `evidence` (`map_peak`), the
        `Explanation` of the images (scores from the same forward pass) and the transformed images (N, 3, S, S)."""
        return self._explain(ImagePaths(paths=paths, transform=self.transform), [str(p) for p in paths], group_ids)

    def explain_encoded(self, images: Sequence[bytes], names: Optional[Sequence[str]] = None,
                        group_ids: Optional[Sequence[str]] = None
                        ) -> Tuple[Dict[str, List[Dict]], Explanation, torch.Tensor]:
        """`explain` for encoded images in memory, named as in `score_encoded`."""
        return self._explain(*self._encoded_dataset(images, names), group_ids)

    def _explain(self, dataset, names: List[str], group_ids: Optional[Sequence[str]]
                 ) -> Tuple[Dict[str, List[Dict]], Explanation, torch.Tensor]:
        group_ids = self._check_group_ids(dataset, group_ids)
        batch = self._decode(dataset)
        explanation = self.explainer(batch.to(self.device))
        unfamiliarity = None if self.ood is None else self.ood.unfamiliarity(explanation.cls).numpy()
        result = self._decide(names, group_ids, positive_scores(explanation.probabilities), unfamiliarity)
        for image, evidence in zip(result["images"], explanation.evidence):
            image["evidence_peak"] = map_peak(evidence, self.patch_size)
        return result, explanation, batch


class OnnxPredictor(PhotoScorer):
    """A model exported by `dinov2.eval.export` (backbone, classifier and image threshold in one ONNX graph; eval
    transform, group threshold and aggregation in its metadata), run by ONNX Runtime with `providers` (default: CUDA
    where available, else CPU)."""

    def __init__(self, model_path: str, decode_threads: int = 4, providers: Optional[Sequence[str]] = None) -> None:
        import onnxruntime

        self.metadata = read_metadata(model_path)
        ood = self.metadata["ood"]
        super().__init__(self.metadata["eval_transform"], self.metadata["thresholds"], decode_threads,
                         None if ood is None else ood["threshold"])
        if providers is None:
            providers = [p for p in onnxruntime.get_available_providers()
                         if p in ("CUDAExecutionProvider", "CPUExecutionProvider")]
        self.session = onnxruntime.InferenceSession(model_path, providers=list(providers))
        self.class_names = self.metadata["class_names"]

    def _image_scores(self, batch: torch.Tensor) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        if self.ood_threshold is None:
            (scores,) = self.session.run(["score"], {INPUT_NAME: batch.numpy()})
            return scores, None
        scores, unfamiliarity = self.session.run(["score", "unfamiliarity"], {INPUT_NAME: batch.numpy()})
        return scores, unfamiliarity
