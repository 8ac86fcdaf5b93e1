"""scripts/benchmarks/loss.py: the iBOT loss maths per iteration, eager and compiled, on a tiny shape (CPU)."""

import pytest

TINY = ["--rows", "80", "--prototypes", "48", "--dtype", "fp32", "--device", "cpu", "--warmup", "2", "--iters", "3"]


@pytest.fixture
def run_loss(load_benchmark, benchmark_args):
    loss_benchmark = load_benchmark("loss")
    return lambda argv: loss_benchmark.run(benchmark_args(loss_benchmark, argv))


def test_eager_and_compiled_records_agree_on_the_loss(run_loss):
    (eager,) = run_loss(TINY)
    (compiled,) = run_loss([*TINY, "--compile", "--compile-backend", "aot_eager"])
    for record, was_compiled in ((eager, False), (compiled, True)):
        assert record["benchmark"] == "loss" and record["compile"] is was_compiled
        assert (record["rows"], record["prototypes"], record["dtype"]) == (80, 48, "fp32")
        assert record["ms_per_iter"] > 0 and record["peak_memory_mib"] is None
    assert compiled["last_loss"] == pytest.approx(eager["last_loss"], rel=1e-5)
    assert eager["last_loss"] > 0  # a cross-entropy


def test_bad_arguments_are_refused(run_loss):
    with pytest.raises(SystemExit, match="--rows must be above 64"):
        run_loss(["--rows", "64", "--device", "cpu"])
    with pytest.raises(ValueError, match="--compile-backend 'turbo' is not a torch.compile backend"):
        run_loss([*TINY, "--compile", "--compile-backend", "turbo"])
