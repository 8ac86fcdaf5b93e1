"""scripts/benchmarks/extract.py: one JSON record of feature-extraction speed (tiny model, CPU)."""

import argparse
import importlib
from pathlib import Path

import pytest


def test_extract_benchmark_record(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "scripts"))
    extract = importlib.import_module("benchmarks.extract")
    parser = argparse.ArgumentParser()
    extract.add_arguments(parser)
    args = parser.parse_args(["--arch", "vit_tiny", "--patch-size", "16", "--img-size", "32", "--batch-size", "2",
                              "--iters", "1", "--device", "cpu"])
    (record,) = extract.run(args)
    assert record["benchmark"] == "extract" and record["arch"] == "vit_tiny" and record["n_blocks"] == 4
    assert record["images_per_s"] > 0 and record["ms_per_batch"] > 0 and record["peak_memory_mib"] is None
    assert record["compile"] is False
    with pytest.raises(SystemExit, match="fp16"):
        extract.run(parser.parse_args(["--dtype", "fp16", "--device", "cpu"]))


def test_extract_benchmark_compiled_blocks(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "scripts"))
    extract = importlib.import_module("benchmarks.extract")
    parser = argparse.ArgumentParser()
    extract.add_arguments(parser)
    args = parser.parse_args(["--arch", "vit_tiny", "--patch-size", "16", "--img-size", "32", "--batch-size", "2",
                              "--iters", "1", "--device", "cpu", "--compile", "--compile-backend", "aot_eager"])
    (record,) = extract.run(args)
    assert record["compile"] is True and record["images_per_s"] > 0
