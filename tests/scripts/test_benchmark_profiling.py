"""scripts/benchmarks/profiling.py: the GPU busy fraction of the profiled kernels."""


def test_busy_fraction_is_the_union_of_intervals(load_benchmark):
    profiling = load_benchmark("profiling")
    assert profiling.busy_fraction([(0, 10), (5, 15), (20, 30), (22, 25)], 40) == 0.625
    assert profiling.busy_fraction([(0, 10)], 0) == 0.0
