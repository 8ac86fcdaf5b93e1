"""Synthetic BBU dataset in exactly the real layout, for the demo, the tests and the benchmarks.

Every group is one rendered device front panel (chassis, mounting ears with screws, a module slot and a spare slot,
rows of ports with cables, status LEDs, a label with the group id), photographed in 3 views that differ in viewpoint
(shift, rotation, scale), lighting (brightness, contrast, colour cast) and sensor noise. Negative devices have the
module in its slot and green LEDs; positive devices show one defect in all their views: the module is missing (empty
slot), misplaced (in the spare slot) or the device is in alarm (red LEDs and an unplugged cable). Everything is drawn
from `seed`, so the same arguments give the same files.
"""

import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CLASSES = ["negative", "positive"]
SPLITS = ("train", "val", "test")
DEFECTS = ("missing_module", "misplaced_module", "alarm")
_DEFECT_PROBS = (0.4, 0.3, 0.3)
_CABLE_COLOURS = ((235, 200, 40), (40, 110, 220), (230, 120, 30), (60, 170, 90))


@dataclass(frozen=True)
class PanelSpec:
    """What stays fixed across the views of one device."""

    group_id: str
    label: int
    defect: str  # "" for negatives
    chassis: Tuple[int, int, int]
    module_colour: Tuple[int, int, int]
    ports_per_row: int
    cables: Tuple[int, ...]  # cabled port indices (row-major)
    cable_colours: Tuple[Tuple[int, int, int], ...]


def _panel_spec(rng: np.random.Generator, group_id: str, label: int) -> PanelSpec:
    grey = int(rng.integers(150, 200))
    tint = rng.integers(-8, 9, size=3)
    ports_per_row = int(rng.integers(4, 8))
    n_cables = int(rng.integers(2, ports_per_row + 1))
    cables = tuple(sorted(rng.choice(2 * ports_per_row, size=n_cables, replace=False).tolist()))
    return PanelSpec(
        group_id=group_id,
        label=label,
        defect=str(rng.choice(DEFECTS, p=_DEFECT_PROBS)) if label == 1 else "",
        chassis=tuple(int(np.clip(grey + t, 0, 255)) for t in tint),
        module_colour=((30, 110, 60), (30, 70, 130), (60, 60, 70))[int(rng.integers(3))],
        ports_per_row=ports_per_row,
        cables=cables,
        cable_colours=tuple(_CABLE_COLOURS[int(rng.integers(len(_CABLE_COLOURS)))] for _ in cables),
    )


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _draw_module(draw: ImageDraw.ImageDraw, box: Tuple[float, float, float, float], spec: PanelSpec, lw: int) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=spec.module_colour, outline=(20, 20, 20), width=lw)
    w, h = x1 - x0, y1 - y0
    for i in range(3):  # chips
        cx = x0 + w * (0.2 + 0.3 * i)
        draw.rectangle((cx - w * 0.08, y0 + h * 0.25, cx + w * 0.08, y0 + h * 0.55), fill=(25, 25, 25))
    handle = (x0 + w * 0.1, y0 + h * 0.68, x1 - w * 0.1, y0 + h * 0.86)
    draw.rectangle(handle, fill=(200, 200, 205), outline=(60, 60, 60))


def _draw_empty_slot(draw: ImageDraw.ImageDraw, box: Tuple[float, float, float, float], lw: int) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=(12, 12, 14), outline=(70, 70, 70), width=lw)
    h = y1 - y0
    for y in (y0 + h * 0.15, y1 - h * 0.15):  # guide rails
        draw.line((x0 + lw, y, x1 - lw, y), fill=(90, 90, 95), width=lw)


def _draw_cover(draw: ImageDraw.ImageDraw, box: Tuple[float, float, float, float], spec: PanelSpec, lw: int) -> None:
    x0, y0, x1, y1 = box
    shade = tuple(max(0, c - 25) for c in spec.chassis)
    draw.rectangle(box, fill=shade, outline=(80, 80, 80), width=lw)
    r = (y1 - y0) * 0.06
    for sx in (x0 + r * 2, x1 - r * 2):
        draw.ellipse((sx - r, (y0 + y1) / 2 - r, sx + r, (y0 + y1) / 2 + r), fill=(120, 120, 125))


def _render_panel(spec: PanelSpec, width: int, height: int) -> Image.Image:
    """The device front panel on a transparent layer of the output size."""
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    lw = max(1, round(width / 250))
    px0, py0, px1, py1 = width * 0.1, height * 0.25, width * 0.9, height * 0.75
    pw, ph = px1 - px0, py1 - py0

    def at(u: float, v: float) -> Tuple[float, float]:
        return px0 + u * pw, py0 + v * ph

    # Mounting ears with screws, then the chassis.
    for ex0, ex1 in ((-0.06, 0.0), (1.0, 1.06)):
        draw.rectangle((*at(ex0, 0.05), *at(ex1, 0.95)), fill=tuple(c - 20 for c in spec.chassis), outline=(60, 60, 60))
        for v in (0.2, 0.8):
            cx, cy = at((ex0 + ex1) / 2, v)
            r = ph * 0.05
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(150, 150, 155), outline=(50, 50, 50), width=lw)
            draw.line((cx - r * 0.6, cy, cx + r * 0.6, cy), fill=(50, 50, 50), width=lw)
    draw.rounded_rectangle((px0, py0, px1, py1), radius=ph * 0.04, fill=spec.chassis, outline=(40, 40, 40), width=lw)

    # Module slot (left) and spare slot (right).
    slot_a = (*at(0.03, 0.12), *at(0.33, 0.88))
    slot_b = (*at(0.78, 0.12), *at(0.97, 0.88))
    if spec.defect == "missing_module":
        _draw_empty_slot(draw, slot_a, lw)
        _draw_cover(draw, slot_b, spec, lw)
    elif spec.defect == "misplaced_module":
        _draw_cover(draw, slot_a, spec, lw)
        _draw_module(draw, slot_b, spec, lw)
    else:
        _draw_module(draw, slot_a, spec, lw)
        _draw_cover(draw, slot_b, spec, lw)

    # Two rows of ports, some with cables running down out of the panel.
    alarm = spec.defect == "alarm"
    unplugged = spec.cables[-1] if alarm else -1
    port_w = 0.36 / spec.ports_per_row
    for index in range(2 * spec.ports_per_row):
        row, col = divmod(index, spec.ports_per_row)
        u0, v0 = 0.37 + col * port_w, 0.3 + row * 0.32
        box = (*at(u0 + port_w * 0.1, v0), *at(u0 + port_w * 0.9, v0 + 0.22))
        draw.rectangle(box, fill=(35, 35, 38), outline=(15, 15, 15), width=lw)
        if index in spec.cables:
            colour = spec.cable_colours[spec.cables.index(index)]
            cx = (box[0] + box[2]) / 2
            cable_w = max(2, round((box[2] - box[0]) * 0.45))
            if index == unplugged:  # connector hanging below the port
                hx, hy = cx + pw * 0.03, box[3] + ph * 0.25
                draw.line((hx, hy, hx + pw * 0.01, height), fill=colour, width=cable_w)
                draw.rectangle((hx - cable_w, hy - ph * 0.08, hx + cable_w, hy), fill=(225, 225, 225))
            else:
                draw.rectangle((cx - cable_w, box[1] + ph * 0.03, cx + cable_w, box[3]), fill=(225, 225, 225))
                draw.line((cx, box[3], cx + (row - 0.5) * pw * 0.02, height), fill=colour, width=cable_w)

    # Status LEDs and the label.
    r = ph * 0.045
    for i in range(3):
        cx, cy = at(0.39 + i * 0.045, 0.13)
        colour = (235, 40, 30) if alarm else ((40, 220, 70) if i < 2 else (240, 170, 30))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(20, 20, 20))
    lx0, ly0 = at(0.58, 0.05)
    lx1, ly1 = at(0.75, 0.22)
    draw.rectangle((lx0, ly0, lx1, ly1), fill=(240, 240, 235), outline=(90, 90, 90))
    font = _font(max(8, round((ly1 - ly0) * 0.7)))
    draw.text((lx0 + (lx1 - lx0) * 0.06, ly0), spec.group_id, fill=(10, 10, 10), font=font)
    return layer


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Dark rack: vertical gradient with two mounting rails."""
    base = float(rng.uniform(35, 65))
    column = base + np.linspace(-12, 12, height, dtype=np.float32)[:, None, None]
    array = np.broadcast_to(column, (height, width, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(array))
    draw = ImageDraw.Draw(image)
    for x0, x1 in ((0.0, 0.05), (0.95, 1.0)):
        draw.rectangle((x0 * width, 0, x1 * width, height), fill=(95, 95, 100))
    return image


def _affine_coefficients(
    width: int, height: int, angle: float, scale: float, tx: float, ty: float
) -> Tuple[float, ...]:
    """PIL AFFINE data (output -> input pixel) for: rotate by `angle` degrees and scale about the centre, then shift."""
    cx, cy = width / 2, height / 2
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    a, b, d, e = cos / scale, sin / scale, -sin / scale, cos / scale
    ox, oy = cx + tx, cy + ty
    return (a, b, cx - a * ox - b * oy, d, e, cy - d * ox - e * oy)


def render_view(spec: PanelSpec, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One photograph of the device: random viewpoint, lighting and noise."""
    panel = _render_panel(spec, width, height)
    angle, scale = rng.uniform(-4, 4), rng.uniform(0.92, 1.06)
    tx, ty = rng.uniform(-0.04, 0.04) * width, rng.uniform(-0.04, 0.04) * height
    panel = panel.transform(
        (width, height),
        Image.Transform.AFFINE,
        _affine_coefficients(width, height, angle, scale, tx, ty),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0, 0),
    )
    image = _background(rng, width, height)
    image.paste(panel, (0, 0), panel)
    pixels = np.asarray(image, dtype=np.float32)
    brightness, contrast = rng.uniform(0.75, 1.2), rng.uniform(0.8, 1.2)
    cast = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    mean = pixels.mean()
    pixels = ((pixels - mean) * contrast + mean) * brightness * cast
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(rng.uniform(2, 6))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _split_sizes(groups: int) -> Dict[str, int]:
    if groups < 6:
        raise ValueError(f"groups must be >= 6 (2 per split, one of each class), got {groups}")
    held_out = max(2, round(groups * 0.2))
    return {"train": groups - 2 * held_out, "val": held_out, "test": held_out}


def make_sample_bbu(
    out_dir: str, groups: int = 40, size: int = 160, seed: int = 0, views: int = 3, overwrite: bool = False
) -> Dict[str, List[dict]]:
    """Write the sample dataset to `out_dir` (images `size` x 3/4 `size`): `groups` devices split 60/20/20 by group,
    half of each split positive. Returns, per split, the groups as {"group_id", "label", "defect"}.

    An existing non-empty `out_dir` is an error unless `overwrite`, which replaces only annotations/ and the split
    folders.
    """
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    sizes = _split_sizes(groups)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty (use overwrite=True / --overwrite)")
        for name in ("annotations", *SPLITS):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    width, height = size, round(size * 3 / 4)
    rng = np.random.default_rng(seed)
    ids = 1_000_000 + int(rng.integers(0, 50_000)) + np.cumsum(rng.integers(1, 40, size=groups))
    order = rng.permutation(groups)
    summary: Dict[str, List[dict]] = {}
    annotations: Dict[str, dict] = {}
    first = 0
    for split in SPLITS:
        members = sorted(order[first : first + sizes[split]].tolist())
        first += sizes[split]
        labels = rng.permutation(np.arange(len(members)) % 2).tolist()
        data_list, summary[split] = [], []
        for group_index, label in zip(members, labels):
            group_id = str(int(ids[group_index]))
            spec = _panel_spec(np.random.default_rng([seed, group_index]), group_id, int(label))
            summary[split].append({"group_id": group_id, "label": spec.label, "defect": spec.defect})
            os.makedirs(os.path.join(out_dir, split, group_id), exist_ok=True)
            for k in range(views):
                relpath = f"{split}/{group_id}/{group_id}-{k}.jpeg"
                view = render_view(spec, np.random.default_rng([seed, group_index, k]), width, height)
                view.save(os.path.join(out_dir, relpath), format="JPEG", quality=92)
                data_list.append({"img_path": relpath, "gt_label": spec.label, "group_id": group_id})
        annotations[split] = {"metainfo": {"classes": CLASSES}, "data_list": data_list}
    # Annotations last and atomically: a dataset with annotations/train.json is complete.
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    for split in reversed(SPLITS):
        path = os.path.join(out_dir, "annotations", f"{split}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(annotations[split], f, indent=1)
        os.replace(path + ".tmp", path)
    return summary
