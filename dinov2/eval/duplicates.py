"""Near-duplicate photos of different devices: the split leaks that inflate QC metrics and the label conflicts that
blur them.

    python -m dinov2.eval.duplicates --config-file C --pretrained-weights W --output-dir D \
        --datasets BBU:root=R:split=TRAIN BBU:root=R:split=VAL BBU:root=R:split=TEST \
        [--threshold 0.95] [--max-pairs 10000] [--fail-on none|cross-split|label-conflict|any]

Every photo's backbone output (the class token, from the probes' feature cache) is compared with every other photo's
by the cosine similarity of the centred tokens (the mean over all compared photos removed): raw DINO class tokens
share one large direction (every pair of the demo's photos is above 0.99), centred ones put unrelated photos near 0
and copies at 1, so one threshold means much the same for every model. Photos of one device (the same group in the
same dataset) are expected to look alike and are not compared; every other pair with a cosine similarity of at least
`--threshold` is reported, as
- cross-split: the photos are in different datasets, e.g. a device photographed again and filed in another split
  (the test metrics then measure memory), or one file listed twice;
- same split: two devices of one split alike to within the threshold (a device registered twice?);
- label conflict (either kind): the two photos carry different labels (one may be mislabelled).
Outputs in `--output-dir`: `duplicates.csv` (the pairs, most similar first), `nearest.csv` (each photo's most
similar photo of another device: the distribution to set the threshold by) and `duplicates.json` (counts, the
quantiles of those nearest similarities per dataset, and the listed pairs). `--fail-on` makes the command exit with
1 when such pairs exist, for a dataset check in a pipeline.
"""

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import dinov2.distributed as distributed
from dinov2.eval.features import FeatureSet, setup_feature_store
from dinov2.eval.reports import write_csv_atomic, write_json_atomic
from dinov2.eval.setup import add_inference_arguments, add_transform_arguments
from dinov2.eval.setup import get_args_parser as get_setup_args_parser
from dinov2.eval.setup import positive_int
from dinov2.eval.utils import run_on_main_process

logger = logging.getLogger("dinov2")

FAIL_ON = ("none", "cross-split", "label-conflict", "any")
QUANTILES = (0.5, 0.9, 0.99, 1.0)
PAIR_HEADER = ["similarity", "kind", "label_conflict", "dataset_a", "img_path_a", "group_id_a", "label_a", "dataset_b",
               "img_path_b", "group_id_b", "label_b"]
NEAREST_HEADER = ["dataset", "img_path", "group_id", "label", "nearest_dataset", "nearest_img_path",
                  "nearest_group_id", "nearest_label", "similarity"]


def _similarity(text: str) -> float:
    value = float(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a cosine similarity is in [-1, 1], got {value}")
    return value


def get_args_parser(
    description: Optional[str] = None,
    parents: Optional[List[argparse.ArgumentParser]] = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    parents = [*(parents or []), get_setup_args_parser(parents=None, add_help=False)]
    parser = argparse.ArgumentParser(description=description, parents=parents, add_help=add_help)
    parser.add_argument("--datasets", dest="dataset_strs", type=str, nargs="+", required=True,
                        help="Datasets compared with each other and within themselves (labels optional)")
    parser.add_argument("--threshold", type=_similarity, default=0.95,
                        help="Pairs of photos of different devices at or above this cosine similarity are reported")
    parser.add_argument("--max-pairs", type=positive_int, default=10000,
                        help="Pairs listed (the most similar; all are counted)")
    parser.add_argument("--fail-on", choices=FAIL_ON, default="none",
                        help="Exit with 1 when pairs of this kind exist (any: any pair)")
    parser.add_argument("--chunk-size", type=positive_int, default=1024,
                        help="Photos compared with all others at once (memory: chunk x photos similarities)")
    parser.add_argument("--batch-size", type=int, default=256, help="Batch size of feature extraction")
    add_transform_arguments(parser)
    add_inference_arguments(parser)
    return parser


@dataclass
class NearDuplicates:
    """Pairs (i < j) of photos of different owners at or above the threshold, the most similar `max_pairs` first,
    how many there are of each kind, and each photo's most similar photo of another owner (-1 / NaN: none)."""

    pairs: np.ndarray  # (P, 2) int64
    similarities: np.ndarray  # (P,) float32
    counts: Dict[str, int]
    nearest: np.ndarray  # (N,) int64
    nearest_similarity: np.ndarray  # (N,) float32


def _most_similar(i: torch.Tensor, j: torch.Tensor, s: torch.Tensor, limit: int):
    """The `limit` pairs of highest similarity, in that order, equal similarities by (i, j)."""
    order = np.lexsort((j.numpy(), i.numpy(), -s.numpy().astype(np.float64)))[:limit]
    index = torch.from_numpy(order)
    return i[index], j[index], s[index]


def find_near_duplicates(features: torch.Tensor, owners: np.ndarray, datasets: np.ndarray, labels: np.ndarray,
                         threshold: float, max_pairs: int, chunk_size: int = 1024) -> NearDuplicates:
    """Compare every row of `features` (N, D; L2-normalised) with every other, `chunk_size` rows at a time. Rows of
    one owner are not compared; a pair is cross-split when its `datasets` codes differ and a label conflict when both
    `labels` codes are >= 0 and differ."""
    features = features.float()
    n = features.shape[0]
    owners_t, datasets_t, labels_t = (torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in (owners, datasets,
                                                                                                 labels))
    nearest = torch.full((n,), -1, dtype=torch.long)
    nearest_similarity = torch.full((n,), float("nan"))
    kept = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    counts = {"pairs": 0, "cross-split": 0, "same-split": 0, "label-conflict": 0}
    columns = torch.arange(n)
    for start in range(0, n, chunk_size):
        rows = columns[start : start + chunk_size]
        similarities = features[rows] @ features.T
        similarities.masked_fill_(owners_t[rows, None] == owners_t[None, :], float("-inf"))  # itself and its device
        best = similarities.max(dim=1)
        found = torch.isfinite(best.values)
        nearest[rows[found]], nearest_similarity[rows[found]] = best.indices[found], best.values[found]
        hit = (similarities >= threshold) & (columns[None, :] > rows[:, None])  # each pair once
        cross = datasets_t[rows, None] != datasets_t[None, :]
        row_labels = labels_t[rows, None]
        conflict = (row_labels >= 0) & (labels_t[None, :] >= 0) & (row_labels != labels_t[None, :])
        n_hits = int(hit.sum())
        counts["pairs"] += n_hits
        counts["cross-split"] += int((hit & cross).sum())
        counts["same-split"] += int((hit & ~cross).sum())
        counts["label-conflict"] += int((hit & conflict).sum())
        if n_hits:  # the chunk's most similar pairs only: a low threshold may hit most of the n^2
            top = torch.where(hit, similarities, float("-inf")).flatten().topk(min(n_hits, max_pairs))
            new = (rows[top.indices // n], top.indices % n, top.values)
            kept = _most_similar(*(torch.cat(pair) for pair in zip(kept, new)), max_pairs)
    return NearDuplicates(
        pairs=torch.stack(kept[:2], dim=1).numpy(),
        similarities=kept[2].numpy(),
        counts=counts,
        nearest=nearest.numpy(),
        nearest_similarity=nearest_similarity.numpy(),
    )


def _codes(values: Sequence[object]) -> np.ndarray:
    """Integer codes of hashable values, in order of first appearance."""
    index: Dict[object, int] = {}
    return np.asarray([index.setdefault(v, len(index)) for v in values], dtype=np.int64)


def _label_names(split: FeatureSet) -> List[str]:
    return [split.class_names[y] if 0 <= y < len(split.class_names) else "" for y in split.labels]


def write_report(args: argparse.Namespace, splits: List[FeatureSet]) -> Dict[str, object]:
    """Compare the splits' photos and write duplicates.csv, nearest.csv and duplicates.json (main process)."""
    dataset_of = np.concatenate([np.full(len(s), k) for k, s in enumerate(splits)]).astype(np.int64)
    paths = [p for s in splits for p in s.img_paths]
    groups = [g for s in splits for g in s.group_ids]
    label_names = [name for s in splits for name in _label_names(s)]
    label_codes = np.where(np.asarray(label_names) == "", -1, _codes(label_names))
    owners = _codes(list(zip(dataset_of.tolist(), groups)))
    features = torch.cat([s.normalized_cls().float() for s in splits]) if splits else torch.zeros(0, 1)
    features = F.normalize(features - features.mean(dim=0), dim=1)  # centred: see the module docstring
    found = find_near_duplicates(features, owners, dataset_of, label_codes, args.threshold, args.max_pairs,
                                 args.chunk_size)
    names = [s.dataset_str for s in splits]

    def describe(k: int) -> List[object]:
        return [names[dataset_of[k]], paths[k], groups[k], label_names[k]]

    pairs = []
    for (a, b), similarity in zip(found.pairs.tolist(), found.similarities.tolist()):
        kind = "cross-split" if dataset_of[a] != dataset_of[b] else "same-split"
        conflict = bool(label_codes[a] >= 0 and label_codes[b] >= 0 and label_codes[a] != label_codes[b])
        pairs.append([round(similarity, 6), kind, int(conflict), *describe(a), *describe(b)])
    write_csv_atomic(os.path.join(args.output_dir, "duplicates.csv"), PAIR_HEADER, pairs)
    nearest_rows = [
        [*describe(k), *(describe(m) if m >= 0 else ["", "", "", ""]), "" if m < 0 else round(float(s), 6)]
        for k, (m, s) in enumerate(zip(found.nearest.tolist(), found.nearest_similarity.tolist()))
    ]
    write_csv_atomic(os.path.join(args.output_dir, "nearest.csv"), NEAREST_HEADER, nearest_rows)

    per_dataset = {}
    for k, split in enumerate(splits):
        values = found.nearest_similarity[dataset_of == k]
        values = values[np.isfinite(values)]
        quantiles = {str(q): round(float(np.quantile(values, q)), 6) for q in QUANTILES} if len(values) else None
        per_dataset[split.dataset_str] = {"n_images": len(split), "n_groups": len(set(split.group_ids)),
                                          "nearest_similarity_quantiles": quantiles}
    results = {
        "pretrained_weights": args.pretrained_weights,
        "backbone_sha256": splits[0].source.get("backbone_sha256") if splits else None,
        "threshold": args.threshold,
        "counts": found.counts,
        "n_pairs_listed": len(pairs),
        "datasets": per_dataset,
        "pairs": [dict(zip(PAIR_HEADER, row)) for row in pairs],
    }
    write_json_atomic(os.path.join(args.output_dir, "duplicates.json"), results)
    counts = found.counts
    message = (f"{counts['pairs']} pairs of photos of different devices at cosine >= {args.threshold}: "
               f"{counts['cross-split']} across datasets, {counts['same-split']} within one, "
               f"{counts['label-conflict']} labelled differently; see {args.output_dir}/duplicates.csv")
    (logger.warning if counts["pairs"] else logger.info)(message)
    return results


def failed(counts: Dict[str, int], fail_on: str) -> bool:
    """Whether `--fail-on` asks for exit code 1 with these counts."""
    key = {"none": None, "cross-split": "cross-split", "label-conflict": "label-conflict", "any": "pairs"}[fail_on]
    return key is not None and counts[key] > 0


def run_duplicates(args: argparse.Namespace) -> Optional[Dict[str, object]]:
    """Extract (or load) every dataset's features, then compare and write on the main process."""
    if not args.output_dir:
        raise ValueError("--output-dir is required")
    os.makedirs(args.output_dir, exist_ok=True)
    store = setup_feature_store(args)
    splits = [store.get(dataset_str) for dataset_str in dict.fromkeys(args.dataset_strs)]  # each dataset once
    return run_on_main_process(write_report, args, splits)


def main(args: argparse.Namespace) -> int:
    results = run_duplicates(args)
    distributed.shutdown()
    if results is not None and failed(results["counts"], args.fail_on):
        logger.error(f"--fail-on {args.fail_on}: such pairs exist")
        return 1
    return 0


if __name__ == "__main__":
    parser = get_args_parser(description="Near-duplicate photos of different devices across and within datasets")
    distributed.exit_now(main(parser.parse_args()))
