"""Score new images with a saved probe classifier: the production step after evaluation.

    python -m dinov2.eval.predict --config-file C --pretrained-weights W \\
        --classifier <probe output dir>/linear_classifier.pth --datasets BBU:root=R:annotation_file=A --output-dir D

`--classifier` is the k-NN probe's `knn_classifier.pth` (its training features, k, temperature), the linear probe's
`linear_classifier.pth` or the log-reg probe's `log_regression_classifier.json`. Each carries the source of its
training features (dinov2/eval/features.py): the images are extracted with the same eval transform, and a backbone
whose state dict is not the one the classifier was trained on is refused, as its scores would mean nothing. Every
image gets the positive-class score and the decision at the saved image threshold, every group (device) its aggregated
score and the decision at the saved group threshold. Labels are optional (`gt_label` absent or -1); a dataset whose
images are all labelled also gets the QC metrics and plots of the probes. To decide device by device in a running
process instead, see `dinov2.eval.predictor`.

Outputs in --output-dir, for probe P (knn, linear or log_regression) and dataset tag S:
    predictions_P_S.csv, predictions_P_S_groups.csv    as the probes write them; label -1 where unlabelled
    plots/P_S_{image,group}.png                        labelled datasets only
    predictions.json                                   classifier, backbone, thresholds; per dataset the numbers of
                                                       images and groups decided positive (+ metrics if labelled)
"""

import argparse
import dataclasses
import logging
import os
from typing import Dict, List, Optional

import numpy as np
import torch

import dinov2.distributed as distributed
from dinov2.eval.features import FeatureSet, setup_feature_store
from dinov2.eval.metrics import positive_scores
from dinov2.eval.ood import ood_summary
from dinov2.eval.reports import (
    evaluate_split, group_scores, unique_tag, write_csv_atomic, write_json_atomic, write_predictions,
)
from dinov2.eval.saved_probe import SavedProbe, check_backbone, load_probe_classifier
from dinov2.eval.setup import add_inference_arguments, get_classifier_args_parser
from dinov2.eval.utils import run_on_main_process

logger = logging.getLogger("dinov2")

RESULTS_NAME = "predictions.json"


def get_args_parser(
    description: Optional[str] = None,
    parents: Optional[List[argparse.ArgumentParser]] = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    parser = get_classifier_args_parser(description, parents, add_help)
    parser.add_argument("--datasets", dest="dataset_strs", type=str, nargs="+", required=True,
                        help="Datasets to score (labels optional), e.g. BBU:root=R:annotation_file=A")
    parser.add_argument("--batch-size", type=int, default=256, help="Batch size of feature extraction")
    add_inference_arguments(parser)
    return parser


def score_dataset(
    output_dir: str, saved: SavedProbe, features: FeatureSet, tag: str, fpr_target: float
) -> Dict[str, object]:
    """Scores, decisions and (when every image is labelled) metrics of one dataset; writes its files."""
    n_labelled = int((features.labels >= 0).sum())
    labelled = len(features) > 0 and n_labelled == len(features)
    if labelled and features.class_names != saved.class_names:
        raise ValueError(f"{features.dataset_str} has classes {features.class_names} but the classifier "
                         f"{saved.path} was trained on {saved.class_names}")
    features = dataclasses.replace(features, class_names=saved.class_names)
    probs = saved.score(features)
    thresholds = saved.thresholds
    scores = positive_scores(probs) if len(probs) else np.zeros(0)
    groups = group_scores(features, scores, thresholds)
    if labelled:
        entry = evaluate_split(output_dir, saved.probe, features, probs, thresholds, fpr_target, tag=tag)
    else:
        if n_labelled:
            logger.warning(f"{features.dataset_str}: {n_labelled} of {len(features)} images are labelled; metrics "
                           "need every image labelled, so only the predictions are written")
        files = write_predictions(output_dir, f"{saved.probe}_{tag}", features, probs, thresholds, scores=scores,
                                  groups=groups)
        entry = {"files": files}
    group_ids, _, g_scores, _ = groups
    counts = {
        "n_images": len(features),
        "n_labelled": n_labelled,
        "n_positive_images": int((scores >= thresholds["image"]["threshold"]).sum()),
        "n_groups": len(group_ids),
        "n_positive_groups": int((g_scores >= thresholds["group"]["threshold"]).sum()),
        **unfamiliar_images(output_dir, saved, features, tag),
    }
    logger.info(f"{features.dataset_str}: {saved.probe} decides {counts['n_positive_images']} of {counts['n_images']} "
                f"images and {counts['n_positive_groups']} of {counts['n_groups']} groups positive (not "
                f"{saved.class_names[0]!r})")
    if not len(features):
        logger.warning(f"{features.dataset_str} is empty: nothing to score")
    return {"tag": tag, **counts, **entry}


def unfamiliar_images(output_dir: str, saved: SavedProbe, features: FeatureSet, tag: str) -> Dict[str, object]:
    """`unfamiliarity_<probe>_<tag>.csv` (every image's unfamiliarity and flag, dinov2/eval/ood.py) and the count and
    names of the unfamiliar images; None values without a model of them in the classifier."""
    if saved.ood is None:
        return {"n_unfamiliar_images": None, "unfamiliar_images": None}
    with torch.inference_mode():
        unfamiliarity, unfamiliar = (t.numpy() for t in saved.ood(features.cls))
    name = f"unfamiliarity_{saved.probe}_{tag}.csv"
    write_csv_atomic(os.path.join(output_dir, name), ["img_path", "group_id", "unfamiliarity", "unfamiliar"],
                     [[path, gid, float(u), int(flag)] for path, gid, u, flag
                      in zip(features.img_paths, features.group_ids, unfamiliarity, unfamiliar)])
    flagged = [path for path, flag in zip(features.img_paths, unfamiliar) if flag]
    if flagged:
        logger.warning(f"{features.dataset_str}: {len(flagged)} of {len(features)} images are unfamiliar (unlike the "
                       f"classifier's training images; expected about {1 - saved.ood_params['quantile']:.0%} of "
                       f"familiar ones): their scores are not to be trusted; see {name}")
    return {"n_unfamiliar_images": len(flagged), "unfamiliar_images": flagged}


def write_all_predictions(args: argparse.Namespace, saved: SavedProbe, splits: List[FeatureSet]) -> Dict[str, object]:
    """Score every dataset and write `predictions.json` (main process)."""
    results = {
        "classifier": os.path.abspath(saved.path),
        "probe": saved.probe,
        "pretrained_weights": args.pretrained_weights,
        "backbone_sha256": saved.source["backbone_sha256"],
        "eval_transform": saved.source["eval_transform"],
        "class_names": saved.class_names,
        "thresholds": saved.thresholds,
        "ood": ood_summary(saved.ood_params),
        "fpr_target": args.fpr_target,
        "datasets": {},
    }
    tags = set()
    for split in splits:
        tag = unique_tag(split.tag, tags)
        results["datasets"][split.dataset_str] = score_dataset(args.output_dir, saved, split, tag, args.fpr_target)
    write_json_atomic(os.path.join(args.output_dir, RESULTS_NAME), results)
    return results


def run_predict(args: argparse.Namespace) -> Optional[Dict[str, object]]:
    """Load the classifier, extract the datasets' features as its training features were, refuse another backbone,
    score and write on the main process. Returns the results there, None on the other ranks."""
    saved = load_probe_classifier(args.classifier)
    source = saved.source
    for key in ("resize_size", "crop_size", "draft_reducing_gap"):
        setattr(args, key, source["eval_transform"][key])
    args.threshold_policy = saved.thresholds["policy"]
    args.group_aggregation = saved.thresholds["group_aggregation"]
    store = setup_feature_store(args, stat_images=True)  # re-shot images under old names are extracted again
    check_backbone(saved, store.source["backbone_sha256"], args.pretrained_weights, store.source["model"])
    splits = [store.get(dataset_str) for dataset_str in dict.fromkeys(args.dataset_strs)]  # each dataset once
    return run_on_main_process(write_all_predictions, args, saved, splits)


def main(args: argparse.Namespace) -> int:
    run_predict(args)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    distributed.exit_now(main(get_args_parser(description="Score images with a saved DINOv2 probe").parse_args()))
