"""scripts/benchmarks/backbone.py: the documented forward FLOP formula and one record (tiny model, CPU)."""

from dinov2.models import vision_transformer as vits


def test_forward_flops_follow_the_documented_formula(load_benchmark):
    backbone = load_benchmark("backbone")
    model = vits.vit_tiny(patch_size=16, img_size=32, block_chunks=0)
    patches, tokens, dim, hidden = 4, 5, 192, 768  # 32 / 16 = 2 x 2 patches + the class token
    per_block = 8 * tokens * dim**2 + 4 * tokens**2 * dim + 4 * tokens * dim * hidden
    assert backbone.forward_flops(model, 32) == 2 * patches * 3 * 16**2 * dim + 12 * per_block


def test_backbone_record(load_benchmark, benchmark_args):
    backbone = load_benchmark("backbone")
    argv = ["--arch", "vit_tiny", "--patch-size", "16", "--img-size", "32", "--batch-size", "2", "--iters", "2",
            "--warmup", "1", "--device", "cpu"]  # fmt: skip
    (record,) = backbone.run(benchmark_args(backbone, argv))
    assert record["benchmark"] == "backbone" and record["arch"] == "vit_tiny"
    assert record["batch_size"] == 2 and record["iters"] == 2
    flops = backbone.forward_flops(vits.vit_tiny(patch_size=16, img_size=32), 32)
    assert record["gflops_per_image"] == round(flops / 1e9, 3)
    assert record["images_per_s"] > 0 and record["ms_per_batch"] > 0 and "peak_memory_gib" not in record
