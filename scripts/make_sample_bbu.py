#!/usr/bin/env python
"""Write the synthetic sample BBU dataset (real layout: annotations/{train,val,test}.json + JPEG views per group).

Usage: python scripts/make_sample_bbu.py [OUT] [--groups N] [--size S] [--seed K] [--views V] [--overwrite]
OUT defaults to data/bbu_sample (git-ignored). `--size 4000` gives 4000x3000 JPEGs for the data benchmark.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

# The generator needs only numpy and PIL: load its file directly so that the script does not pay for importing
# torch through the dinov2.data package (seconds, versus well under a second for the default sample).
_SPEC = importlib.util.spec_from_file_location(
    "dinov2_sample_bbu", Path(__file__).resolve().parent.parent / "dinov2" / "data" / "sample_bbu.py"
)
_MODULE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_MODULE)
make_sample_bbu = _MODULE.make_sample_bbu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="data/bbu_sample", help="output dataset root")
    parser.add_argument("--groups", type=int, default=40, help="devices in all splits together (60/20/20 split)")
    parser.add_argument("--size", type=int, default=160, help="image width in pixels (height = 3/4 width)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--views", type=int, default=3, help="images per device")
    parser.add_argument("--overwrite", action="store_true", help="replace annotations/ and the split folders in OUT")
    args = parser.parse_args(argv)
    summary = make_sample_bbu(
        args.out, groups=args.groups, size=args.size, seed=args.seed, views=args.views, overwrite=args.overwrite
    )
    for split, groups in summary.items():
        positives = sum(g["label"] for g in groups)
        print(f"{split}: {len(groups)} groups ({positives} positive) x {args.views} views")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
