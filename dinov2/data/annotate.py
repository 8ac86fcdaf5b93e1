"""Annotation file for a folder of new, unlabelled images:
`python -m dinov2.data.annotate <root> <folder> [--group-from folder|name] [--output FILE] [--force] [--check]`.

Production photos arrive as files, not as annotations. This lists every image below `<root>/<folder>` (recursively,
sorted) in the BBU format, without `gt_label`, so that `dinov2.eval.predict` can score them and pretraining can use
them as an unlabelled pool. The group (device) of an image is the first folder below `<folder>` (`--group-from
folder`, the BBU layout `<folder>/<group_id>/<group_id>-<k>.jpeg`) or the file name up to its last `-`
(`--group-from name`, for flat folders of `<group_id>-<k>.jpeg`). The file is written atomically, and an existing one
is only replaced with `--force`. It prints the dataset string to use.

With `--check` every image is decoded first (`--num-workers` threads), and the ones that cannot be read (a camera's
truncated file, a zero-byte copy) are left out of the annotation file and listed, with the reason, in
`<output>.unreadable.json` and on stderr: one bad photo then no longer stops `dinov2.eval.predict` on the rest, and
no photo is left out silently.
"""

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

from dinov2.data.check import read_image
from dinov2.data.datasets.image_folder import IMAGE_EXTENSIONS, images_under
from dinov2.utils.utils import atomic_write

GROUP_FROM = ("folder", "name")
DEFAULT_CLASSES = ["negative", "positive"]


def _group_id(relpath: str, group_from: str, folder: str) -> str:
    """The group of `relpath` (relative to `folder`); raises naming the image when it has none."""
    if group_from == "folder":
        parts = relpath.split(os.sep)
        if len(parts) < 2:
            raise ValueError(f"{os.path.join(folder, relpath)} is not in a group folder (<folder>/<group_id>/...): "
                             "use --group-from name for a flat folder of <group_id>-<k> files")
        return parts[0]
    stem = os.path.splitext(os.path.basename(relpath))[0]
    if "-" not in stem.strip("-"):
        raise ValueError(f"{os.path.join(folder, relpath)}: --group-from name needs file names <group_id>-<k>")
    return stem.rsplit("-", 1)[0]


def annotate_folder(root: str, folder: str, group_from: str = "folder",
                    classes: Optional[List[str]] = None) -> Dict[str, object]:
    """The BBU annotation content listing the images below `root/folder` (paths relative to `root`), unlabelled."""
    if group_from not in GROUP_FROM:
        raise ValueError(f"--group-from must be one of {GROUP_FROM}, got {group_from!r}")
    directory = os.path.join(root, folder)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"image folder not found: {directory}")
    relpaths = images_under(directory)
    if not relpaths:
        raise ValueError(f"{directory}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    prefix = os.path.relpath(directory, root)
    data_list = [{"img_path": os.path.join(prefix, relpath).replace(os.sep, "/"),
                  "group_id": _group_id(relpath, group_from, directory)} for relpath in relpaths]
    return {"metainfo": {"classes": list(classes or DEFAULT_CLASSES)}, "data_list": data_list}


def split_unreadable(root: str, content: Dict[str, object], num_workers: int = 8
                     ) -> Tuple[Dict[str, object], List[Dict[str, str]]]:
    """(`content` without its unreadable images, those images as {img_path, group_id, problem}): every image is
    decoded."""
    entries = content["data_list"]
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        results = list(pool.map(lambda e: read_image(os.path.join(root, e["img_path"]), decode=True), entries))
    kept = [entry for entry, (status, _, _) in zip(entries, results) if status == "ok"]
    bad = [{**entry, "problem": message} for entry, (status, _, message) in zip(entries, results) if status != "ok"]
    return {**content, "data_list": kept}, bad


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinov2.data.annotate", description=__doc__.split("\n\n")[1])
    parser.add_argument("root", help="dataset root: image paths are written relative to it")
    parser.add_argument("folder", help="folder of the new images, relative to the root")
    parser.add_argument("--group-from", choices=GROUP_FROM, default="folder",
                        help="group (device) of an image: its first folder below FOLDER, or its file name up to "
                        "the last '-'")
    parser.add_argument("--classes", nargs="+", default=DEFAULT_CLASSES,
                        help="metainfo.classes (the names a classifier of this data uses)")
    parser.add_argument("--output", default=None,
                        help="annotation file, relative to the root (default annotations/<folder>.json)")
    parser.add_argument("--force", action="store_true", help="replace an existing annotation file")
    parser.add_argument("--check", action="store_true",
                        help="decode every image; list unreadable ones in <output>.unreadable.json instead")
    parser.add_argument("--num-workers", type=int, default=8, help="threads decoding images with --check")
    args = parser.parse_args(argv)
    output = args.output or os.path.join("annotations", args.folder.strip("/").replace("/", "_") + ".json")
    path = os.path.join(args.root, output)
    if os.path.exists(path) and not args.force:
        parser.error(f"{path} exists: pass --force to replace it")
    try:
        content = annotate_folder(args.root, args.folder, args.group_from, args.classes)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.check:
        content, unreadable = split_unreadable(args.root, content, args.num_workers)
        report = os.path.splitext(path)[0] + ".unreadable.json"
        if unreadable:
            atomic_write(report, lambda f: f.write(json.dumps({"folder": args.folder, "unreadable": unreadable},
                                                              indent=1) + "\n"), binary=False)
            print(f"{len(unreadable)} unreadable images left out, listed in {report}:", file=sys.stderr)
            for entry in unreadable:
                print(f"  {entry['problem']}", file=sys.stderr)
        elif os.path.exists(report):
            os.remove(report)  # an earlier run's list
        if not content["data_list"]:
            parser.error(f"no readable image below {os.path.join(args.root, args.folder)}")
    atomic_write(path, lambda f: f.write(json.dumps(content, indent=1) + "\n"), binary=False)
    groups = {entry["group_id"] for entry in content["data_list"]}
    print(f"{path}: {len(content['data_list'])} images in {len(groups)} groups")
    print(f"BBU:root={args.root}:annotation_file={output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
