"""scripts/benchmarks/loss.py: the iBOT loss maths per iteration, eager and compiled, on a tiny shape (CPU)."""

import argparse
import importlib
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TINY = ["--rows", "80", "--prototypes", "48", "--dtype", "fp32", "--device", "cpu", "--warmup", "2", "--iters", "3"]


@pytest.fixture
def loss_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("benchmarks.loss")


def parse(loss_benchmark, argv):
    parser = argparse.ArgumentParser()
    loss_benchmark.add_arguments(parser)
    return parser.parse_args(argv)


def test_eager_and_compiled_records_agree_on_the_loss(loss_benchmark):
    (eager,) = loss_benchmark.run(parse(loss_benchmark, TINY))
    (compiled,) = loss_benchmark.run(parse(loss_benchmark, [*TINY, "--compile", "--compile-backend", "aot_eager"]))
    for record, was_compiled in ((eager, False), (compiled, True)):
        assert record["benchmark"] == "loss" and record["compile"] is was_compiled
        assert (record["rows"], record["prototypes"], record["dtype"]) == (80, 48, "fp32")
        assert record["ms_per_iter"] > 0 and record["peak_memory_mib"] is None
    assert compiled["last_loss"] == pytest.approx(eager["last_loss"], rel=1e-5)
    assert eager["last_loss"] > 0  # a cross-entropy


def test_bad_arguments_are_refused(loss_benchmark):
    with pytest.raises(SystemExit, match="--rows must be above 64"):
        loss_benchmark.run(parse(loss_benchmark, ["--rows", "64", "--device", "cpu"]))
    with pytest.raises(ValueError, match="--compile-backend 'turbo' is not a torch.compile backend"):
        loss_benchmark.run(parse(loss_benchmark, [*TINY, "--compile", "--compile-backend", "turbo"]))
