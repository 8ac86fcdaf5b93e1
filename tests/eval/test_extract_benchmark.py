"""scripts/benchmarks/extract.py: one JSON record of feature-extraction speed (tiny model, CPU)."""

import json

import pytest
import torch

TINY = ["--arch", "vit_tiny", "--patch-size", "16", "--img-size", "32", "--batch-size", "2", "--iters", "1",
        "--device", "cpu"]  # fmt: skip


@pytest.fixture
def extract(load_benchmark):
    return load_benchmark("extract")


@pytest.fixture
def run_extract(extract, benchmark_args):
    return lambda argv: extract.run(benchmark_args(extract, argv))


def test_extract_benchmark_record(run_extract):
    (record,) = run_extract(TINY)
    assert record["benchmark"] == "extract" and record["arch"] == "vit_tiny" and record["n_blocks"] == 4
    assert record["images_per_s"] > 0 and record["ms_per_batch"] > 0 and record["peak_memory_mib"] is None
    assert record["compile"] is False
    with pytest.raises(SystemExit, match="fp16"):
        run_extract(["--dtype", "fp16", "--device", "cpu"])


@pytest.fixture
def built(extract, monkeypatch):
    """The backbones the benchmark builds."""
    backbones = []
    original = extract.build_model_from_cfg

    def build_and_record(*args, **kwargs):
        backbone, embed_dim = original(*args, **kwargs)
        backbones.append(backbone)
        return backbone, embed_dim

    monkeypatch.setattr(extract, "build_model_from_cfg", build_and_record)
    return backbones


def test_extract_benchmark_compiled_blocks(run_extract, built):
    (record,) = run_extract(TINY + ["--compile", "--compile-backend", "aot_eager"])
    assert record["compile"] is True and record["images_per_s"] > 0 and record["compile_mode"] is None
    assert all(block._compiled_call_impl is not None for block in built[0].flat_blocks())
    with pytest.raises(ValueError, match="--compile-mode 'fastest' is not a mode of backend 'inductor'"):
        run_extract(TINY + ["--compile", "--compile-mode", "fastest"])


def test_extract_benchmark_cast_weights(run_extract, built):
    (record,) = run_extract(TINY + ["--dtype", "bf16", "--cast-weights"])
    assert record["cast_weights"] is True and record["dtype"] == "bf16" and record["images_per_s"] > 0
    assert {p.dtype for p in built[0].parameters()} == {torch.bfloat16}


def test_extract_benchmark_profile(run_extract, tmp_path):
    (record,) = run_extract([*TINY, "--profile", str(tmp_path), "--profile-iterations", "2"])
    profile = record["profile"]
    assert profile["iterations"] == 2 and profile["aten_ops_per_iter"] > 20
    assert profile["trace"] == str(tmp_path / "extract_vit_tiny_fp32.trace.json")
    with open(profile["trace"]) as f:
        assert any(e.get("name") == "aten::linear" for e in json.load(f)["traceEvents"])
    assert "aten::linear" in open(profile["table"]).read()
