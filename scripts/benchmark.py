#!/usr/bin/env python
"""Benchmarks: `backbone`, `data`, `train`, `parity`, `extract`, `loss`, `predictor`. Each run prints one JSON line;
the exit code is 1 when a record says `"within_tolerance": false` (the loss-parity check). `summary` prints the GPU
suite's JSON lines as markdown tables against the upstream anchor.

Usage: python scripts/benchmark.py <subcommand> [options]; `python scripts/benchmark.py <subcommand> --help` lists them.
Each subcommand lives in scripts/benchmarks/<name>.py and exposes `add_arguments(parser)` and `run(args) -> list[dict]`;
only the chosen one is imported, so a benchmark's dependencies never affect the others.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

SUBCOMMANDS = ("backbone", "data", "train", "parity", "extract", "loss", "predictor", "summary")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=SUBCOMMANDS)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv[:1])  # prints usage / the choices error and exits
    module = importlib.import_module(f"benchmarks.{argv[0]}")
    sub = argparse.ArgumentParser(prog=f"benchmark.py {argv[0]}", description=module.__doc__)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    records = module.run(args)
    for record in records:
        print(json.dumps(record), flush=True)
    return 1 if any(record.get("within_tolerance") is False for record in records) else 0


if __name__ == "__main__":
    code = main()
    if "dinov2.distributed" in sys.modules:  # end the process group a benchmark started (NCCL warns about one left)
        sys.modules["dinov2.distributed"].disable()
    sys.exit(code)
