"""The GPU suite's results against the anchor: markdown tables from the JSON lines of `scripts/gpu_benchmarks.sh`.

The anchor is upstream DINOv2 (b8931f7) measured on the lent H100 80GB with PyTorch 2.11 (issue 7 of this project):
training with the protocol of `gpu_benchmarks.sh` (batch 64, 2 x 224 + 8 local crops, fp16 + grad scaler, 10 + 50
iterations, >= 2 runs), feature extraction (ViT-L/14, 224, bf16, batch 256) and upstream's PIL data pipeline with
16 workers. The targets are speed-ups over it at no more peak memory. A training row meets its target only when it
ran the anchor's protocol and precision (fp16 + grad scaler; bf16 rows are reported beside it). Peak memory is
compared in GB (10^9 bytes), the larger of the two readings of the anchor's "GB", so the check errs on the safe side.

Prints the tables and returns no JSON records.
"""

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence

# (arch, patch size) -> (samples/s, peak GB, MFU, speed-up target)
TRAIN_ANCHOR = {
    ("vit_large", 16): (221.9, 39.7, 0.43, 1.25),
    ("vit_base", 14): (407.3, 22.0, 0.31, 1.5),
    ("vit_small", 14): (406.7, 13.4, 0.085, 2.0),
}
EXTRACT_ANCHOR = {("vit_large", 14, 224, "bf16", 256): (2026.0, 1.5)}  # images/s, speed-up target
DATA_ANCHOR = {"640x480": 250.0, "1920x1440": 108.0, "4000x3000": 26.0}  # samples/s with 16 workers
PROTOCOL = {"batch_size": 64, "warmup": 10, "iterations": 50}
GB_PER_GIB = 2**30 / 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default=os.path.join("outputs", "gpu_benchmarks.jsonl"),
                        help="JSON lines written by scripts/gpu_benchmarks.sh (or by benchmark.py runs)")  # fmt: skip


def read_records(path: str) -> List[Dict]:
    """The JSON records of `path`, one per line (blank lines skipped); a malformed line is an error naming it."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
    return records


def _table(header: Sequence[str], rows: List[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _check(value: Optional[bool]) -> str:
    """A target check: met, **missed** (bold), or not applicable."""
    return "—" if value is None else ("yes" if value else "**no**")


def _flag(value: bool) -> str:
    return "yes" if value else "no"


def _precision(record: Dict) -> str:
    return f"{record['dtype']}" + (" + scaler" if record.get("grad_scaler") else "")


def _compiled(record: Dict) -> str:
    """What a training run compiled: the blocks (`train.compile`) and/or the loss maths (`train.compile_loss`)."""
    parts = [name for name, key in (("blocks", "compile"), ("loss", "compile_loss")) if record.get(key)]
    return " + ".join(parts) or "no"


def _anchor_protocol(record: Dict) -> bool:
    local = 96 if record.get("patch_size") == 16 else 98
    return (all(record.get(k) == v for k, v in PROTOCOL.items()) and record.get("runs", 1) >= 2
            and record.get("crops") == f"2x224 + 8x{local}")  # fmt: skip


def _device_wait(record: Dict) -> str:
    """How long the iteration's closing `.item()` waited for the device, of the iteration (records with host phases):
    near 0, the GPU waited for the host."""
    wait = record.get("host_ms_per_iter", {}).get("device_wait")
    if wait is None or "iter_time_mean_s" not in record:
        return "—"
    return f"{wait:.1f} of {1e3 * record['iter_time_mean_s']:.1f} ms"


def train_rows(records: List[Dict]) -> List[List[object]]:
    rows = []
    for r in records:
        anchor = TRAIN_ANCHOR.get((r.get("arch"), r.get("patch_size")))
        speed, peak_gib = r["images_per_s_mean"], r.get("peak_memory_gib")
        peak_gb = None if peak_gib is None else peak_gib * GB_PER_GIB
        ratio = speed_ok = memory_ok = None
        if anchor is not None:
            ratio = speed / anchor[0]
            if _anchor_protocol(r) and r["dtype"] == "float16" and r.get("grad_scaler"):
                speed_ok = ratio >= anchor[3]
                memory_ok = None if peak_gb is None else peak_gb <= anchor[1]
        rows.append([
            f"{r['arch']}/{r.get('patch_size', '?')}", _precision(r), _compiled(r),
            _flag(_anchor_protocol(r)), f"{speed:.1f} ({', '.join(f'{v:.1f}' for v in r['images_per_s_runs'])})",
            "—" if ratio is None else f"{ratio:.2f}× (target {anchor[3]}×)", _check(speed_ok),
            "—" if r.get("mfu") is None else f"{r['mfu']:.3f}",
            "—" if peak_gb is None else f"{peak_gb:.1f} GB ({peak_gib:.1f} GiB)", _check(memory_ok),
            _device_wait(r),
        ])  # fmt: skip
    return rows


def extract_rows(records: List[Dict]) -> List[List[object]]:
    rows = []
    for r in records:
        anchor = EXTRACT_ANCHOR.get((r["arch"], r["patch_size"], r["img_size"], r["dtype"], r["batch_size"]))
        ratio = None if anchor is None else r["images_per_s"] / anchor[0]
        rows.append([
            f"{r['arch']}/{r['patch_size']} {r['img_size']}",
            r["dtype"] + (" weights" if r.get("cast_weights") else ""), r["batch_size"],
            _flag(r["compile"]) + (f" ({r['compile_mode']})" if r.get("compile_mode") else ""),
            f"{r['images_per_s']:.1f}", "—" if ratio is None else f"{ratio:.2f}× (target {anchor[1]}×)",
            _check(None if ratio is None else ratio >= anchor[1]),
        ])  # fmt: skip
    return rows


def data_rows(records: List[Dict]) -> List[List[object]]:
    """Multi-crop paths against upstream's multi-crop pipeline (16 workers, synthetic JPEGs); the probes' eval
    transform (paths eval-*) has no anchor."""
    rows = []
    for r in records:
        comparable = not r["path"].startswith("eval") and r["num_workers"] == 16 and r["dataset"] == "synthetic"
        anchor = DATA_ANCHOR.get(r["image_size"]) if comparable else None
        rows.append([
            r["image_size"], r["path"], r["device"], r["num_workers"], f"{r['samples_per_s']:.1f}",
            "—" if anchor is None else f"{anchor:.0f} ({r['samples_per_s'] / anchor:.2f}×)",
        ])  # fmt: skip
    return rows


def render(records: List[Dict]) -> str:
    """Markdown: one table per benchmark kind present in `records`, then the parity, loss, e2e, predictor, smoke and
    failed runs."""
    by_kind: Dict[str, List[Dict]] = {}
    for r in records:
        by_kind.setdefault(r.get("benchmark", "?"), []).append(r)
    parts = []
    if "train" in by_kind:
        header = ["model", "precision", "compile", "anchor protocol", "samples/s (runs)", "vs anchor", "speed target",
                  "MFU", "peak memory", "memory target", "device wait"]  # fmt: skip
        parts.append(_table(header, train_rows(by_kind["train"])))
    if "extract" in by_kind:
        parts.append(_table(["extraction", "dtype", "batch", "compile", "images/s", "vs anchor", "target"],
                            extract_rows(by_kind["extract"])))  # fmt: skip
    if "data" in by_kind:
        parts.append(_table(["JPEG size", "path", "device", "workers", "samples/s", "upstream (ratio)"],
                            data_rows(by_kind["data"])))  # fmt: skip
    for r in by_kind.get("parity", []):
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in r["max_abs_diff"].items())
        tolerance = f"{_check(r['within_tolerance'])} (rtol {r['rtol']}, atol {r['atol']})"
        line = f"parity ({' '.join(r['overrides'])}), {r['iterations']} iterations: within tolerance {tolerance}; "
        line += f"max |fast - fp32|: {diffs}"
        if "mixed_max_abs_diff" in r:
            drift = ", ".join(f"{k} {v:.2g}" for k, v in r["mixed_max_abs_diff"].items())
            line += f"; mixed precision alone (x{r['mp_factor']} allowed on top): {drift}"
        parts.append(line)
    for r in by_kind.get("loss", []):
        peak = "" if r["peak_memory_mib"] is None else f", peak {r['peak_memory_mib']:.0f} MiB"
        parts.append(f"loss maths {r['rows']} x {r['prototypes']} {r['dtype']}, compiled {_flag(r['compile'])}: "
                     f"{r['ms_per_iter']:.2f} ms per iteration{peak} (last loss {r['last_loss']})")  # fmt: skip
    for r in by_kind.get("e2e", []):
        side = f", gpu_side_stream={r['gpu_side_stream']}" if r["gpu_augmentation"] else ""
        parts.append(f"e2e {r['arch']} batch {r['batch_size']}, gpu_augmentation={r['gpu_augmentation']}{side}: "
                     f"{r['images_per_s']:.1f} images/s over {r['logged_iterations']} logged iterations")  # fmt: skip
    for r in by_kind.get("predictor", []):
        runtime = r.get("runtime", "torch")  # records before the ONNX runtime have none
        parts.append(f"predictor {r['arch']}/{r['patch_size']} in {runtime}, {r['images_per_device']} photos of "
                     f"{r['image_size']} per device, {r['decode_threads']} decoding threads, {r['device']}: "
                     f"{r['ms_per_device']:.1f} ms per device (median {r['ms_per_device_median']:.1f})")  # fmt: skip
    for r in by_kind.get("smoke", []):
        resumed = "" if r["resumed_at"] is None else f", resumed at iteration {r['resumed_at']}"
        parts.append(f"smoke {r['run']}: trained to iteration {r['last_iteration']}{resumed}, final total loss "
                     f"{r['final_total_loss']}, test image AUROC {r['test_image_auroc']}")  # fmt: skip
    for r in by_kind.get("failed", []):
        parts.append(f"FAILED (exit code {r['exit_code']}): {r['run']}")
    return "\n\n".join(parts)


def run(args: argparse.Namespace) -> List[Dict]:
    print(render(read_records(args.results)))
    return []
