"""Explain a saved probe's decisions device by device: heat maps of every photo, in a QC report.

    python -m dinov2.eval.explain --config-file C --pretrained-weights W \\
        --classifier <probe output dir>/linear_classifier.pth --datasets BBU:root=R:split=TEST --output-dir D \\
        [--select positive|errors|all] [--groups 17 42] [--max-groups 50]

Every device of the datasets is scored as `dinov2.eval.predictor.Predictor` scores it (same backbone check, eval
transform, classifier and thresholds). The selected devices (`--select`: decided positive, the default; decided
against their labels; all of them; or the `--groups` named), highest score first and at most `--max-groups` per dataset,
are explained with the maps of `dinov2.eval.saliency`: where the photo's evidence for "positive" lies, where the
backbone looks, and the parts it tells apart.

Outputs in --output-dir, for dataset tag S and device G:
    report.html                 the selected devices, highest score first: scores, decisions, labels, figures
    explanations.json           classifier, thresholds; per dataset the selection and per device its images' scores,
                                decisions, unfamiliarity and the crop box of most positive evidence
    devices/S_G.png             the device's photos (eval crop) beside their evidence, attention and PCA maps
    devices/S_G.npz             the maps as arrays (paths, evidence, attention, pca, scores) for other tools
"""

import argparse
import html
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from dinov2.data.loaders import make_dataset
from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from dinov2.eval.features import dataset_group_ids, split_tag
from dinov2.eval.predictor import Predictor
from dinov2.eval.reports import unique_tag, write_json_atomic
from dinov2.eval.saliency import Explanation
from dinov2.eval.setup import non_negative_int, get_classifier_args_parser
from dinov2.logging import setup_logging
from dinov2.utils.utils import atomic_write

logger = logging.getLogger("dinov2")

RESULTS_NAME = "explanations.json"
REPORT_NAME = "report.html"
SELECTIONS = ("positive", "errors", "all")
SCORE_BATCH = 64  # images scored at once while selecting the devices
MAPS = {
    "evidence": "gradient x input of the positive log-odds on each patch's embedding (its content, before the "
                "position embedding), summed over channels: to first order, how much the log-odds would fall without "
                "the patch's content; red pushes towards positive, blue towards the first class",
    "attention": "the class token's attention to each patch in the last block, mean over heads",
    "pca": "the first three principal components of the last block's patch tokens of the device's photos, as RGB",
}


def get_args_parser(
    description: Optional[str] = None,
    parents: Optional[List[argparse.ArgumentParser]] = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    parser = get_classifier_args_parser(description, parents, add_help)
    parser.add_argument("--datasets", dest="dataset_strs", type=str, nargs="+", required=True,
                        help="Datasets whose devices to explain (labels optional), e.g. BBU:root=R:split=TEST")
    parser.add_argument("--select", choices=SELECTIONS, default="positive",
                        help="Devices to explain: decided positive, decided against their labels (labelled datasets "
                             "only) or all")
    parser.add_argument("--groups", nargs="+", default=None,
                        help="Explain these group (device) ids instead of --select; each must be in every dataset")
    parser.add_argument("--max-groups", type=non_negative_int, default=50,
                        help="At most this many devices per dataset, highest score first (0: no limit)")
    parser.add_argument("--decode-threads", type=int, default=4, help="Threads decoding a device's photos")
    return parser


def dataset_groups(dataset, dataset_str: str) -> Dict[str, List[Tuple[str, int]]]:
    """group id -> [(image path, label (-1: none)), ...] in dataset order."""
    group_ids = dataset_group_ids(dataset, dataset_str)
    labels = np.asarray(dataset.get_targets(), dtype=np.int64)
    groups: Dict[str, List[Tuple[str, int]]] = {}
    for i, gid in enumerate(group_ids):
        groups.setdefault(gid, []).append((dataset.get_image_path(i), int(labels[i])))
    return groups


def group_label(images: Sequence[Tuple[str, int]]) -> Optional[int]:
    """A device's label: 1 if any photo is not class 0, else 0; None unless every photo is labelled."""
    labels = [label for _, label in images]
    return None if min(labels) < 0 else int(max(labels) > 0)


def select_groups(predictor: Predictor, groups: Dict[str, List[Tuple[str, int]]], dataset_str: str,
                  select: str, named: Optional[Sequence[str]], max_groups: int) -> Tuple[List[str], Dict[str, object]]:
    """The group ids to explain, highest group score first, and a record of the selection."""
    n_groups = len(groups)
    if named is not None:
        missing = [gid for gid in named if gid not in groups]
        if missing:
            raise ValueError(f"--groups {missing} are not in {dataset_str} (it has {len(groups)} groups)")
        groups = {gid: groups[gid] for gid in dict.fromkeys(named)}
    elif select == "errors" and any(group_label(images) is None for images in groups.values()):
        raise ValueError(f"--select errors needs every image labelled; {dataset_str} has unlabelled images")
    scores = group_scores(predictor, groups)
    threshold = predictor.thresholds["group"]["threshold"]
    if named is not None or select == "all":
        candidates = list(groups)
    elif select == "positive":
        candidates = [gid for gid in groups if scores[gid] >= threshold]
    else:
        candidates = [gid for gid in groups if int(scores[gid] >= threshold) != group_label(groups[gid])]
    chosen = sorted(candidates, key=lambda gid: -scores[gid])
    limited = chosen[:max_groups] if max_groups else chosen
    record = {"select": "groups" if named is not None else select, "n_groups": n_groups,
              "n_candidates": len(candidates), "n_explained": len(limited),
              "left_out_by_max_groups": chosen[len(limited):]}
    if len(limited) < len(chosen):
        logger.warning(f"{dataset_str}: {len(chosen) - len(limited)} of {len(chosen)} selected devices left out by "
                       f"--max-groups {max_groups} (listed in {RESULTS_NAME})")
    return limited, record


def group_scores(predictor: Predictor, groups: Dict[str, List[Tuple[str, int]]]) -> Dict[str, float]:
    """Group id -> the predictor's group score, scoring whole groups of about SCORE_BATCH photos per call."""
    scores: Dict[str, float] = {}
    pending: List[str] = []

    def flush() -> None:
        result = predictor.score([path for g in pending for path, _ in groups[g]],
                                 [g for g in pending for _ in groups[g]])
        scores.update((group["group_id"], group["score"]) for group in result["groups"])
        pending.clear()

    for gid in groups:
        pending.append(gid)
        if sum(len(groups[g]) for g in pending) >= SCORE_BATCH:
            flush()
    if pending:
        flush()
    return scores


def file_stem(tag: str, group_id: str, used: set) -> str:
    """A file name for a device: the dataset tag and its id with characters other than [A-Za-z0-9_.-] replaced,
    numbered when two ids map to the same name."""
    stem = f"{tag}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', group_id)}"
    return unique_tag(stem, used)


def crop_pixels(images: torch.Tensor) -> np.ndarray:
    """Eval-transformed images (N, 3, S, S) -> (N, S, S, 3) RGB in [0, 1] (the normalisation undone)."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def render_device(path: str, images: torch.Tensor, explanation: Explanation, result: Dict[str, List[Dict]],
                  patch_size: int, title: str) -> None:
    """One row per photo: the eval crop, its evidence (one colour scale for the device, so the photos compare), its
    attention and its PCA map, overlaid on the crop; written atomically as a PNG."""
    pixels = crop_pixels(images)
    n = len(pixels)
    rows, cols = explanation.evidence.shape[1:]
    extent = (0, cols * patch_size, rows * patch_size, 0)  # the crop area the patch grid covers
    scale = float(np.abs(explanation.evidence).max()) or 1.0
    figure = Figure(figsize=(10.5, 2.9 * n + 0.5))
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=10)
    for i in range(n):
        image = result["images"][i]
        gray = pixels[i].mean(axis=2)
        name = os.path.basename(image["path"])
        unfamiliar = " (unfamiliar)" if image["unfamiliar"] else ""
        panels = [
            (f"{name}: {image['score']:.3f} {'positive' if image['positive'] else 'negative'}{unfamiliar}", None),
            ("evidence for positive", "evidence"),
            ("class-token attention", "attention"),
            ("patch PCA", "pca"),
        ]
        for j, (label, key) in enumerate(panels):
            axes = figure.add_subplot(n, 4, 4 * i + j + 1)
            axes.set_axis_off()
            axes.set_title(label, fontsize=8)
            if key is None:
                axes.imshow(pixels[i])
            elif key == "evidence":
                axes.imshow(gray, cmap="gray")
                axes.imshow(explanation.evidence[i], cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -scale, scale), alpha=0.6,
                            extent=extent, interpolation="bilinear")
            elif key == "attention":
                axes.imshow(gray, cmap="gray")
                axes.imshow(explanation.attention[i], cmap="inferno", alpha=0.6, extent=extent,
                            interpolation="bilinear")
            else:
                axes.imshow(explanation.pca[i], extent=extent, interpolation="nearest")
            axes.set_xlim(0, pixels.shape[2])
            axes.set_ylim(pixels.shape[1], 0)
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=80))


def save_maps(path: str, explanation: Explanation, result: Dict[str, List[Dict]]) -> None:
    arrays = {
        "paths": np.array([image["path"] for image in result["images"]]),
        "scores": np.array([image["score"] for image in result["images"]]),
        "evidence": explanation.evidence,
        "attention": explanation.attention,
        "pca": explanation.pca,
    }
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def explain_group(predictor: Predictor, output_dir: str, stem: str, group_id: str,
                  images: List[Tuple[str, int]]) -> Dict[str, object]:
    """Explain one device: its figure and maps files, and its entry of `explanations.json`."""
    result, explanation, batch = predictor.explain([path for path, _ in images], [group_id] * len(images))
    (group,) = result["groups"]
    label = group_label(images)
    verdict = "POSITIVE" if group["positive"] else "negative"
    title = (f"device {group_id}: score {group['score']:.3f} (threshold "
             f"{predictor.thresholds['group']['threshold']:.3f}) -> {verdict}"
             + ("" if label is None else f"; label {predictor.saved.class_names[0] if label == 0 else 'positive'}"))
    figure, maps = f"devices/{stem}.png", f"devices/{stem}.npz"
    render_device(os.path.join(output_dir, figure), batch, explanation, result, predictor.patch_size, title)
    save_maps(os.path.join(output_dir, maps), explanation, result)
    for image, (_, image_label) in zip(result["images"], images):
        image["label"] = None if image_label < 0 else image_label
    return {**group, "label": label, "figure": figure, "maps": maps, "images": result["images"]}


def write_html_report(path: str, results: Dict[str, object]) -> None:
    """A static page: per dataset a table of the explained devices, then each device's figure."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>QC explanations</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:3px 8px}.pos{color:#b00;font-weight:bold}img{max-width:100%}</style></head><body>",
        f"<h1>QC explanations: {e(results['probe'])} probe</h1>",
        f"<p>Classifier <code>{e(results['classifier'])}</code>, group threshold "
        f"{results['thresholds']['group']['threshold']:.4f} ({e(results['thresholds']['group_aggregation'])} of the "
        "images), image threshold " f"{results['thresholds']['image']['threshold']:.4f}.</p><ul>",
        *(f"<li><b>{e(name)}</b>: {e(text)}</li>" for name, text in MAPS.items()),
        "</ul>",
    ]
    for dataset_str, entry in results["datasets"].items():
        selection = entry["selection"]
        parts.append(f"<h2>{e(dataset_str)}</h2><p>{selection['n_explained']} of {selection['n_groups']} devices "
                     f"explained (selection: {e(selection['select'])}; {selection['n_candidates']} selected, "
                     f"{len(selection['left_out_by_max_groups'])} left out by --max-groups).</p>")
        parts.append("<table><tr><th>device</th><th>photos</th><th>score</th><th>decision</th><th>label</th>"
                     "<th>unfamiliar photos</th><th>most positive evidence</th></tr>")
        for group in entry["groups"]:
            peak = max(group["images"], key=lambda image: image["evidence_peak"]["value"])
            decision = "<span class='pos'>positive</span>" if group["positive"] else "negative"
            label = "" if group["label"] is None else ("positive" if group["label"] else "negative")
            unfamiliar = "n/a" if group["n_unfamiliar"] is None else group["n_unfamiliar"]
            parts.append(f"<tr><td><a href='#{e(group['figure'])}'>{e(group['group_id'])}</a></td>"
                         f"<td>{group['n_images']}</td><td>{group['score']:.4f}</td><td>{decision}</td>"
                         f"<td>{label}</td><td>{unfamiliar}</td><td>{e(os.path.basename(peak['path']))} box "
                         f"{peak['evidence_peak']['box']}</td></tr>")
        parts.append("</table>")
        for group in entry["groups"]:
            parts.append(f"<h3 id='{e(group['figure'])}'>device {e(group['group_id'])}</h3>"
                         f"<img src='{e(group['figure'])}' alt='device {e(group['group_id'])}'>")
    parts.append("</body></html>\n")
    atomic_write(path, lambda f: f.write("\n".join(parts)), binary=False)


def run_explain(args: argparse.Namespace) -> Dict[str, object]:
    """Select, explain and report the devices of every dataset; returns the content of `explanations.json`."""
    predictor = Predictor(args.config_file, args.pretrained_weights, args.classifier, args.opts, args.decode_threads)
    os.makedirs(os.path.join(args.output_dir, "devices"), exist_ok=True)
    results = {
        "classifier": os.path.abspath(args.classifier),
        "probe": predictor.saved.probe,
        "pretrained_weights": args.pretrained_weights,
        "backbone_sha256": predictor.saved.source["backbone_sha256"],
        "class_names": predictor.saved.class_names,
        "thresholds": predictor.thresholds,
        "maps": MAPS,
        "datasets": {},
    }
    tags: set = set()
    stems: set = set()
    for dataset_str in dict.fromkeys(args.dataset_strs):
        dataset = make_dataset(dataset_str=dataset_str)
        names = getattr(dataset, "class_names", None)
        labels = np.asarray(dataset.get_targets())
        if names and (labels >= 0).any() and list(names) != predictor.saved.class_names:
            raise ValueError(f"{dataset_str} has classes {list(names)} but the classifier {args.classifier} was "
                             f"trained on {predictor.saved.class_names}")
        groups = dataset_groups(dataset, dataset_str)
        tag = unique_tag(split_tag(dataset_str), tags)
        chosen, selection = select_groups(predictor, groups, dataset_str, args.select, args.groups, args.max_groups)
        logger.info(f"{dataset_str}: explaining {len(chosen)} of {len(groups)} devices ({selection['select']})")
        explained = [explain_group(predictor, args.output_dir, file_stem(tag, gid, stems), gid, groups[gid])
                     for gid in chosen]
        results["datasets"][dataset_str] = {"tag": tag, "selection": selection, "groups": explained}
    write_json_atomic(os.path.join(args.output_dir, RESULTS_NAME), results)
    write_html_report(os.path.join(args.output_dir, REPORT_NAME), results)
    logger.info(f"Wrote {os.path.join(args.output_dir, REPORT_NAME)}")
    return results


def main(args: argparse.Namespace) -> int:
    if not args.output_dir:
        raise ValueError("--output-dir is required")
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    if world_size > 1:
        raise ValueError(f"dinov2.eval.explain runs in one process, not {world_size} (torchrun or SLURM tasks): "
                         "start it with python, or submit it with --ngpus 1 --nodes 1")
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logging(output=args.output_dir, level=logging.INFO)
    run_explain(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser(description="Explain a saved DINOv2 probe's decisions").parse_args()))
