"""scripts/benchmarks/data.py: multi-crop samples/s of the data paths, timed without work done off the clock."""

import time

import pytest
import torch

SECONDS_PER_SAMPLE = 0.3


class SlowCrops(torch.utils.data.Dataset):
    """Samples that take SECONDS_PER_SAMPLE each, in the (crops, target) form of the multi-crop transform."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        time.sleep(SECONDS_PER_SAMPLE)
        return {"global_crops": [torch.zeros(3, 4, 4)], "local_crops": [torch.zeros(3, 2, 2)]}, ()


@pytest.fixture
def data_benchmark(load_benchmark):
    return load_benchmark("data")


def test_timed_batches_are_whole_waves_of_one_batch_per_worker(data_benchmark):
    waves = data_benchmark._timed_batches
    assert [waves(256, 64, 16), waves(1024, 64, 16), waves(1025, 64, 16), waves(2, 1, 3), waves(4, 1, 3)] == [
        16, 16, 32, 3, 6
    ]


def test_batches_the_workers_made_before_the_clock_started_are_not_counted(data_benchmark, benchmark_args):
    # 3 workers at 0.3 s per sample make at most 10 samples/s. Timing starts after the first wave, so the figure
    # cannot exceed that; counting the other workers' first batches (ready when the first one arrives) made it
    # appear about 100x faster.
    argv = ["--num-workers", "3", "--batch-size", "1", "--num-samples", "2", "--device", "cpu"]
    args = benchmark_args(data_benchmark, argv)
    samples, seconds = data_benchmark._measure(SlowCrops(), "fast", args)
    assert samples == 3
    assert samples / seconds < 3 / SECONDS_PER_SAMPLE * 1.2


def test_data_benchmark_runs_on_synthetic_jpegs(data_benchmark, benchmark_args):
    argv = ["--image-size", "120x90", "--path", "all", "--num-samples", "2", "--repeats", "1",
            "--local-crops-number", "2", "--device", "cpu"]  # fmt: skip
    args = benchmark_args(data_benchmark, argv)
    records = data_benchmark.run(args)
    assert [(r["path"], r["image_size"], r["num_samples"], r["device"]) for r in records] == [
        ("reference", "120x90", 2, "cpu"),
        ("fast", "120x90", 2, "cpu"),
        ("gpu", "120x90", 2, "cpu"),
    ]
    assert all(r["samples_per_s"] > 0 and r["crops"] == "2x224 + 2x96" for r in records)


def test_data_benchmark_measures_the_probes_eval_transform_both_ways(data_benchmark, benchmark_args):
    argv = ["--image-size", "640x480", "--path", "eval", "--num-samples", "2", "--repeats", "1", "--resize-size",
            "64", "--crop-size", "56", "--draft-reducing-gap", "2"]  # fmt: skip
    args = benchmark_args(data_benchmark, argv)
    records = data_benchmark.run(args)
    assert [(r["path"], r["crops"]) for r in records] == [
        ("eval-full", "resize 64, centre 56"),
        ("eval-draft", "resize 64, centre 56, draft reducing gap 2"),
    ]
    assert all(r["samples_per_s"] > 0 and r["num_samples"] == 2 for r in records)
    transforms = {path: data_benchmark._make_transform(path, args) for path in ("eval-full", "eval-draft")}
    assert "DraftDecode(min_size=64, reducing_gap=2.0)" in repr(transforms["eval-draft"])
    assert "DraftDecode" not in repr(transforms["eval-full"])
    collate, _ = data_benchmark._batch_steps("eval-draft", args)
    images = [(torch.full((3, 56, 56), float(i)), ()) for i in range(2)]
    assert torch.equal(collate(images), torch.stack([images[0][0], images[1][0]]))
