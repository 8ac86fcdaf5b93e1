"""Linear probe (upstream grid) trained on cached frozen features, with QC metrics at image and group level.

As upstream, a grid of `LinearClassifier`s - last n blocks' class tokens in {1, 4} x mean patch token {no, yes} x
`--learning-rates` - is trained jointly (sum of cross-entropies, SGD momentum 0.9, cosine schedule, lr scaled by
batch/256) and the best one on the validation split (`--val-metric-type`) is kept and applied to the test splits.
Unlike upstream the classifiers read features extracted once per split (eval transform, no train-time augmentation,
see dinov2/eval/features.py) instead of running the backbone every iteration: training takes seconds on a CPU.

The kept classifier is saved as `linear_classifier.pth` together with its operating thresholds (chosen on the
validation split with `--threshold-policy`), which are applied unchanged to the test splits, and the features' source
(backbone fingerprint, eval transform): `dinov2.eval.predict` applies it to new images.
"""

import argparse
import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dinov2.distributed as distributed
from dinov2.eval.features import FeatureSet, linear_input, setup_feature_store
from dinov2.eval.metrics import SELECTION_METRICS, selection_score
from dinov2.eval.ood import fit_ood
from dinov2.eval.reports import evaluate_split, results_header, unique_tag, write_results
from dinov2.eval.setup import add_qc_arguments, get_probe_args_parser
from dinov2.eval.thresholds import choose_thresholds
from dinov2.eval.utils import run_on_main_process
from dinov2.utils.utils import atomic_write

logger = logging.getLogger("dinov2")

DEFAULT_LEARNING_RATES = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]
N_LAST_BLOCKS_GRID = (1, 4)
CHECKPOINT_NAME = "linear_classifier.pth"


def get_args_parser(
    description: Optional[str] = None,
    parents: Optional[List[argparse.ArgumentParser]] = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    parser = get_probe_args_parser(
        description, parents, add_help, val_help="Validation dataset: picks the classifier and the thresholds"
    )
    parser.add_argument("--test-datasets", dest="test_dataset_strs", type=str, nargs="+", default=None,
                        help="Test datasets (default: the validation dataset)")
    parser.add_argument("--epochs", type=int, default=10, help="Number of training epochs")
    parser.add_argument("--epoch-length", type=int, default=1250, help="Iterations per epoch")
    parser.add_argument("--batch-size", type=int, default=128, help="Batch size (classifier training and extraction)")
    parser.add_argument("--learning-rates", nargs="+", type=float, default=DEFAULT_LEARNING_RATES,
                        help="Learning rates of the grid (before batch/256 scaling)")
    parser.add_argument("--val-metric-type", choices=SELECTION_METRICS, default="mean_accuracy",
                        help="Validation metric that picks the best classifier")
    parser.add_argument("--seed", type=int, default=0, help="Seed of classifier initialisation and batch order")
    add_qc_arguments(parser)
    return parser


class LinearClassifier(nn.Module):
    """Linear layer on upstream's probe input (class tokens of `use_n_blocks` blocks, + mean patch token)."""

    def __init__(self, out_dim: int, use_n_blocks: int, use_avgpool: bool, num_classes: int = 1000):
        super().__init__()
        self.out_dim, self.use_n_blocks, self.use_avgpool = out_dim, use_n_blocks, use_avgpool
        self.num_classes = num_classes
        self.linear = nn.Linear(out_dim, num_classes)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, linear_input: torch.Tensor) -> torch.Tensor:
        return self.linear(linear_input)


class AllClassifiers(nn.ModuleDict):
    """The classifier grid, name -> LinearClassifier."""


def classifier_name(n_last_blocks: int, avgpool: bool, lr: float) -> str:
    return f"classifier_{n_last_blocks}_blocks_avgpool_{avgpool}_lr_{lr:.5f}".replace(".", "_")


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches over shuffled passes of range(n)."""
    buffer = torch.zeros(0, dtype=torch.long)
    while True:
        while len(buffer) < batch_size:
            buffer = torch.cat([buffer, torch.randperm(n, generator=generator)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


class LinearClassifierBank(nn.Module):
    """`count` linear classifiers over the same input, evaluated with one batched matmul: (B, D) -> (count, B, C)."""

    def __init__(self, out_dim: int, num_classes: int, count: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(count, num_classes, out_dim).normal_(mean=0.0, std=0.01))
        self.bias = nn.Parameter(torch.zeros(count, num_classes))

    def forward(self, linear_input: torch.Tensor) -> torch.Tensor:
        count, num_classes, _ = self.weight.shape
        logits = linear_input @ self.weight.flatten(0, 1).T + self.bias.flatten()  # one GEMM for all classifiers
        return logits.view(-1, count, num_classes).transpose(0, 1)


def train_linear_grid(
    train: FeatureSet, learning_rates: List[float], epochs: int, epoch_length: int, batch_size: int, seed: int
) -> Tuple[AllClassifiers, Dict[str, dict]]:
    """Train the grid on the cached training features; returns the classifiers and name -> settings.

    The classifiers sharing an input are one `LinearClassifierBank`. Upstream's per-classifier learning rates
    (SGD momentum 0.9, no weight decay, one cosine schedule) are reproduced exactly by one SGD with base lr 1 on
    gradients scaled by each classifier's lr: momentum is linear, so both give w -= cos(t) * lr_i * v_i.
    """
    torch.manual_seed(seed)
    num_classes = len(train.class_names)
    blocks = sorted({min(n, train.n_blocks) for n in N_LAST_BLOCKS_GRID})
    inputs = {(n, avg): train.linear_input(n, avg) for n in blocks for avg in (False, True)}
    scaled = [lr * batch_size / 256.0 for lr in learning_rates]
    scaled_lrs = torch.tensor(scaled)
    banks = {key: LinearClassifierBank(x.shape[1], num_classes, len(learning_rates)) for key, x in inputs.items()}
    max_iter = epochs * epoch_length
    optimizer = torch.optim.SGD([p for bank in banks.values() for p in bank.parameters()], lr=1.0, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(max_iter, 1), eta_min=0)
    labels = torch.from_numpy(train.labels)
    batches = _batches(len(train), batch_size, torch.Generator().manual_seed(seed))
    for iteration in range(max_iter):
        index = next(batches)
        loss = torch.zeros(())
        for key, bank in banks.items():
            logits = bank(inputs[key][index])  # (count, B, C); summed over classifiers, mean over the batch
            count = len(bank.weight)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), labels[index].repeat(count)) * count
        optimizer.zero_grad()
        loss.backward()
        for bank in banks.values():
            bank.weight.grad.mul_(scaled_lrs[:, None, None])
            bank.bias.grad.mul_(scaled_lrs[:, None])
        optimizer.step()
        scheduler.step()
        if iteration % max(1, epoch_length) == 0 or iteration == max_iter - 1:
            logger.info(f"linear probe iteration {iteration + 1}/{max_iter}: summed loss {loss.item():.4f}")
    classifiers, settings = AllClassifiers(), {}
    for (n, avg), bank in banks.items():
        for i, lr in enumerate(learning_rates):
            name = classifier_name(n, avg, lr)
            classifier = LinearClassifier(bank.weight.shape[2], n, avg, num_classes)
            with torch.no_grad():
                classifier.linear.weight.copy_(bank.weight[i])
                classifier.linear.bias.copy_(bank.bias[i])
            classifiers[name] = classifier
            settings[name] = {"n_last_blocks": n, "avgpool": avg, "lr": lr, "scaled_lr": scaled[i]}
    return classifiers, settings


class LinearProbeHead(nn.Module):
    """A linear classifier as a scoring head: class tokens (N, n, D) of the last n >= `n_blocks` blocks and mean patch
    token (N, D) -> (N, C) float64 softmax probabilities (`dinov2.eval.saved_probe`, `dinov2.eval.export`)."""

    def __init__(self, classifier: LinearClassifier):
        super().__init__()
        self.classifier = classifier
        self.n_blocks = classifier.use_n_blocks

    def forward(self, cls: torch.Tensor, patch_mean: torch.Tensor) -> torch.Tensor:
        x = linear_input(cls, patch_mean, self.classifier.use_n_blocks, self.classifier.use_avgpool)
        # float64 before the softmax: the positive score 1 - p(class 0) of a confident negative is then resolved
        # down to ~1e-16 (float32 rounds it to 0 below ~3e-8, which ties the most confident negatives)
        return torch.softmax(self.classifier(x).double(), dim=1)


@torch.no_grad()
def predict(classifier: LinearClassifier, features: FeatureSet) -> np.ndarray:
    """(N, num_classes) softmax probabilities of one classifier on one split."""
    if not 1 <= classifier.use_n_blocks <= features.n_blocks:
        raise ValueError(f"the classifier reads {classifier.use_n_blocks} blocks, {features.n_blocks} were extracted")
    return LinearProbeHead(classifier)(features.cls, features.patch_mean).numpy()


def save_linear_classifier(path: str, classifier: LinearClassifier, metadata: Dict[str, object]) -> None:
    """Classifier weights + settings + thresholds, written atomically (loadable with torch.load(weights_only=True))."""
    payload = {
        "state_dict": classifier.state_dict(),
        "out_dim": classifier.out_dim,
        "use_n_blocks": classifier.use_n_blocks,
        "use_avgpool": classifier.use_avgpool,
        "num_classes": classifier.num_classes,
        **metadata,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def load_linear_classifier(path: str) -> Tuple[LinearClassifier, Dict[str, object]]:
    """Inverse of `save_linear_classifier`: (classifier, the whole saved payload incl. thresholds)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return linear_classifier_from_payload(payload), payload


def linear_classifier_from_payload(payload: Dict[str, object]) -> LinearClassifier:
    """The classifier of a loaded `linear_classifier.pth`, in eval mode."""
    classifier = LinearClassifier(payload["out_dim"], payload["use_n_blocks"], payload["use_avgpool"],
                                  payload["num_classes"])
    classifier.load_state_dict(payload["state_dict"])
    return classifier.eval()


def eval_linear(args: argparse.Namespace, train: FeatureSet, val: FeatureSet, tests: List[FeatureSet]) -> Dict:
    """Train the grid, pick the best classifier and thresholds on `val`, evaluate the tests, write the outputs."""
    for split in (train, val, *tests):
        split.require_labels()
        split.require_classes_of(train)
    if len(train) == 0:
        raise ValueError(f"{train.dataset_str} is empty: the linear probe needs training images")
    classifiers, grid = train_linear_grid(train, args.learning_rates, args.epochs, args.epoch_length,
                                          args.batch_size, args.seed)
    val_scores = {name: selection_score(args.val_metric_type, predict(c, val), val.labels)
                  for name, c in classifiers.items()}
    if len(val) == 0:
        logger.warning(f"{val.dataset_str} is empty: keeping the first classifier of the grid")
    best_name = max(val_scores, key=lambda name: val_scores[name])  # ties: the first in grid order
    best = classifiers[best_name].eval()
    logger.info(f"best classifier on {val.dataset_str} by {args.val_metric_type}: {best_name} "
                f"({val_scores[best_name]:.4f})")
    thresholds = choose_thresholds(predict(best, val), val.labels, val.group_ids, args.threshold_policy,
                                   args.group_aggregation)
    thresholds["chosen_on"] = val.dataset_str
    settings = {"classifier": best_name, **grid[best_name], "val_metric_type": args.val_metric_type,
                "val_score": val_scores[best_name], "epochs": args.epochs, "epoch_length": args.epoch_length,
                "batch_size": args.batch_size}
    ood = fit_ood(train, args.ood_components, args.ood_quantile)
    save_linear_classifier(os.path.join(args.output_dir, CHECKPOINT_NAME), best,
                           {"name": best_name, "settings": settings, "thresholds": thresholds,
                            "class_names": train.class_names, "train_dataset": train.dataset_str,
                            "features": train.source, "ood": ood})
    results = results_header(args, "linear", train, settings, thresholds)
    results["grid"] = val_scores
    val_top1 = evaluate_split(args.output_dir, "linear", val, predict(best, val), thresholds, args.fpr_target,
                              write_files=False)["image"]["top-1"]
    results["best_classifier"] = {"name": best_name, "accuracy": val_top1}
    tags = set()
    for test in tests:
        tag = unique_tag(test.tag, tags)
        entry = evaluate_split(args.output_dir, "linear", test, predict(best, test), thresholds, args.fpr_target,
                               tag=tag, ood=ood)
        results["datasets"][test.dataset_str] = {"tag": tag, "settings": settings, **entry}
        top1 = entry["image"]["top-1"]
        results[f"{test.dataset_str}_accuracy"] = None if top1 is None else 100.0 * top1
    write_results(args.output_dir, "linear", results)
    return results


def run_eval_linear(args: argparse.Namespace) -> Optional[Dict[str, object]]:
    """Build the backbone, extract (or load) features, run the probe on the main process.

    Returns the results on the main process, None on the other ranks."""
    store = setup_feature_store(args)
    train, val = store.get(args.train_dataset_str), store.get(args.val_dataset_str)
    tests = [store.get(s) for s in args.test_dataset_strs] if args.test_dataset_strs else [val]
    return run_on_main_process(eval_linear, args, train, val, tests)


def main(args: argparse.Namespace) -> int:
    run_eval_linear(args)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    distributed.exit_now(main(get_args_parser(description="DINOv2 linear evaluation").parse_args()))
