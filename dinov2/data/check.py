"""Dataset checker: `python -m dinov2.data.check BBU:root=<R> [--no-decode] [--json]`.

Scans every split of a BBU dataset (or the one split / annotation file the string names) and reports, without
stopping at the first problem: entries per class and split, groups whose size differs from the majority, groups with
mixed labels, groups present in two splits (leakage), duplicate image paths, identical image files under different
paths (a copy in another split is leakage the group ids do not show), missing or unreadable images (every image is
read and decoded unless `--no-decode`) and image size statistics. Exit code 1 when an error is found
(missing/unreadable images, leakage, duplicate paths, identical files in different splits, bad annotations), 0
otherwise (warnings: group sizes, mixed labels, identical files within a split, missing splits). Photos that are
alike but not identical take a backbone to find: `dinov2.eval.duplicates`.
"""

import argparse
import hashlib
import json
import os
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from .datasets.bbu_data import UNLABELLED, BBUDataset, load_bbu_annotations
from .datasets.decoders import IMAGE_ERRORS
from .loaders import _parse_dataset_str

_PRINT_LIMIT = 20


def read_image(path: str, decode: bool) -> Tuple[str, Optional[Tuple[int, int]], str]:
    """(status, (width, height) or None, message) with status "ok", "missing" or "unreadable" (decoded when `decode`;
    also used by `dinov2.data.annotate --check`)."""
    if not os.path.isfile(path):
        return "missing", None, f"image not found: {path}"
    if not decode:
        return "ok", None, ""
    try:
        with Image.open(path) as image:
            image.load()
            return "ok", image.size, ""
    except IMAGE_ERRORS as e:
        return "unreadable", None, f"unreadable image: {path}: {type(e).__name__}: {e}"


def _size_stats(sizes: List[Tuple[int, int]]) -> Dict:
    if not sizes:
        return {"count": 0}
    widths, heights = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
    return {
        "count": len(sizes),
        "width": {"min": int(widths.min()), "median": float(np.median(widths)), "max": int(widths.max())},
        "height": {"min": int(heights.min()), "median": float(np.median(heights)), "max": int(heights.max())},
        "most_common": [[f"{w}x{h}", n] for (w, h), n in Counter(sizes).most_common(5)],
    }


@dataclass
class _Findings:
    errors: List[Dict[str, str]] = field(default_factory=list)
    warnings: List[Dict[str, str]] = field(default_factory=list)

    def error(self, kind: str, message: str) -> None:
        self.errors.append({"kind": kind, "message": message})

    def warning(self, kind: str, message: str) -> None:
        self.warnings.append({"kind": kind, "message": message})


@dataclass
class _Entries:
    """What the annotation files list, gathered over splits."""

    splits: Dict[str, Dict] = field(default_factory=dict)  # per-split summary
    groups: Dict[Tuple[str, str], List[int]] = field(default_factory=lambda: defaultdict(list))  # (split, id) -> labels
    owners: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))  # img_path -> ["SPLIT entry i"]
    places: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))  # img_path -> ["SPLIT group g"]


def _scan_annotations(files: Dict[str, str], findings: _Findings) -> _Entries:
    entries = _Entries()
    class_names: Optional[List[str]] = None
    for split, path in files.items():
        if not os.path.isfile(path):
            findings.warning("missing_split", f"{split}: annotation file not found: {path}")
            continue
        entry_errors: List[str] = []
        try:
            annotations = load_bbu_annotations(path, errors=entry_errors)
        except (OSError, ValueError) as e:
            findings.error("annotation", str(e))
            continue
        for message in entry_errors:
            findings.error("annotation", message)
        if class_names is not None and annotations.class_names != class_names:
            findings.warning("classes", f"{split}: classes {annotations.class_names} differ from {class_names}")
        class_names = class_names or annotations.class_names
        labels = annotations.labels
        group_ids = np.char.decode(annotations.group_ids, "utf-8").tolist()
        img_paths = np.char.decode(annotations.img_paths, "utf-8").tolist()
        for index, group_id, label, img_path in zip(annotations.entry_indices, group_ids, labels.tolist(), img_paths):
            entries.groups[(split, group_id)].append(label)
            entries.owners[os.path.normpath(img_path)].append(f"{split} entry {index}")
            entries.places[os.path.normpath(img_path)].append(f"{split} group {group_id}")
        per_class = {name: int((labels == i).sum()) for i, name in enumerate(annotations.class_names)}
        per_class["unlabelled"] = int((labels == UNLABELLED).sum())
        entries.splits[split] = {
            "annotation_file": path,
            "entries": len(labels),
            "groups": len(set(group_ids)),
            "per_class": per_class,
        }
    return entries


def _check_groups_and_paths(entries: _Entries, findings: _Findings) -> int:
    """Group sizes, label agreement, leakage across splits, duplicate paths; returns the majority group size."""
    group_sizes = Counter(len(v) for v in entries.groups.values())
    majority = group_sizes.most_common(1)[0][0] if group_sizes else 0
    splits_of_group: Dict[str, List[str]] = defaultdict(list)
    for (split, group_id), labels in sorted(entries.groups.items()):
        splits_of_group[group_id].append(split)
        if len(labels) != majority:
            findings.warning("group_size", f"{split} group {group_id}: {len(labels)} images (majority {majority})")
        if len(set(labels)) > 1:
            findings.warning("mixed_labels", f"{split} group {group_id}: labels {sorted(set(labels))}")
    for group_id, in_splits in sorted(splits_of_group.items()):
        if len(in_splits) > 1:
            findings.error("leakage", f"group {group_id} is in several splits: {', '.join(in_splits)}")
    for img_path, owners in sorted(entries.owners.items()):
        if len(owners) > 1:
            findings.error("duplicate_path", f"{img_path} is listed {len(owners)} times: {', '.join(owners)}")
    return majority


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read_and_digest(path: str, decode: bool) -> Tuple[Tuple[str, Optional[Tuple[int, int]], str], Optional[str]]:
    """`read_image`'s answer and, for a decoded readable image, the SHA-256 of its bytes."""
    result = read_image(path, decode)
    return result, _file_digest(path) if decode and result[0] == "ok" else None


def _check_identical_files(digests: Dict[str, str], places: Dict[str, List[str]], findings: _Findings) -> None:
    """Different paths with the same bytes: an error when they are in different splits, else a warning."""
    paths_of: Dict[str, List[str]] = defaultdict(list)
    for img_path, digest in sorted(digests.items()):
        paths_of[digest].append(img_path)
    for paths in paths_of.values():
        if len(paths) < 2:
            continue
        where = [place for p in paths for place in places[p]]
        message = "identical files: " + ", ".join(f"{p} ({', '.join(places[p])})" for p in paths)
        if len({place.split(" ", 1)[0] for place in where}) > 1:
            findings.error("identical_files", message)
        else:
            findings.warning("identical_files", message)


def _check_images(
    root: str, entries: _Entries, decode: bool, num_workers: int, findings: _Findings
) -> List[Tuple[int, int]]:
    """Read (or only stat) every listed image in threads, and compare the files' bytes; returns the decoded sizes."""
    owners = entries.owners
    paths = sorted(owners)
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        results = list(pool.map(lambda p: _read_and_digest(os.path.join(root, p), decode), paths))
    sizes, digests = [], {}
    for img_path, ((status, size, message), digest) in zip(paths, results):
        if status != "ok":
            findings.error(f"{status}_image", f"{message} ({', '.join(owners[img_path])})")
        elif size is not None:
            sizes.append(size)
        if digest is not None:
            digests[img_path] = digest
    _check_identical_files(digests, entries.places, findings)
    return sizes


def check_bbu(
    root: str,
    splits: Optional[List[str]] = None,
    annotation_file: Optional[str] = None,
    decode: bool = True,
    num_workers: int = 8,
) -> Dict:
    """Check a BBU dataset; returns the report dict (keys: root, decoded, splits, majority_group_size, image_sizes,
    errors, warnings; each error/warning is {"kind", "message"})."""
    if annotation_file is not None:
        files = {"CUSTOM": os.path.join(root, annotation_file)}
    else:
        names = splits or [s.name for s in BBUDataset.Split]
        files = {n: os.path.join(root, "annotations", f"{BBUDataset.Split.parse(n).value}.json") for n in names}
    findings = _Findings()
    entries = _scan_annotations(files, findings)
    if not entries.splits and not findings.errors:
        findings.error("annotation", f"no annotation file found under {root}")
    majority = _check_groups_and_paths(entries, findings)
    sizes = _check_images(root, entries, decode, num_workers, findings)
    return {
        "root": root,
        "decoded": decode,
        "splits": entries.splits,
        "majority_group_size": majority,
        "image_sizes": _size_stats(sizes),
        "errors": findings.errors,
        "warnings": findings.warnings,
    }


def format_report(report: Dict) -> str:
    """Human-readable text of a `check_bbu` report."""
    lines = [f"BBU dataset check: {report['root']}"]
    class_columns: List[str] = []
    for split_report in report["splits"].values():
        class_columns += [c for c in split_report["per_class"] if c not in class_columns]
    header = ["split", "entries", "groups", *class_columns]
    rows = [
        [split, str(r["entries"]), str(r["groups"]), *(str(r["per_class"].get(c, 0)) for c in class_columns)]
        for split, r in report["splits"].items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    lines.append(f"majority group size: {report['majority_group_size']}")
    stats = report["image_sizes"]
    if stats["count"]:
        w, h = stats["width"], stats["height"]
        common = ", ".join(f"{size} ({n})" for size, n in stats["most_common"])
        lines.append(
            f"image sizes ({stats['count']} decoded): width {w['min']}..{w['max']} (median {w['median']:g}), "
            f"height {h['min']}..{h['max']} (median {h['median']:g}); most common: {common}"
        )
    elif not report["decoded"]:
        lines.append("image sizes: not measured (--no-decode)")
    for title, items in (("errors", report["errors"]), ("warnings", report["warnings"])):
        lines.append(f"{title}: {len(items)}")
        for item in items[:_PRINT_LIMIT]:
            lines.append(f"  [{item['kind']}] {item['message']}")
        if len(items) > _PRINT_LIMIT:
            lines.append(f"  ... and {len(items) - _PRINT_LIMIT} more (see --json)")
    lines.append("result: " + ("FAILED" if report["errors"] else "OK"))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinov2.data.check", description=__doc__.split("\n\n")[1])
    parser.add_argument("dataset", help="dataset string, e.g. BBU:root=data/bbu_sample (split=... checks one split)")
    parser.add_argument("--no-decode", action="store_true", help="only check that image files exist")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--num-workers", type=int, default=8, help="threads decoding images")
    args = parser.parse_args(argv)
    try:
        class_, kwargs = _parse_dataset_str(args.dataset)
    except ValueError as e:
        parser.error(str(e))
    if class_ is not BBUDataset:
        parser.error(f"the checker handles BBU datasets, got {class_.__name__} from {args.dataset!r}")
    split = kwargs.get("split")
    report = check_bbu(
        kwargs["root"],
        splits=[split.name] if split is not None else None,
        annotation_file=kwargs.get("annotation_file"),
        decode=not args.no_decode,
        num_workers=args.num_workers,
    )
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
