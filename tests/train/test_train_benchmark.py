"""scripts/benchmarks/train.py and parity.py: FLOP formula, records, profiler output and the loss-parity check."""

import importlib
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from train_helpers import SAMPLE_CONFIG, precision_opts

TINY_BENCH = [
    "train.batch_size_per_gpu=4", "train.OFFICIAL_EPOCH_LENGTH=10", "crops.global_crops_size=64",
    "crops.local_crops_size=32", "crops.local_crops_number=2", "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
]  # fmt: skip


@pytest.fixture
def benchmarks(load_benchmark):
    return load_benchmark("train"), load_benchmark("parity")


def test_iteration_flops_match_pytorch_flop_counter(benchmarks):
    """The documented formula against FlopCounterMode over one forward_backward (math attention, so that the
    attention products are counted: `train.sdpa_backends=[MATH]`; no stochastic depth). The counter has no input gradient for the patch-embedding
    convolution (the images need none), which the formula counts, and counts the small KoLeo/loss products,
    which the formula leaves out."""
    train_bench, _ = benchmarks
    overrides = ["student.drop_path_rate=0.0", "train.sdpa_backends=[MATH]"]
    cfg = train_bench.load_cfg(SAMPLE_CONFIG, TINY_BENCH + overrides)
    model, _, batches = train_bench.build_training(cfg)
    with FlopCounterMode(display=False) as counter:
        model.forward_backward(batches[0], teacher_temp=0.05)
    backbone = model.student.backbone
    patch, dim, b = backbone.patch_size, backbone.embed_dim, cfg.train.batch_size_per_gpu
    images = {64: 2 * b, 32: 2 * b}  # student crops per size: 2 global, 2 local per image
    patch_embed_input_grad = sum(2 * (s // patch) ** 2 * 3 * patch * patch * dim * n for s, n in images.items())
    expected = train_bench.iteration_flops(model, cfg, batches[0])
    counted = counter.get_total_flops() + patch_embed_input_grad
    assert abs(counted - expected) / expected < 1e-4, (counted, expected)


def test_train_benchmark_record_with_runs_host_phases_and_profile(benchmarks, tmp_path, benchmark_args):
    train_bench, _ = benchmarks
    argv = ["--config-file", SAMPLE_CONFIG, "--warmup", "1", "--iterations", "2", "--runs", "2",
            "--profile", str(tmp_path), "--profile-iterations", "1", *TINY_BENCH]  # fmt: skip
    args = benchmark_args(train_bench, argv)
    (record,) = train_bench.run(args)
    assert record["benchmark"] == "train" and record["arch"] == "vit_tiny" and record["batch_size"] == 4
    assert record["crops"] == "2x64 + 2x32" and record["dtype"] == "float32" and record["runs"] == 2
    assert record["release_teacher_copy"] is True and record["prefetch_to_device"] is True
    assert record["compile"] is False
    assert len(record["images_per_s_runs"]) == 2 and all(v > 0 for v in record["images_per_s_runs"])
    mean_from_runs = 4 / (sum(4 / v for v in record["images_per_s_runs"]) / 2)
    assert math.isclose(record["images_per_s_mean"], mean_from_runs, rel_tol=0.02)
    assert record["model_tflops"] == pytest.approx(record["model_gflop_per_iter"] / 1e3 / record["iter_time_mean_s"],
                                                   rel=0.01)
    host, iteration_ms = record["host_ms_per_iter"], 1e3 * record["iter_time_mean_s"]
    assert sorted(host) == ["backward", "device_wait", "ema", "forward_backward", "optimizer", "schedules", "teacher"]
    assert host["teacher"] + host["backward"] < host["forward_backward"]  # parts of it
    top_level = sum(host[k] for k in ("schedules", "forward_backward", "optimizer", "ema", "device_wait"))
    assert 0.8 * iteration_ms < top_level <= iteration_ms + 0.1  # the phases cover the iteration (0.1: rounding)
    profile = record["profile"]
    assert profile["iterations"] == 1 and profile["aten_ops_per_iter"] > 100
    with open(profile["trace"]) as f:
        assert any(e.get("name") == "aten::mm" for e in json.load(f)["traceEvents"])
    assert "aten::mm" in open(profile["table"]).read()


def test_parity_of_compiled_checkpointed_training_with_the_reference(benchmarks, benchmark_args):
    """On the CPU both runs are fp32, so compiled (aot_eager) and checkpointed blocks must match exactly."""
    _, parity = benchmarks
    argv = ["--config-file", SAMPLE_CONFIG, "--iterations", "2", "--rtol", "0", "--atol", "1e-6", *TINY_BENCH,
            "student.drop_path_rate=0.3", "train.compile=true", "train.compile_backend=aot_eager",
            "train.activation_checkpointing=true"]  # fmt: skip
    args = benchmark_args(parity, argv)
    (record,) = parity.run(args)
    assert record["within_tolerance"] is True and record["keys"][0] == "total_loss"
    assert len(record["reference"]) == len(record["fast"]) == len(record["mixed"]) == 2
    assert record["mixed"] == record["reference"]  # fp32 on the CPU: without the switches, the reference itself
    assert set(record["allowance"].values()) == {0.0}
    assert all(math.isfinite(v) and v != 0 for row in record["reference"] for v in row[:2])
    assert max(record["max_abs_diff"].values()) <= 1e-6
    assert record["reference"][0] != record["reference"][1]  # the second iteration saw updated weights


def test_parity_failure_is_reported_and_sets_the_exit_code(benchmarks, monkeypatch, capsys):
    _, parity = benchmarks
    curves = {True: [[1.0, 0.5, 0.2, 0.1, 0.2]] * 2, False: [[1.0, 0.5, 0.2, 0.1, 0.2], [1.2, 0.5, 0.2, 0.1, 0.4]]}
    monkeypatch.setattr(parity, "loss_curve", lambda cfg, iterations, reference: curves[reference])
    benchmark = importlib.import_module("benchmark")
    assert benchmark.main(["parity", "--config-file", SAMPLE_CONFIG, "--iterations", "2", "--rtol", "0.1",
                           "--atol", "0"]) == 1
    record = json.loads(capsys.readouterr().out)
    assert record["within_tolerance"] is False
    assert record["max_abs_diff"] == pytest.approx({"total_loss": 0.2, "dino_local_crops_loss": 0.0,
                                                     "dino_global_crops_loss": 0.0, "koleo_loss": 0.0,
                                                     "ibot_loss": 0.2})
    assert benchmark.main(["parity", "--config-file", SAMPLE_CONFIG, "--iterations", "2", "--rtol", "1.0"]) == 0


def test_parity_allowance_is_the_drift_of_mixed_precision_alone(benchmarks, monkeypatch, benchmark_args):
    """With speed switches on, a loss term may differ from fp32 by the tolerance plus `--mp-factor` x the largest
    difference of the same precision without the switches; a term that mixed precision leaves alone gets nothing."""
    _, parity = benchmarks
    reference = [[1.0, 0.5, 0.2, 0.1, 0.2], [0.9, 0.5, 0.2, 0.1, 0.1]]
    mixed = [[1.05, 0.5, 0.2, 0.15, 0.2], [0.95, 0.5, 0.2, 0.15, 0.1]]  # KoLeo (and the total) drift by 0.05
    fast = [[1.08, 0.5, 0.2, 0.18, 0.2], [0.98, 0.5, 0.2, 0.18, 0.1]]
    curves = {"reference": reference, "mixed": mixed, "fast": fast}

    def loss_curve(cfg, iterations, reference):
        return curves["reference" if reference else "fast" if cfg.train.compile else "mixed"]

    monkeypatch.setattr(parity, "loss_curve", loss_curve)
    argv = ["--config-file", SAMPLE_CONFIG, "--iterations", "2", "--rtol", "0.02", "--atol", "0.01",
            "train.compile=true"]  # fmt: skip
    (record,) = parity.run(benchmark_args(parity, argv))
    assert record["mixed_max_abs_diff"] == pytest.approx({"total_loss": 0.05, "dino_local_crops_loss": 0.0,
                                                          "dino_global_crops_loss": 0.0, "koleo_loss": 0.05,
                                                          "ibot_loss": 0.0})  # fmt: skip
    assert record["allowance"]["koleo_loss"] == pytest.approx(0.1) and record["allowance"]["ibot_loss"] == 0.0
    assert record["fast_vs_mixed_max_abs_diff"]["koleo_loss"] == pytest.approx(0.03)
    assert record["within_tolerance"] is True  # 0.08 <= 0.01 + 0.02 * 0.1 + 0.1
    (record,) = parity.run(benchmark_args(parity, ["--mp-factor", "1", *argv]))
    assert record["within_tolerance"] is False  # 0.08 > 0.01 + 0.002 + 0.05
    fast[1][4] = 0.13  # iBOT moves where mixed precision alone did not: beyond 0.01 + 0.02 * 0.1
    (record,) = parity.run(benchmark_args(parity, argv))
    assert record["within_tolerance"] is False


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_path_on_cpu(benchmarks, monkeypatch, precision, benchmark_args):
    """The CUDA precision plumbing, run on the CPU (which normally forces fp32): crops in the param dtype, one
    process's low-precision copies with fp16 + ShardedGradScaler (the default config) or bf16 without a scaler. The losses stay within mixed-precision
    distance of the fp32 reference and differ from it, which shows that the low-precision path really ran; compiled
    (aot_eager) and checkpointed blocks and compiled loss maths give exactly the losses of the plain mixed-precision
    run (which parity runs without all three switches)."""
    import dinov2.train.ssl_meta_arch as ssl_meta_arch

    train_bench, parity = benchmarks
    monkeypatch.setattr(ssl_meta_arch, "mixed_precision_enabled", lambda: True)
    overrides = TINY_BENCH + precision_opts(precision, grad_scaler=precision == "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    cfg = train_bench.load_cfg(SAMPLE_CONFIG, overrides)
    model, step, batches = train_bench.build_training(cfg)
    assert batches[0]["collated_global_crops"].dtype == dtype
    assert [c.module for c in model._copies["student"]] == list(model._run["student"].values())  # no FSDP
    assert {p.dtype for c in model._copies["student"] for p in c.module.parameters()} == {dtype}
    assert (model.fp16_scaler is not None) == (precision == "fp16")
    step(0)
    if precision == "fp16":
        assert model.fp16_scaler.get_scale() in (65536.0, 32768.0)  # stepped (or backed off once)

    # a long warm-up as in real configs: the first fp16 steps are skipped by the scaler while its scale settles;
    # with the speed switches, which must not change the mixed-precision maths either
    slow_warmup = ["train.OFFICIAL_EPOCH_LENGTH=1000"]
    switches = ["train.compile=true", "train.compile_backend=aot_eager", "train.activation_checkpointing=true",
                "train.compile_loss=true"]  # fmt: skip
    argv = ["--config-file", SAMPLE_CONFIG, "--iterations", "3", *overrides, *slow_warmup, *switches]
    args = benchmark_args(parity, argv)
    (record,) = parity.run(args)
    assert record["fast"] == record["mixed"] and record["within_tolerance"] is True
    for reference, fast in zip(record["reference"], record["fast"]):
        assert all(math.isfinite(v) for v in fast)
        # total = DINO local + DINO global + 2 x (KoLeo + iBOT), the last two being reported per global crop
        assert fast[0] == pytest.approx(fast[1] + fast[2] + 2 * (fast[3] + fast[4]), rel=1e-5)
        # DINO and iBOT terms; KoLeo (-log of nearest-neighbour distances between the almost equal class tokens of
        # an untrained model) is the precision-sensitive term, within parity's allowance (`within_tolerance` above):
        # bf16 moves it by up to 45 % here, by how much depends on the torch version's CPU kernels
        assert [fast[i] for i in (1, 2, 4)] == pytest.approx([reference[i] for i in (1, 2, 4)], rel=0.01)
    assert record["max_abs_diff"]["total_loss"] > 1e-4


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_one_process_without_fsdp_trains_like_fsdp(benchmarks, monkeypatch, precision):
    """One process runs the student and teacher as low-precision copies of fp32 modules instead of FSDP units
    (`train.single_process_fsdp=false`, the default): the same mixed-precision maths, so a few iterations (optimizer
    steps through the grad scaler, EMA) give exactly the losses, parameters and gradients of the FSDP path. The
    reduce dtypes stay fp32: FSDP rounds gradients to reduce_dtype even at world size 1, where nothing is reduced,
    and the copies do not."""
    import dinov2.train.ssl_meta_arch as ssl_meta_arch
    from dinov2.fsdp import is_fsdp

    from torch.distributed.fsdp._common_utils import FSDP_PREFIX

    train_bench, _ = benchmarks
    monkeypatch.setattr(ssl_meta_arch, "mixed_precision_enabled", lambda: True)
    overrides = TINY_BENCH + precision_opts(precision, grad_scaler=precision == "fp16", keys=("param_dtype",))
    overrides += ["optim.warmup_epochs=0", "compute_precision.student.dino_head.mixed_precision.param_dtype=fp32"]
    iterations = 14 if precision == "fp16" else 4  # fp16: past the scaler's first overflowing (skipped) steps
    runs = {}
    for fsdp in (True, False):
        cfg = train_bench.load_cfg(SAMPLE_CONFIG, overrides + [f"train.single_process_fsdp={str(fsdp).lower()}"])
        model, step, _ = train_bench.build_training(cfg)
        assert all(is_fsdp(m) == fsdp for m in model.student.values())
        losses = [{k: v.item() for k, v in step(it).items()} for it in range(iterations)]
        params = {f"{side}.{n}".replace(FSDP_PREFIX, ""): p.detach().clone() for side in ("student", "teacher")
                  for n, p in getattr(model, side).named_parameters()}  # fmt: skip
        grads = {n.replace(FSDP_PREFIX, ""): p.grad.clone() for n, p in model.student.named_parameters()
                 if p.grad is not None}  # fmt: skip
        runs[fsdp] = losses, params, grads, model
    (fsdp_losses, fsdp_params, fsdp_grads, _), (losses, params, grads, model) = runs[True], runs[False]
    assert losses == fsdp_losses
    assert sorted(params) == sorted(fsdp_params) and sorted(grads) == sorted(fsdp_grads)
    for name, value in params.items():
        assert value.dtype == torch.float32 and torch.equal(value, fsdp_params[name]), name
    for name, value in grads.items():
        assert torch.equal(value, fsdp_grads[name]), name
    assert all(torch.isfinite(g).all() for g in grads.values())
    trained = [n for n in grads if n.startswith("backbone.blocks")]  # the EMA teacher lags behind the student
    assert trained and not any(torch.equal(params[f"student.{n}"], params[f"teacher.{n}"]) for n in trained)
    # the fp32 head ran as the module itself, its fp16/bf16 input cast like FSDP's
    assert model._run["student"]["dino_head"] is model.student.dino_head
    # the teacher's copies were freed after each teacher forward (train.release_teacher_copy), the student's kept
    teacher_copies, student_copies = model._copies["teacher"], model._copies["student"]
    assert teacher_copies and all(c.released for c in teacher_copies)
    assert {p.untyped_storage().nbytes() for c in teacher_copies for p in c.module.parameters()} == {0}
    assert student_copies and not any(c.releasable for c in student_copies)
