"""scripts/benchmarks/summary.py: the GPU suite's JSON lines as tables against the upstream anchor."""

import json

import pytest


@pytest.fixture
def summary(load_benchmark):
    return load_benchmark("summary")


def train_record(**changes):
    record = {
        "benchmark": "train", "arch": "vit_large", "patch_size": 16, "batch_size": 64, "crops": "2x224 + 8x96",
        "dtype": "float16", "grad_scaler": True, "compile": True, "warmup": 10, "iterations": 50, "runs": 2,
        "images_per_s_runs": [300.0, 310.0], "images_per_s_mean": 305.0, "mfu": 0.59, "peak_memory_gib": 35.0,
    }  # fmt: skip
    record.update(changes)
    return record


def test_train_rows_check_speed_and_memory_only_for_the_anchor_protocol(summary):
    records = [
        train_record(iter_time_mean_s=0.20983, host_ms_per_iter={"forward_backward": 150.0, "device_wait": 40.25},
                     compile_loss=True),
        # 305 / 221.9 = 1.37x >= 1.25x; 35 GiB = 37.6 GB <= 39.7
        train_record(peak_memory_gib=37.5),  # 40.3 GB > 39.7 GB (though 37.5 GiB < 39.7)
        train_record(dtype="bfloat16", grad_scaler=False),  # reported beside, no target
        train_record(warmup=1, runs=1),  # a smoke run: not the protocol
        train_record(arch="vit_small", patch_size=14, crops="2x224 + 8x98", images_per_s_mean=700.0, compile=False,
                     images_per_s_runs=[700.0, 700.0], peak_memory_gib=None, mfu=None),  # 1.72x < 2x
    ]  # fmt: skip
    rows = summary.train_rows(records)
    assert rows[0] == ["vit_large/16", "float16 + scaler", "blocks + loss", "yes", "305.0 (300.0, 310.0)",
                       "1.37× (target 1.25×)", "yes", "0.590", "37.6 GB (35.0 GiB)", "yes",
                       "40.2 of 209.8 ms"]  # fmt: skip
    assert rows[1][-3:] == ["40.3 GB (37.5 GiB)", "**no**", "—"]  # a record without host phases
    assert rows[1][2] == "blocks"
    assert rows[2][1] == "bfloat16" and rows[2][5:7] == ["1.37× (target 1.25×)", "—"] and rows[2][-2] == "—"
    assert rows[3][3] == "no" and rows[3][6] == "—" and rows[3][-2] == "—"
    assert rows[4] == ["vit_small/14", "float16 + scaler", "no", "yes", "700.0 (700.0, 700.0)",
                       "1.72× (target 2.0×)", "**no**", "—", "—", "—", "—"]  # fmt: skip


def test_render_reads_every_kind_and_names_a_malformed_line(summary, tmp_path):
    records = [
        train_record(),
        {"benchmark": "extract", "arch": "vit_large", "patch_size": 14, "img_size": 224, "dtype": "bf16",
         "batch_size": 256, "compile": True, "images_per_s": 3100.0},
        {"benchmark": "extract", "arch": "vit_large", "patch_size": 14, "img_size": 224, "dtype": "bf16",
         "batch_size": 256, "compile": True, "compile_mode": "max-autotune-no-cudagraphs", "cast_weights": True,
         "images_per_s": 2800.0},
        {"benchmark": "data", "dataset": "synthetic", "image_size": "4000x3000", "path": "gpu", "device": "cuda",
         "num_workers": 16, "samples_per_s": 130.0},
        {"benchmark": "data", "dataset": "synthetic", "image_size": "4000x3000", "path": "eval-draft", "device": "cpu",
         "num_workers": 16, "samples_per_s": 700.0},
        {"benchmark": "parity", "overrides": ["train.compile=true"], "iterations": 20, "within_tolerance": True,
         "rtol": 0.02, "atol": 0.01, "max_abs_diff": {"total_loss": 0.004, "koleo_loss": 0.0021}, "mp_factor": 2.0,
         "mixed_max_abs_diff": {"total_loss": 0.003, "koleo_loss": 0.002}},
        {"benchmark": "loss", "rows": 4992, "prototypes": 65536, "dtype": "fp16", "compile": True, "ms_per_iter": 1.234,
         "peak_memory_mib": 2400.4, "last_loss": 10.5},
        {"benchmark": "e2e", "arch": "vit_small/14", "batch_size": 64, "gpu_augmentation": True,
         "gpu_side_stream": True, "logged_iterations": 6, "images_per_s": 512.345},
        {"benchmark": "e2e", "arch": "vit_small/14", "batch_size": 64, "gpu_augmentation": False,
         "gpu_side_stream": False, "logged_iterations": 6, "images_per_s": 300.0},
        {"benchmark": "predictor", "runtime": "onnx", "arch": "vit_small", "patch_size": 14, "image_size": "4000x3000",
         "images_per_device": 3, "decode_threads": 4, "device": "cuda:0", "ms_per_device": 41.26,
         "ms_per_device_median": 40.04},
        {"benchmark": "smoke", "run": "resumed", "last_iteration": 299, "resumed_at": 249, "final_total_loss": 9.1,
         "test_image_auroc": {"knn": 0.5, "linear": 0.66, "log_regression": 0.7}},
        {"benchmark": "failed", "run": "scripts/benchmark.py extract --compile", "exit_code": 1},
    ]  # fmt: skip
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert summary.read_records(str(path)) == records
    text = summary.render(records)
    assert "| vit_large/14 224 | bf16 | 256 | yes | 3100.0 | 1.53× (target 1.5×) | yes |" in text
    assert ("| vit_large/14 224 | bf16 weights | 256 | yes (max-autotune-no-cudagraphs) | 2800.0 | "
            "1.38× (target 1.5×) | **no** |") in text  # fmt: skip
    assert "| 4000x3000 | gpu | cuda | 16 | 130.0 | 26 (5.00×) |" in text
    assert "| 4000x3000 | eval-draft | cpu | 16 | 700.0 | — |" in text  # the anchor is a multi-crop pipeline
    assert ("parity (train.compile=true), 20 iterations: within tolerance yes (rtol 0.02, atol 0.01); "
            "max |fast - fp32|: total_loss 0.004, koleo_loss 0.0021; "
            "mixed precision alone (x2.0 allowed on top): total_loss 0.003, koleo_loss 0.002") in text  # fmt: skip
    assert "loss maths 4992 x 65536 fp16, compiled yes: 1.23 ms per iteration, peak 2400 MiB (last loss 10.5)" in text
    assert ("e2e vit_small/14 batch 64, gpu_augmentation=True, gpu_side_stream=True: 512.3 images/s over 6 logged "
            "iterations") in text  # fmt: skip
    assert "e2e vit_small/14 batch 64, gpu_augmentation=False: 300.0 images/s over 6 logged iterations" in text
    assert ("predictor vit_small/14 in onnx, 3 photos of 4000x3000 per device, 4 decoding threads, cuda:0: 41.3 ms "
            "per device (median 40.0)") in text  # fmt: skip
    assert ("smoke resumed: trained to iteration 299, resumed at iteration 249, final total loss 9.1, test image "
            "AUROC {'knn': 0.5, 'linear': 0.66, 'log_regression': 0.7}") in text  # fmt: skip
    assert text.endswith("FAILED (exit code 1): scripts/benchmark.py extract --compile")

    path.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"results\.jsonl:2: not a JSON line"):
        summary.read_records(str(path))
