"""Explain a saved probe's decisions device by device: heat maps of every photo, in a QC report.

    python -m dinov2.eval.explain --config-file C --pretrained-weights W \\
        --classifier <probe output dir>/linear_classifier.pth --datasets BBU:root=R:split=TEST --output-dir D \\
        [--select positive|errors|all] [--groups 17 42] [--max-groups 50] [--anomaly-reference BBU:root=R:split=TRAIN]

Every device of the datasets is scored as `dinov2.eval.predictor.Predictor` scores it (same backbone check, eval
transform, classifier and thresholds). The selected devices (`--select`: decided positive, the default; decided
against their labels; all of them; or the `--groups` named), highest score first and at most `--max-groups` per dataset,
are explained with the maps of `dinov2.eval.saliency`: where the photo's evidence for "positive" lies, where the
backbone looks, and the parts it tells apart; with `--anomaly-reference`, also where the photo is unlike every patch
of the reference dataset's good photos (`PatchBank`, about `--anomaly-bank-size` of their patches).

Outputs in --output-dir, for dataset tag S and device G:
    report.html                 the selected devices, highest score first: scores, decisions, labels, figures
    explanations.json           classifier, thresholds, anomaly reference; per dataset the selection and per device its
                                images' scores, decisions, unfamiliarity and the crop boxes of most positive evidence
                                and of most anomaly
    devices/S_G.png             the device's photos (eval crop) beside their evidence, attention, PCA (and anomaly) maps
    devices/S_G.npz             the maps as arrays (paths, scores, evidence, attention, pca[, anomaly]) for other tools
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
from dinov2.eval.saliency import Explanation, PatchBank, map_peak
from dinov2.eval.setup import get_classifier_args_parser, non_negative_int, positive_int
from dinov2.logging import setup_logging
from dinov2.utils.utils import atomic_write

logger = logging.getLogger("dinov2")

RESULTS_NAME = "explanations.json"
REPORT_NAME = "report.html"
SELECTIONS = ("positive", "errors", "all")
MAPS = {
    "evidence": "gradient x input of the positive log-odds on each patch's embedding (its content, before the "
                "position embedding), summed over channels: to first order, how much the log-odds would fall without "
                "the patch's content; red pushes towards positive, blue towards the first class",
    "attention": "the class token's attention to each patch in the last block, mean over heads",
    "pca": "the first three principal components of the last block's patch tokens of the device's photos, as RGB",
    "anomaly": "the cosine distance of each patch token to the nearest patch of the reference photos (good devices, "
               "--anomaly-reference): high where the photo is unlike all of them, whatever the classifier learnt",
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
    parser.add_argument("--decode-threads", type=positive_int, default=4, help="Threads decoding a device's photos")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="About this many photos per backbone call when scoring the devices to select them and "
                             "when reading the anomaly reference")
    add_anomaly_arguments(parser)
    return parser


def add_anomaly_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the anomaly map (explain, and the scoring service's explanations)."""
    parser.add_argument("--anomaly-reference", default=None,
                        help="Dataset of good devices (its photos labelled with the first class; all photos if it has "
                             "no labels) whose patches the anomaly map compares with, e.g. BBU:root=R:split=TRAIN")
    parser.add_argument("--anomaly-bank-size", type=positive_int, default=100_000,
                        help="About this many reference patches, drawn evenly from the reference photos")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the draw of the reference patches")


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
                  select: str, named: Optional[Sequence[str]], max_groups: int, batch_size: int
                  ) -> Tuple[List[str], Dict[str, object]]:
    """The group ids to explain, highest group score first, and a record of the selection."""
    n_groups = len(groups)
    if named is not None:
        missing = [gid for gid in named if gid not in groups]
        if missing:
            raise ValueError(f"--groups {missing} are not in {dataset_str} (it has {len(groups)} groups)")
        groups = {gid: groups[gid] for gid in dict.fromkeys(named)}
    elif select == "errors" and any(group_label(images) is None for images in groups.values()):
        raise ValueError(f"--select errors needs every image labelled; {dataset_str} has unlabelled images")
    scores = group_scores(predictor, groups, batch_size)
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


def group_scores(predictor: Predictor, groups: Dict[str, List[Tuple[str, int]]], batch_size: int
                 ) -> Dict[str, float]:
    """Group id -> the predictor's group score, scoring whole groups, at least `batch_size` photos per call (but the
    last)."""
    scores: Dict[str, float] = {}
    pending: List[str] = []

    def flush() -> None:
        result = predictor.score([path for g in pending for path, _ in groups[g]],
                                 [g for g in pending for _ in groups[g]])
        scores.update((group["group_id"], group["score"]) for group in result["groups"])
        pending.clear()

    for gid in groups:
        pending.append(gid)
        if sum(len(groups[g]) for g in pending) >= batch_size:
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


PANELS = {  # map -> panel title; the figure's columns after the photo, in this order
    "evidence": "evidence for positive",
    "attention": "class-token attention",
    "pca": "patch PCA",
    "anomaly": "unlike the reference photos",
}


def device_maps(explanation: Explanation, bank: Optional[PatchBank]) -> Dict[str, np.ndarray]:
    """The maps of a device's photos: those of `explanation`, + `anomaly` (N, h, w) with a patch bank."""
    maps = {"evidence": explanation.evidence, "attention": explanation.attention, "pca": explanation.pca}
    if bank is not None:
        maps["anomaly"] = bank.anomaly(explanation.patch_tokens).reshape(explanation.evidence.shape)
    return maps


def render_device(path: str, images: torch.Tensor, maps: Dict[str, np.ndarray], result: Dict[str, List[Dict]],
                  patch_size: int, title: str) -> None:
    """One row per photo: the eval crop and its maps overlaid on it, evidence and anomaly each on one colour scale for
    the device (so its photos compare), attention per photo; written atomically as a PNG."""
    pixels = crop_pixels(images)
    n, columns = len(pixels), 1 + len(maps)
    rows, cols = maps["evidence"].shape[1:]
    extent = (0, cols * patch_size, rows * patch_size, 0)  # the crop area the patch grid covers
    evidence_scale = float(np.abs(maps["evidence"]).max()) or 1.0
    styles = {
        "evidence": {"cmap": "RdBu_r", "norm": TwoSlopeNorm(0.0, -evidence_scale, evidence_scale)},
        "attention": {"cmap": "inferno"},
        "anomaly": {"cmap": "magma", "vmin": 0.0, "vmax": float(maps["anomaly"].max()) or 1.0} if "anomaly" in maps
        else {},
    }
    figure = Figure(figsize=(2.6 * columns + 0.1, 2.9 * n + 0.5))
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=10)
    for i, image in enumerate(result["images"]):
        unfamiliar = " (unfamiliar)" if image["unfamiliar"] else ""
        decision = "positive" if image["positive"] else "negative"
        titles = [f"{os.path.basename(image['path'])}: {image['score']:.3f} {decision}{unfamiliar}",
                  *(PANELS[key] for key in maps)]
        for j, (label, key) in enumerate(zip(titles, [None, *maps])):
            axes = figure.add_subplot(n, columns, columns * i + j + 1)
            axes.set_axis_off()
            axes.set_title(label, fontsize=8)
            if key is None:
                axes.imshow(pixels[i])
            elif key == "pca":
                axes.imshow(maps[key][i], extent=extent, interpolation="nearest")
            else:
                axes.imshow(pixels[i].mean(axis=2), cmap="gray")
                axes.imshow(maps[key][i], alpha=_overlay_alpha(key, maps[key][i], styles[key]), extent=extent,
                            interpolation="bilinear", **styles[key])
            axes.set_xlim(0, pixels.shape[2])
            axes.set_ylim(pixels.shape[1], 0)
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=80))


def _overlay_alpha(key: str, grid_map: np.ndarray, style: Dict[str, object]):
    """Opacity of a map over the photo: for evidence and anomaly it grows with the value's share of the device's scale
    (0.1 to 0.8), so weak values leave the photo visible; attention 0.6 everywhere."""
    if key == "attention":
        return 0.6
    scale = style["norm"].vmax if key == "evidence" else style["vmax"]
    return 0.1 + 0.7 * np.clip(np.abs(grid_map) / scale, 0.0, 1.0)


def save_maps(path: str, maps: Dict[str, np.ndarray], result: Dict[str, List[Dict]]) -> None:
    arrays = {
        "paths": np.array([image["path"] for image in result["images"]]),
        "scores": np.array([image["score"] for image in result["images"]]),
        **maps,
    }
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def explain_group(predictor: Predictor, output_dir: str, stem: str, group_id: str, images: List[Tuple[str, int]],
                  bank: Optional[PatchBank]) -> Dict[str, object]:
    """Explain one device: its figure and maps files, and its entry of `explanations.json`."""
    result, explanation, batch = predictor.explain([path for path, _ in images], [group_id] * len(images))
    maps = device_maps(explanation, bank)
    (group,) = result["groups"]
    label = group_label(images)
    verdict = "POSITIVE" if group["positive"] else "negative"
    title = (f"device {group_id}: score {group['score']:.3f} (threshold "
             f"{predictor.thresholds['group']['threshold']:.3f}) -> {verdict}"
             + ("" if label is None else f"; label {predictor.saved.class_names[0] if label == 0 else 'positive'}"))
    figure, maps_file = f"devices/{stem}.png", f"devices/{stem}.npz"
    render_device(os.path.join(output_dir, figure), batch, maps, result, predictor.patch_size, title)
    save_maps(os.path.join(output_dir, maps_file), maps, result)
    for i, (image, (_, image_label)) in enumerate(zip(result["images"], images)):
        image["label"] = None if image_label < 0 else image_label
        image["anomaly_peak"] = map_peak(maps["anomaly"][i], predictor.patch_size) if bank is not None else None
    return {**group, "label": label, "figure": figure, "maps": maps_file, "images": result["images"]}


def build_patch_bank(predictor: Predictor, dataset_str: str, max_patches: int, seed: int, batch_size: int = 64
                     ) -> Tuple[PatchBank, Dict[str, object]]:
    """The patch bank of a reference dataset's good photos: those labelled with the first class, or every photo of a
    dataset with no labels at all (a pool of good devices); and a record of it."""
    dataset = make_dataset(dataset_str=dataset_str)
    labels = np.asarray(dataset.get_targets(), dtype=np.int64)
    keep = labels == 0 if (labels >= 0).any() else np.ones(len(labels), dtype=bool)
    paths = [dataset.get_image_path(i) for i in np.flatnonzero(keep)]
    if not paths:
        raise ValueError(f"--anomaly-reference {dataset_str} has no photo labelled {predictor.saved.class_names[0]!r}"
                         " (class 0) to take the reference patches from")
    logger.info(f"Patch bank: at most about {max_patches} patches of {len(paths)} reference photos of {dataset_str}")
    bank = PatchBank.sample(predictor.patch_tokens(paths, batch_size), len(paths), max_patches, seed)
    return bank, {"dataset": dataset_str, "n_images": len(paths), "n_patches": len(bank), "seed": seed}


def _peak_cell(group: Dict[str, object], key: str) -> str:
    """The photo of a device with the highest peak of a map: its name, the patch's crop box and the value."""
    image = max(group["images"], key=lambda image: image[key]["value"])
    return (f"{html.escape(os.path.basename(image['path']))} box {image[key]['box']} "
            f"({image[key]['value']:.3g})")


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
        *(f"<li><b>{e(name)}</b>: {e(text)}</li>" for name, text in results["maps"].items()),
        "</ul>",
    ]
    reference = results["anomaly_reference"]
    if reference:
        parts.append(f"<p>Anomaly reference: {reference['n_patches']} patches of {reference['n_images']} photos of "
                     f"{e(reference['dataset'])}.</p>")
    for dataset_str, entry in results["datasets"].items():
        selection = entry["selection"]
        parts.append(f"<h2>{e(dataset_str)}</h2><p>{selection['n_explained']} of {selection['n_groups']} devices "
                     f"explained (selection: {e(selection['select'])}; {selection['n_candidates']} selected, "
                     f"{len(selection['left_out_by_max_groups'])} left out by --max-groups).</p>")
        parts.append("<table><tr><th>device</th><th>photos</th><th>score</th><th>decision</th><th>label</th>"
                     "<th>unfamiliar photos</th><th>most positive evidence</th>"
                     + ("<th>most unlike the reference</th>" if reference else "") + "</tr>")
        for group in entry["groups"]:
            decision = "<span class='pos'>positive</span>" if group["positive"] else "negative"
            label = "" if group["label"] is None else ("positive" if group["label"] else "negative")
            unfamiliar = "n/a" if group["n_unfamiliar"] is None else group["n_unfamiliar"]
            parts.append(f"<tr><td><a href='#{e(group['figure'])}'>{e(group['group_id'])}</a></td>"
                         f"<td>{group['n_images']}</td><td>{group['score']:.4f}</td><td>{decision}</td>"
                         f"<td>{label}</td><td>{unfamiliar}</td><td>{_peak_cell(group, 'evidence_peak')}</td>"
                         + (f"<td>{_peak_cell(group, 'anomaly_peak')}</td>" if reference else "") + "</tr>")
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
        "maps": {key: text for key, text in MAPS.items() if key != "anomaly" or args.anomaly_reference},
        "anomaly_reference": None,
        "datasets": {},
    }
    bank = None
    if args.anomaly_reference:
        bank, results["anomaly_reference"] = build_patch_bank(predictor, args.anomaly_reference,
                                                              args.anomaly_bank_size, args.seed, args.batch_size)
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
        chosen, selection = select_groups(predictor, groups, dataset_str, args.select, args.groups, args.max_groups,
                                          args.batch_size)
        logger.info(f"{dataset_str}: explaining {len(chosen)} of {len(groups)} devices ({selection['select']})")
        explained = [explain_group(predictor, args.output_dir, file_stem(tag, gid, stems), gid, groups[gid], bank)
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
