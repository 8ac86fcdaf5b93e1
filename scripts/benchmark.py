#!/usr/bin/env python
"""Benchmarks: `backbone`, `data`, `train`, `extract`. Each run prints one JSON line.

Usage: python scripts/benchmark.py <subcommand> [options]; see `--help` of each subcommand.
Each subcommand lives in scripts/benchmarks/<name>.py and exposes `add_arguments(parser)` and `run(args) -> list[dict]`.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

SUBCOMMANDS = ("backbone", "data", "train", "extract")


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"benchmarks.{name}")
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0]))
    args = parser.parse_args(argv)
    for record in modules[args.command].run(args):
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
