"""scripts/benchmarks/predictor.py: one record per runtime and photo size, from a self-contained random backbone and
classifier."""

import pytest


def test_predictor_records(load_benchmark, benchmark_args):
    predictor = load_benchmark("predictor")
    argv = ["--arch", "vit_tiny", "--patch-size", "16", "--image-size", "64x48", "80x60", "--resize-size", "32",
            "--crop-size", "32", "--images-per-device", "2", "--warmup", "1", "--iters", "2", "--decode-threads", "2",
            "--runtime", "torch", "onnx", "torch-explain"]
    records = predictor.run(benchmark_args(predictor, argv))
    assert [(r["runtime"], r["image_size"]) for r in records] == [
        ("torch", "64x48"), ("torch", "80x60"), ("onnx", "64x48"), ("onnx", "80x60"), ("torch-explain", "64x48"),
        ("torch-explain", "80x60")]
    for record in records:
        assert record["benchmark"] == "predictor" and record["arch"] == "vit_tiny" and record["device"] == "cpu"
        assert (record["images_per_device"], record["crop_size"], record["decode_threads"]) == (2, 32, 2)
        assert record["ms_per_device"] > 0 and record["peak_memory_mib"] is None
        assert record["images_per_s"] == pytest.approx(2000 / record["ms_per_device"], rel=0.02)
    with pytest.raises(SystemExit, match="--images-per-device and --iters must be >= 1"):
        predictor.run(benchmark_args(predictor, ["--iters", "0"]))
