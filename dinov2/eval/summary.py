"""One table of the three probes (k-NN, linear, log-reg) x level (image, group) x key QC metrics.

    python -m dinov2.eval.summary --eval-dir DIR [--baseline-dir DIR]

reads `results_eval_{knn,linear,log_regression}.json` of DIR (e.g. the trained teacher) and, with `--baseline-dir`,
those of a second directory (e.g. `--pretrained-weights random`), printed row by row beside each other.
"""

import argparse
import sys
from typing import List, Optional, Sequence

from dinov2.eval.reports import load_results

COLUMNS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "auroc", "average_precision", "recall_at_fpr")
SETTING_KEYS = ("k", "lr", "C")


def _setting(settings: dict) -> str:
    return " ".join(f"{key}={settings[key]:g}" for key in SETTING_KEYS if key in settings)


def summary_rows(eval_dir: str, baseline_dir: Optional[str] = None) -> List[List[str]]:
    """Rows [probe, dataset, level, model, setting, n, n_pos, *COLUMNS] as strings ("n/a" for undefined values)."""
    sources = [("teacher", eval_dir)] + ([("baseline", baseline_dir)] if baseline_dir else [])
    loaded = {name: load_results(directory) for name, directory in sources}
    if not loaded["teacher"]:
        raise FileNotFoundError(f"no results_eval_*.json in {eval_dir}")
    rows = []
    for probe, results in loaded["teacher"].items():
        for dataset_str, entry in results["datasets"].items():
            for level in ("image", "group"):
                for name, _ in sources:
                    other = loaded[name].get(probe, {}).get("datasets", {}).get(dataset_str)
                    if other is None:
                        rows.append([probe, entry["tag"], level, name, "missing", "", ""] + [""] * len(COLUMNS))
                        continue
                    m = other[level]
                    rows.append(
                        [probe, entry["tag"], level, "random init" if loaded[name][probe]["random_init"] else name,
                         _setting(other.get("settings", {})), str(m["n_samples"]), str(m["n_positive"])]
                        + ["n/a" if m[c] is None else f"{m[c]:.4f}" for c in COLUMNS]
                    )
    return rows


def format_table(rows: Sequence[Sequence[str]]) -> str:
    header = ["probe", "split", "level", "model", "setting", "n", "n_pos", *COLUMNS]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return " | ".join(str(v).ljust(w) for v, w in zip(row, widths))

    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, rows)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True, help="Directory with results_eval_*.json")
    parser.add_argument("--baseline-dir", default=None, help="Second directory shown beside (e.g. random init)")
    args = parser.parse_args(argv)
    print(format_table(summary_rows(args.eval_dir, args.baseline_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
