"""Logistic-regression probe on frozen features (scikit-learn; cuML when importable), with QC metrics.

As upstream: L2-normalised CLS features in float64, L2-penalised logistic regression, C swept over
`10 ** linspace(-6, 5, 45)` (shorten with `--n-c`, or give `--c-values`). C is chosen on the "selection" split:
`--finetune-dataset-str` if given, else the validation split with `--finetune-on-val`, else a held-out 10% of the
training GROUPS of each label (group-disjoint, so no device is on both sides). The final model is refitted with the
chosen C on the training split (+ the finetune dataset if given) and evaluated on the validation split and
`--test-datasets`.

The operating thresholds are chosen on the selection split with the selection-stage model (the refitted model
saw part of that data) and saved with the coefficients and the features' source in `log_regression_classifier.json`
(no pickle); `dinov2.eval.predict` applies it to new images.
"""

import argparse
import logging
import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

import dinov2.distributed as distributed
from dinov2.eval.features import FeatureSet, held_out_groups, setup_feature_store
from dinov2.eval.metrics import SELECTION_METRICS, selection_score
from dinov2.eval.ood import fit_ood
from dinov2.eval.reports import evaluate_split, results_header, unique_tag, write_json_atomic, write_results
from dinov2.eval.setup import add_qc_arguments, get_probe_args_parser
from dinov2.eval.thresholds import choose_thresholds
from dinov2.eval.utils import run_on_main_process

logger = logging.getLogger("dinov2")

CLASSIFIER_NAME = "log_regression_classifier.json"

try:
    from cuml.linear_model import LogisticRegression as CumlLogisticRegression
except ImportError:
    CumlLogisticRegression = None


def get_args_parser(
    description: Optional[str] = None,
    parents: Optional[List[argparse.ArgumentParser]] = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    parser = get_probe_args_parser(description, parents, add_help)
    parser.add_argument("--test-datasets", dest="test_dataset_strs", type=str, nargs="+", default=None,
                        help="More evaluated datasets (the validation dataset is always evaluated)")
    parser.add_argument("--finetune-dataset-str", type=str, default=None,
                        help="Dataset that picks C (and the thresholds) and is added to the final fit")
    parser.add_argument("--finetune-on-val", action="store_true",
                        help="Pick C and the thresholds on the validation dataset (its metrics become optimistic)")
    parser.add_argument("--metric-type", choices=SELECTION_METRICS, default="mean_accuracy",
                        help="Metric of the selection split that picks C")
    parser.add_argument("--c-values", type=float, nargs="+", default=None, help="Explicit C grid")
    parser.add_argument("--n-c", type=int, default=45, help="Number of C values in 10**linspace(-6, 5, n)")
    parser.add_argument("--max-train-iters", type=int, default=1000, help="Solver iterations")
    parser.add_argument("--tol", type=float, default=1e-4, help="Solver tolerance (scikit-learn)")
    parser.add_argument("--train-dtype", choices=("float64", "float32"), default="float64", help="Feature dtype")
    parser.add_argument("--batch-size", type=int, default=256, help="Batch size of feature extraction")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the held-out group split")
    add_qc_arguments(parser)
    return parser


def c_grid(args: argparse.Namespace) -> List[float]:
    if args.c_values:
        return [float(c) for c in args.c_values]
    if args.n_c < 1:
        raise ValueError(f"--n-c must be >= 1, got {args.n_c}")
    return [float(c) for c in 10 ** np.linspace(-6, 5, args.n_c)]


def _use_cuml() -> bool:
    return CumlLogisticRegression is not None and torch.cuda.is_available()


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, tol: float) -> Any:
    if len(np.unique(y)) < 2:
        raise ValueError(f"logistic regression needs at least two classes in its training data, got {np.unique(y)}")
    if _use_cuml():
        model = CumlLogisticRegression(penalty="l2", C=c, max_iter=max_iter, output_type="numpy", tol=1e-12,
                                       linesearch_max_iter=50)
    else:
        model = LogisticRegression(C=c, max_iter=max_iter, tol=tol)
    return model.fit(x, y)


def classifier_parameters(model: Any, c: float) -> Dict[str, object]:
    """JSON-able coefficients of a fitted model (the saved artefact; see `log_regression_probabilities`)."""
    return {
        "C": c,
        "classes": [int(k) for k in np.asarray(model.classes_)],
        "coef": np.asarray(model.coef_, dtype=np.float64).tolist(),
        "intercept": np.asarray(model.intercept_, dtype=np.float64).reshape(-1).tolist(),
    }


def log_regression_probabilities(params: Dict[str, object], x: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities from saved parameters: sigmoid for two fitted classes, softmax otherwise.
    Classes absent from the training data get probability 0."""
    return LogRegressionHead(params, num_classes).probabilities(torch.from_numpy(np.asarray(x))).numpy()


class LogRegressionHead(nn.Module):
    """Saved log-reg parameters as a scoring head: class tokens (N, n, D), mean patch token (N, D) -> (N, C) float64
    probabilities of the L2-normalised last class token, cast to `train_dtype` as the probe's features
    (`dinov2.eval.saved_probe`, `dinov2.eval.export`)."""

    n_blocks = 1

    def __init__(self, params: Dict[str, object], num_classes: int, train_dtype: str = "float64"):
        super().__init__()
        self.train_dtype = getattr(torch, train_dtype)
        self.register_buffer("coef", torch.tensor(params["coef"], dtype=torch.float64))
        self.register_buffer("intercept", torch.tensor(params["intercept"], dtype=torch.float64))
        # fitted class j -> column classes[j]: a product with ones and zeros, exact
        self.register_buffer("placement", F.one_hot(torch.tensor(params["classes"]), num_classes).double())

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.double() @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:
            p1 = 1.0 / (1.0 + torch.exp(-logits[:, 0]))
            fitted = torch.stack([1.0 - p1, p1], dim=1)
        else:
            fitted = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            fitted = fitted / fitted.sum(dim=1, keepdim=True)
        return fitted @ self.placement

    def forward(self, cls: torch.Tensor, patch_mean: torch.Tensor) -> torch.Tensor:
        return self.probabilities(F.normalize(cls[:, -1], dim=1, p=2).to(self.train_dtype))


def _features(split: FeatureSet, dtype: str) -> np.ndarray:
    return split.normalized_cls().numpy().astype(dtype)


def eval_log_regression(
    args: argparse.Namespace, train: FeatureSet, val: FeatureSet, tests: List[FeatureSet],
    finetune: Optional[FeatureSet] = None,
) -> Dict[str, object]:
    """Choose C and thresholds on the selection split, refit, evaluate val and tests, write the outputs."""
    for split in (train, val, *tests, *([finetune] if finetune is not None else [])):
        split.require_labels()
        split.require_classes_of(train)
    if len(train) == 0:
        raise ValueError(f"{train.dataset_str} is empty: the log-reg probe needs training images")
    num_classes = len(train.class_names)
    x_train = _features(train, args.train_dtype)
    if finetune is not None:
        fit_x, fit_y, selection, chosen_on = x_train, train.labels, finetune, finetune.dataset_str
    elif args.finetune_on_val:
        logger.warning("--finetune-on-val: C and thresholds are chosen on the validation split it is evaluated on")
        fit_x, fit_y, selection, chosen_on = x_train, train.labels, val, val.dataset_str
    else:
        fit_idx, held_idx = held_out_groups(train, args.seed)
        fit_x, fit_y, selection = x_train[fit_idx], train.labels[fit_idx], train.subset(held_idx)
        chosen_on = f"{train.dataset_str} (held-out {len(np.unique(selection.group_ids))} groups)"
    selection_x = _features(selection, args.train_dtype)
    grid = c_grid(args)
    scores, selection_probs = {}, {}
    for c in grid:
        params = classifier_parameters(_fit(fit_x, fit_y, c, args.max_train_iters, args.tol), c)
        selection_probs[c] = log_regression_probabilities(params, selection_x, num_classes)
        scores[c] = selection_score(args.metric_type, selection_probs[c], selection.labels)
        logger.info(f"log-reg C={c:.3g}: {args.metric_type} on {chosen_on} = {scores[c]:.4f}")
    if len(selection) == 0:
        best_c = min(grid, key=lambda c: abs(np.log10(c)))
        logger.warning(f"the selection split is empty: using C={best_c:.3g} (closest to 1)")
    else:
        best_c = max(grid, key=lambda c: scores[c])  # ties: the smallest C
    thresholds = choose_thresholds(selection_probs[best_c], selection.labels, selection.group_ids,
                                   args.threshold_policy, args.group_aggregation)
    thresholds["chosen_on"] = chosen_on
    final_x, final_y = x_train, train.labels
    if finetune is not None:
        final_x = np.concatenate([x_train, _features(finetune, args.train_dtype)])
        final_y = np.concatenate([train.labels, finetune.labels])
    params = classifier_parameters(_fit(final_x, final_y, best_c, args.max_train_iters, args.tol), best_c)
    settings = {"C": best_c, "metric_type": args.metric_type, "selection_score": scores[best_c],
                "n_c": len(grid), "solver": "cuml" if _use_cuml() else "sklearn", "train_dtype": args.train_dtype}
    ood = fit_ood(train, args.ood_components, args.ood_quantile)
    write_json_atomic(os.path.join(args.output_dir, CLASSIFIER_NAME),
                      {**params, "feature": "l2-normalised CLS token", "class_names": train.class_names,
                       "train_dataset": train.dataset_str, "thresholds": thresholds, "settings": settings,
                       "features": train.source, "ood": ood})
    results = results_header(args, "log_regression", train, settings, thresholds)
    results["grid"] = {f"{c:.6g}": s for c, s in scores.items()}
    results["best_C"] = best_c
    tags = set()
    for split in (val, *tests):
        if split.dataset_str in results["datasets"]:
            continue
        tag = unique_tag(split.tag, tags)
        probs = log_regression_probabilities(params, _features(split, args.train_dtype), num_classes)
        entry = evaluate_split(args.output_dir, "log_regression", split, probs, thresholds, args.fpr_target, tag=tag,
                               ood=ood)
        results["datasets"][split.dataset_str] = {"tag": tag, "settings": {"C": best_c}, **entry}
        top1 = entry["image"]["top-1"]
        results[f"{split.dataset_str} top-1"] = None if top1 is None else 100.0 * top1
    write_results(args.output_dir, "log_regression", results)
    return results


def run_eval_log_regression(args: argparse.Namespace) -> Optional[Dict[str, object]]:
    """Build the backbone, extract (or load) features, run the probe on the main process.

    Returns the results on the main process, None on the other ranks."""
    if args.finetune_dataset_str and args.finetune_on_val:
        raise ValueError("--finetune-dataset-str and --finetune-on-val are exclusive")
    store = setup_feature_store(args)
    train, val = store.get(args.train_dataset_str), store.get(args.val_dataset_str)
    tests = [store.get(s) for s in args.test_dataset_strs or []]
    finetune = store.get(args.finetune_dataset_str) if args.finetune_dataset_str else None
    return run_on_main_process(eval_log_regression, args, train, val, tests, finetune)


def main(args: argparse.Namespace) -> int:
    run_eval_log_regression(args)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    distributed.exit_now(main(get_args_parser(description="DINOv2 logistic regression evaluation").parse_args()))
