"""k-NN probe on frozen features (upstream semantics) with QC metrics at image and group level.

Features are the L2-normalised CLS tokens; a query's class probabilities are the votes of its k most cosine-similar
training images weighted by softmax(similarity / temperature). Each k of `--nb_knn` is evaluated (k larger than the
training set is clipped, with a warning).

The k reported as `settings.k` and the operating thresholds are chosen WITHOUT looking at the evaluated split: on
leave-group-out k-NN scores of the training set (each training image voted on by the training images of the other
groups, so the other photos of the same device cannot leak its label).

`knn_classifier.pth` keeps what scoring new images takes (`dinov2.eval.predict`): the training features and labels
(N x D float32), k, the temperature, the thresholds and the features' source.
"""

import argparse
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dinov2.distributed as distributed
from dinov2.eval.features import FeatureSet, setup_feature_store
from dinov2.eval.metrics import SELECTION_METRICS, selection_score
from dinov2.eval.ood import fit_ood
from dinov2.eval.reports import evaluate_split, results_header, write_json_atomic, write_results
from dinov2.eval.setup import add_qc_arguments, get_probe_args_parser
from dinov2.eval.thresholds import choose_thresholds
from dinov2.eval.utils import run_on_main_process
from dinov2.utils.utils import atomic_write

logger = logging.getLogger("dinov2")

QUERY_CHUNK = 1024
CLASSIFIER_NAME = "knn_classifier.pth"


def get_args_parser(
    description: Optional[str] = None,
    parents: Optional[List[argparse.ArgumentParser]] = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    parser = get_probe_args_parser(description, parents, add_help)
    parser.add_argument("--nb_knn", nargs="+", type=int, default=[10, 20, 100, 200], help="Numbers of neighbours")
    parser.add_argument("--temperature", type=float, default=0.07, help="Temperature of the neighbour weights")
    parser.add_argument("--batch-size", type=int, default=256, help="Batch size of feature extraction")
    parser.add_argument(
        "--selection-metric",
        choices=SELECTION_METRICS,
        default="mean_accuracy",
        help="Metric of the leave-group-out training scores that picks the reported k",
    )
    add_qc_arguments(parser)
    return parser


def knn_class_probabilities(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    train_groups: Optional[np.ndarray] = None,
    query_groups: Optional[np.ndarray] = None,
) -> Dict[int, np.ndarray]:
    """k -> (Nq, num_classes) weighted-vote probabilities. With group codes, training images of the query's own
    group are excluded from its neighbours (leave-group-out).

    Similarities are computed in float64: float32 products of float32 features are exact there, so which neighbours
    are nearest does not depend on the rounding of the float32 matrix product (thread count, device, batch layout),
    which decides it alone when the features of a barely trained model are almost equal."""
    one_hot = F.one_hot(train_labels.long(), num_classes).double()
    train_features = train_features.double()
    probs: Dict[int, List[torch.Tensor]] = {k: [] for k in ks}
    max_k = max(ks)
    for start in range(0, len(query_features), QUERY_CHUNK):
        similarity = query_features[start : start + QUERY_CHUNK].double() @ train_features.T
        if train_groups is not None:
            own = torch.from_numpy(query_groups[start : start + QUERY_CHUNK, None] == train_groups[None, :])
            similarity = similarity.masked_fill(own, float("-inf"))
        top_sims, top_idx = similarity.topk(max_k, dim=1)
        for k in ks:
            probs[k].append(weighted_vote(top_sims, top_idx, one_hot, k, temperature))
    return {k: torch.cat(v).cpu().numpy() if v else np.zeros((0, num_classes)) for k, v in probs.items()}


def weighted_vote(
    top_sims: torch.Tensor, top_idx: torch.Tensor, one_hot: torch.Tensor, k: int, temperature: float
) -> torch.Tensor:
    """Class probabilities (Nq, C) from the similarities and indices of each query's nearest training images, most
    similar first (Nq, >= k), and the training labels one-hot (N, C): the first k vote, weighted by
    softmax(similarity / temperature)."""
    weights = torch.softmax(top_sims[:, :k] / temperature, dim=1)
    return (weights[:, :, None] * one_hot[top_idx[:, :k]]).sum(dim=1)


class KnnHead(nn.Module):
    """The saved k-NN classifier as a scoring head: class tokens (N, n, D), mean patch token (N, D) -> (N, C) float64
    probabilities of the k-NN probe, similarities in float64 as there (`dinov2.eval.saved_probe`,
    `dinov2.eval.export`)."""

    n_blocks = 1

    def __init__(self, train_features: torch.Tensor, train_labels: torch.Tensor, k: int, temperature: float,
                 num_classes: int):
        super().__init__()
        if not 1 <= k <= len(train_features):
            raise ValueError(f"k = {k} but the classifier holds {len(train_features)} training features")
        self.k, self.temperature = k, temperature
        self.register_buffer("train_features", train_features.double())
        self.register_buffer("one_hot", F.one_hot(train_labels.long(), num_classes).double())

    def forward(self, cls: torch.Tensor, patch_mean: torch.Tensor) -> torch.Tensor:
        query = F.normalize(cls[:, -1], dim=1, p=2).double()
        top_sims, top_idx = (query @ self.train_features.T).topk(self.k, dim=1)
        return weighted_vote(top_sims, top_idx, self.one_hot, self.k, self.temperature)

    def soft_log_odds(self, cls: torch.Tensor) -> torch.Tensor:
        """(N,) float64 log-odds of not-class-0 against class 0 in the vote extended to every training image,
        log sum_{label != 0} exp(sim / T) - log sum_{label 0} exp(sim / T): smooth in the query, where the top-k
        vote of a query whose k neighbours share a class is flat (`dinov2.eval.explain` differentiates it)."""
        query = F.normalize(cls[:, -1], dim=1, p=2).double()
        logits = query @ self.train_features.T / self.temperature
        negative = self.one_hot[:, 0].bool()
        if negative.all() or not negative.any():
            raise ValueError("the k-NN classifier's training images are all of one side (class 0 or not): "
                             "its vote has no evidence to explain")
        return torch.logsumexp(logits[:, ~negative], dim=1) - torch.logsumexp(logits[:, negative], dim=1)


def _clip_ks(nb_knn: Sequence[int], n_train: int) -> List[int]:
    if any(k < 1 for k in nb_knn):
        raise ValueError(f"--nb_knn values must be >= 1, got {list(nb_knn)}")
    ks = sorted({min(k, n_train) for k in nb_knn})
    if any(k > n_train for k in nb_knn):
        logger.warning(f"--nb_knn {list(nb_knn)} exceeds the {n_train} training images: using k = {ks}")
    return ks


def eval_knn(args: argparse.Namespace, train: FeatureSet, val: FeatureSet) -> Dict[str, object]:
    """Fit-free k-NN probe: choose k and thresholds on the training set, evaluate `val`, write the outputs."""
    for split in (train, val):
        split.require_labels()
        split.require_classes_of(train)
    if len(train) == 0:
        raise ValueError(f"{train.dataset_str} is empty: the k-NN probe needs training images")
    num_classes = len(train.class_names)
    ks = _clip_ks(args.nb_knn, len(train))
    train_x, train_y = train.normalized_cls(), torch.from_numpy(train.labels)
    _, group_codes = np.unique(np.asarray(train.group_ids), return_inverse=True)
    if group_codes.max() >= 1:
        # neighbours masked out (own group) get weight exp(-inf) = 0; every row keeps >= 1 valid neighbour
        loo = knn_class_probabilities(train_x, train_y, train_x, ks, args.temperature, num_classes,
                                      group_codes, group_codes)
        loo_labels, loo_groups = train.labels, train.group_ids
    else:
        logger.warning(f"{train.dataset_str} has a single group: no leave-group-out scores for thresholds / k")
        loo = {k: np.zeros((0, num_classes)) for k in ks}
        loo_labels, loo_groups = np.zeros(0, dtype=np.int64), []
    thresholds = {k: choose_thresholds(loo[k], loo_labels, loo_groups, args.threshold_policy, args.group_aggregation)
                  for k in ks}
    for t in thresholds.values():
        t["chosen_on"] = f"{train.dataset_str} (leave-group-out k-NN scores)"
    scores = {k: selection_score(args.selection_metric, loo[k], loo_labels) for k in ks}
    best_k = max(ks, key=lambda k: scores[k])  # ties: the smallest k
    logger.info(f"k-NN: {args.selection_metric} of leave-group-out training scores {scores}; chosen k = {best_k}")

    settings = {"k": best_k, "temperature": args.temperature, "nb_knn": ks, "selection_metric": args.selection_metric}
    ood = fit_ood(train, args.ood_components, args.ood_quantile)
    write_json_atomic(
        os.path.join(args.output_dir, "knn_settings.json"),
        {**settings, "train_dataset": train.dataset_str, "thresholds": thresholds[best_k],
         "thresholds_per_k": {str(k): t for k, t in thresholds.items()}},
    )
    classifier = {"train_features": train_x, "train_labels": train_y, "k": best_k, "temperature": args.temperature,
                  "class_names": train.class_names, "thresholds": thresholds[best_k],
                  "train_dataset": train.dataset_str, "features": train.source, "ood": ood}
    atomic_write(os.path.join(args.output_dir, CLASSIFIER_NAME), lambda f: torch.save(classifier, f))
    results = results_header(args, "knn", train, settings, thresholds[best_k])
    val_x = val.normalized_cls()
    val_probs = knn_class_probabilities(train_x, train_y, val_x, ks, args.temperature, num_classes)
    per_k = {}
    for k in ks:
        per_k[str(k)] = evaluate_split(args.output_dir, "knn", val, val_probs[k], thresholds[k], args.fpr_target,
                                       write_files=False)
        per_k[str(k)]["settings"] = {"k": k, "temperature": args.temperature}
        top1 = per_k[str(k)]["image"]["top-1"]
        results[f"('full', {k}) Top 1"] = None if top1 is None else 100.0 * top1
    entry = evaluate_split(args.output_dir, "knn", val, val_probs[best_k], thresholds[best_k], args.fpr_target,
                           ood=ood)
    results["datasets"][val.dataset_str] = {"tag": val.tag, "settings": {"k": best_k, "temperature": args.temperature},
                                            **entry, "per_k": per_k}
    write_results(args.output_dir, "knn", results)
    return results


def run_eval_knn(args: argparse.Namespace) -> Optional[Dict[str, object]]:
    """Build the backbone, extract (or load) features, run the probe on the main process.

    Returns the results on the main process, None on the other ranks."""
    store = setup_feature_store(args)
    train, val = store.get(args.train_dataset_str), store.get(args.val_dataset_str)
    return run_on_main_process(eval_knn, args, train, val)


def main(args: argparse.Namespace) -> int:
    run_eval_knn(args)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    distributed.exit_now(main(get_args_parser(description="DINOv2 k-NN evaluation").parse_args()))
