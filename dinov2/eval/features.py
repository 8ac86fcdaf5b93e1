"""Frozen-backbone features for the probes, extracted once per split and cached on disk.

One pass over a split stores, per image, the normalised class tokens of the last `n_blocks` (<= 4) blocks and the mean
patch token of the last block. Every probe input derives from these: k-NN and log-reg use the last class token (the
backbone output), the linear grid the concatenations of upstream's `create_linear_input`. The cache file
`<features-dir>/<tag>_<key>.pt` is keyed by a hash of the weights (the SHA-256 of the state dict as loaded),
the dataset string and its image list and labels, the model config, the transform, the number of blocks and the
inference dtype, so the probes of one invocation (and later invocations with the same inputs) share one extraction.

Every `FeatureSet` also carries its `source`: the SHA-256 of the backbone's state dict and the eval-transform settings.
The probes save it with their classifiers, so that `dinov2.eval.predict` extracts new images the same way and refuses
a classifier trained on another backbone.
"""

import argparse
import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

import dinov2.distributed as distributed
from dinov2.data import make_dataset
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.eval.setup import RANDOM_WEIGHTS, check_qc_arguments, setup_eval_model
from dinov2.eval.utils import ModelWithIntermediateLayers, extract_features, make_autocast_ctx
from dinov2.utils.utils import atomic_write

logger = logging.getLogger("dinov2")

CACHE_FORMAT_VERSION = 1
MAX_BLOCKS = 4
HELD_OUT_FRACTION = 0.1  # of the groups of each label, see held_out_groups
# Number of extractions (cache misses) per dataset string in this process: the cache tests read it.
EXTRACTION_COUNTS: Counter = Counter()


def split_tag(dataset_str: str) -> str:
    """Short file-name tag of a dataset string: the stem of its annotation file, else its split
    ("BBU:root=R:split=TEST" -> "test"), else its name."""
    name, *tokens = dataset_str.split(":")
    params = dict(token.split("=", 1) for token in tokens if "=" in token)
    if "annotation_file" in params:
        tag = os.path.splitext(os.path.basename(params["annotation_file"]))[0]
    elif "split" in params:
        tag = params["split"]
    else:
        tag = name
    return re.sub(r"[^a-z0-9_]+", "_", tag.lower()).strip("_") or "dataset"


@dataclass
class FeatureSet:
    """Features and metadata of one split, in dataset order."""

    dataset_str: str
    cls: torch.Tensor  # (N, n_blocks, D): normalised class tokens, oldest block first; [:, -1] = backbone output
    patch_mean: torch.Tensor  # (N, D): mean patch token of the last block
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    group_ids: List[str]
    img_paths: List[str]
    class_names: List[str]
    source: Dict[str, object] = field(default_factory=dict)  # backbone fingerprint + eval transform (see above)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def tag(self) -> str:
        return split_tag(self.dataset_str)

    @property
    def n_blocks(self) -> int:
        return self.cls.shape[1]

    def require_labels(self) -> None:
        """Probes need a label for every image: raise naming the dataset if some are unlabelled (-1)."""
        unlabelled = int((self.labels < 0).sum())
        if unlabelled:
            raise ValueError(
                f"{self.dataset_str}: {unlabelled} of {len(self)} images are unlabelled (gt_label -1 or missing); "
                "probe evaluation needs a label for every image"
            )

    def require_classes_of(self, train: "FeatureSet") -> None:
        """Probes trained on `train` score this split: raise naming both datasets if the class lists differ."""
        if self.class_names != train.class_names:
            raise ValueError(
                f"{self.dataset_str} has classes {self.class_names} but the training dataset {train.dataset_str} has "
                f"{train.class_names}; the probes need the same class list (metainfo.classes) in every split"
            )

    def subset(self, indices: np.ndarray) -> "FeatureSet":
        """The images at `indices` (same dataset string; used for held-out parts of a training split)."""
        indices = np.asarray(indices, dtype=np.int64)
        return FeatureSet(
            dataset_str=self.dataset_str,
            cls=self.cls[torch.from_numpy(indices)],
            patch_mean=self.patch_mean[torch.from_numpy(indices)],
            labels=self.labels[indices],
            group_ids=[self.group_ids[i] for i in indices],
            img_paths=[self.img_paths[i] for i in indices],
            class_names=self.class_names,
            source=self.source,
        )

    def normalized_cls(self) -> torch.Tensor:
        """L2-normalised backbone output (CLS token): the k-NN and log-reg feature."""
        return F.normalize(self.cls[:, -1], dim=1, p=2)

    def linear_input(self, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
        """Upstream linear-probe input: concatenated class tokens of the last n blocks (+ mean patch token)."""
        if not 1 <= n_last_blocks <= self.n_blocks:
            raise ValueError(f"n_last_blocks={n_last_blocks} but {self.n_blocks} blocks were extracted")
        return linear_input(self.cls, self.patch_mean, n_last_blocks, avgpool)


def linear_input(cls: torch.Tensor, patch_mean: torch.Tensor, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """Class tokens (N, n, D) of the last `n_last_blocks` blocks flattened (+ the mean patch token (N, D)), float32."""
    parts = [cls[:, -n_last_blocks:].flatten(1)]
    if avgpool:
        parts.append(patch_mean)
    return torch.cat(parts, dim=1).float()


def held_out_groups(train: FeatureSet, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices) of a labelled split: a seeded random HELD_OUT_FRACTION of the groups of each
    group label (group label = max image label), at least one per label when the label has two or more groups, so
    that both sides see every label where possible and no group is on both sides."""
    groups = np.asarray(train.group_ids)
    group_label: Dict[str, int] = {}
    for gid, label in zip(groups, train.labels):
        group_label[gid] = max(group_label.get(gid, label), int(label))
    rng = np.random.default_rng(seed)
    held: List[str] = []
    for label in sorted(set(group_label.values())):
        members = sorted(g for g, lab in group_label.items() if lab == label)
        if len(members) >= 2:
            n_held = min(len(members) - 1, max(1, int(round(HELD_OUT_FRACTION * len(members)))))
            held += rng.choice(members, size=n_held, replace=False).tolist()
    mask = np.isin(groups, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


class ProbeFeatureModel(nn.Module):
    """Backbone -> [class tokens of the last n blocks..., mean patch token of the last block] as one (B, (n+1)D) in
    float32.

    The images are cast to the backbone's parameter dtype: a backbone cast to bf16/fp16 (`--cast-weights`) runs
    wholly in that dtype, without autocast."""

    def __init__(self, backbone: nn.Module, n_blocks: int, autocast_ctx):
        super().__init__()
        self.layers = ModelWithIntermediateLayers(backbone, n_blocks, autocast_ctx)
        self.input_dtype = next(backbone.parameters()).dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.layers(images.to(self.input_dtype))
        class_tokens = [class_token.float() for _, class_token in outputs]
        return torch.cat([*class_tokens, outputs[-1][0].float().mean(dim=1)], dim=1)


def split_feature_rows(features: torch.Tensor, n_blocks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`ProbeFeatureModel` rows (N, (n_blocks + 1) * D) -> class tokens (N, n_blocks, D), mean patch token (N, D)."""
    dim = features.shape[1] // (n_blocks + 1)
    return features[:, : n_blocks * dim].reshape(features.shape[0], n_blocks, dim), features[:, n_blocks * dim :]


def backbone_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a backbone's state dict (names, dtypes, shapes and values, in name order): identifies the weights
    wherever the file was copied to, unlike its path."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def feature_source(
    model: nn.Module, pretrained_weights: str, config: DictConfig, eval_transform: Dict[str, object]
) -> Dict[str, object]:
    """The `source` of the features `model` extracts with the eval transform of `make_classification_eval_transform(
    **eval_transform)`: saved with the probes' classifiers (see the module docstring)."""
    return {
        "backbone_sha256": backbone_fingerprint(model),
        "pretrained_weights": pretrained_weights,
        "model": OmegaConf.to_container(config.student, resolve=True),
        "eval_transform": dict(eval_transform),
    }


def weights_identity(pretrained_weights: str, seed: int) -> Dict[str, object]:
    """What identifies the weights for the cache: the seed of a random init, else path + size + mtime (or the URL)."""
    if pretrained_weights == RANDOM_WEIGHTS:
        return {"random_seed": seed}
    if os.path.isfile(pretrained_weights):
        stat = os.stat(pretrained_weights)
        return {"path": os.path.abspath(pretrained_weights), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"url": pretrained_weights}


class FeatureStore:
    """Extracts (or loads from the cache) the features of dataset strings for one backbone and transform."""

    def __init__(
        self,
        model: nn.Module,
        autocast_dtype: torch.dtype,
        config: DictConfig,
        pretrained_weights: str,
        transform,
        cache_dir: str,
        batch_size: int,
        num_workers: int,
        source: Optional[Dict[str, object]] = None,
        stat_images: bool = False,
    ):
        self.model = model
        self.source = source or {}
        self.stat_images = stat_images
        self.n_blocks = min(MAX_BLOCKS, int(model.n_blocks))
        self.embed_dim = int(model.embed_dim)
        parameter = next(model.parameters())
        cast = parameter.dtype != torch.float32  # a backbone cast to bf16/fp16 (`--cast-weights`): no autocast
        dtype = parameter.dtype if cast else autocast_dtype
        autocast_ctx = make_autocast_ctx(torch.float32 if cast else dtype, parameter.device)
        self.feature_model = ProbeFeatureModel(model, self.n_blocks, autocast_ctx)
        self.transform = transform
        self.cache_dir = cache_dir
        self.batch_size, self.num_workers = batch_size, num_workers
        self.base_fields = {
            "version": CACHE_FORMAT_VERSION,
            # the weights' state-dict fingerprint when known (a file copied, restored or rewritten with the same
            # size and time is still told apart, a copy of the same weights still hits), else path, size and time
            "weights": ({"backbone_sha256": self.source["backbone_sha256"]} if "backbone_sha256" in self.source
                        else weights_identity(pretrained_weights, int(config.train.seed))),
            "model": OmegaConf.to_container(config.student, resolve=True),
            "global_crops_size": int(config.crops.global_crops_size),
            "transform": repr(transform),
            "n_blocks": self.n_blocks,
            "dtype": str(dtype),
            **({"cast_weights": True} if cast else {}),
        }

    def cache_fields(self, dataset_str: str, dataset: Dataset) -> Dict[str, object]:
        """Everything the features of `dataset` depend on, incl. a digest of its image list and labels (so an edited
        annotation file gets new features). With `stat_images` the digest of a dataset of image files (BBU,
        ImageFolder, ImageNet; not tarball members) also covers each file's size and modification time, so that
        images overwritten under the same names are extracted again (one `stat` per image: `dinov2.eval.predict` uses
        it; the probes do not)."""
        targets = dataset.get_targets() if hasattr(dataset, "get_targets") else None
        listing = [dataset_image_paths(dataset), None if targets is None else np.asarray(targets).tolist()]
        if self.stat_images and hasattr(dataset, "get_image_relpath"):
            listing.append([_file_stamp(dataset.get_image_path(i)) for i in range(len(dataset))])
        content = json.dumps(listing)
        return {**self.base_fields, "dataset": dataset_str, "content": hashlib.sha256(content.encode()).hexdigest()}

    def cache_path(self, dataset_str: str, fields: Dict[str, object]) -> str:
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
        return os.path.join(self.cache_dir, f"{split_tag(dataset_str)}_{key}.pt")

    def _load(self, path: str, fields: Dict[str, object], n: int):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("fields") != fields or len(payload["labels"]) != n:
            raise ValueError(f"feature cache {path} does not match {fields['dataset']} ({n} images); delete it")
        logger.info(f"Loaded cached features of {fields['dataset']} from {path}")
        return payload["features"], payload["labels"]

    def _extract(self, path: str, fields: Dict[str, object], dataset, dataset_str: str):
        EXTRACTION_COUNTS[dataset_str] += 1
        dim = (self.n_blocks + 1) * self.embed_dim
        if len(dataset) == 0:
            logger.warning(f"{dataset_str} is empty: no features to extract")
            features, labels = torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
        else:
            logger.info(f"Extracting features of {dataset_str} ({len(dataset)} images)")
            features, labels = extract_features(
                self.feature_model, dataset, self.batch_size, self.num_workers, gather_on_cpu=True
            )
        if distributed.is_main_process():
            os.makedirs(self.cache_dir, exist_ok=True)
            payload = {"fields": fields, "features": features, "labels": labels}
            atomic_write(path, lambda f: torch.save(payload, f))
        return features, labels

    def get(self, dataset_str: str) -> FeatureSet:
        dataset = make_dataset(dataset_str=dataset_str, transform=self.transform)
        fields = self.cache_fields(dataset_str, dataset)
        path = self.cache_path(dataset_str, fields)
        hit = torch.tensor([int(os.path.isfile(path))], device=distributed.collective_device())
        if distributed.is_multi_process():
            torch.distributed.all_reduce(hit, op=torch.distributed.ReduceOp.MIN)  # every rank takes the same branch
        if hit.item():
            features, labels = self._load(path, fields, len(dataset))
        else:
            features, labels = self._extract(path, fields, dataset, dataset_str)
        distributed.barrier()
        cls_tokens, patch_mean = split_feature_rows(features, self.n_blocks)
        return FeatureSet(
            dataset_str=dataset_str,
            cls=cls_tokens,
            patch_mean=patch_mean,
            labels=labels.numpy().astype(np.int64),
            group_ids=dataset_group_ids(dataset, dataset_str),
            img_paths=dataset_image_paths(dataset),
            class_names=_class_names(dataset, labels),
            source=self.source,
        )


def setup_feature_store(args: argparse.Namespace, stat_images: bool = False) -> FeatureStore:
    """Start of every probe CLI: check the QC options, set up the run and the backbone (`setup_eval_model`, cast
    with `--cast-weights`, blocks compiled with `--compile`), and return its feature store (eval transform from
    `--resize-size/--crop-size/--draft-reducing-gap`, cache in `--features-dir`, see `FeatureStore.cache_fields` for
    `stat_images`)."""
    check_qc_arguments(args)
    model, autocast_dtype, config = setup_eval_model(args)
    eval_transform = {"resize_size": args.resize_size, "crop_size": args.crop_size,
                      "draft_reducing_gap": args.draft_reducing_gap}
    source = feature_source(model, args.pretrained_weights, config, eval_transform)  # before any cast
    if args.cast_weights:
        model.to(autocast_dtype)  # float32 on the CPU: nothing changes there
    if args.compile:
        model.compile_blocks(backend=args.compile)
    transform = make_classification_eval_transform(**eval_transform)
    cache_dir = args.features_dir or os.path.join(args.output_dir, "features")
    return FeatureStore(model, autocast_dtype, config, args.pretrained_weights, transform, cache_dir, args.batch_size,
                        args.num_workers, source, stat_images)


def _file_stamp(path: str) -> List[int]:
    """[size, mtime_ns] of an image file; raises naming it when it is missing."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    return [stat.st_size, stat.st_mtime_ns]


def dataset_group_ids(dataset, dataset_str: str) -> List[str]:
    """Group (device) ids of a dataset's images as strings; each image its own group in a dataset without them."""
    if hasattr(dataset, "get_group_ids"):
        return [str(g) for g in dataset.get_group_ids()]
    logger.info(f"{dataset_str} has no group ids: every image is its own group")
    return [str(i) for i in range(len(dataset))]


def dataset_image_paths(dataset) -> List[str]:
    """Image names of a dataset: paths relative to its root where it has them, else paths, else indices."""
    if hasattr(dataset, "get_image_relpath"):
        return [dataset.get_image_relpath(i) for i in range(len(dataset))]
    if hasattr(dataset, "get_image_path"):
        return [dataset.get_image_path(i) for i in range(len(dataset))]
    return [str(i) for i in range(len(dataset))]


def _class_names(dataset, labels: torch.Tensor) -> List[str]:
    names = getattr(dataset, "class_names", None)
    if names:
        return list(names)
    num_classes = max(2, int(labels.max().item()) + 1 if len(labels) else 2)
    return [str(c) for c in range(num_classes)]
