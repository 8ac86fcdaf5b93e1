"""dinov2.utils.utils: strict pretrained-weight loading (formats, prefixes, chunked <-> flat keys, error report),
seeding, git info, CosineScheduler, BatchNorm detection, CUDA-graph compile modes."""

import logging
import math
import os
import random
import subprocess
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.utils import utils
from dinov2.utils.utils import (
    CosineScheduler,
    PretrainedWeightsError,
    convert_chunked_to_flat,
    convert_flat_to_chunked,
    fix_random_seeds,
    get_sha,
    has_batchnorms,
    load_pretrained_weights,
    torch_version,
    uses_cuda_graphs,
)


def tiny_vit(seed: int = 0, **kwargs) -> DinoVisionTransformer:
    """A 4-block ViT with the released key layout (LayerScale, patch 14), small enough for CPU tests."""
    torch.manual_seed(seed)
    args = dict(img_size=28, patch_size=14, embed_dim=32, depth=4, num_heads=2, init_values=1.0, block_chunks=0)
    args.update(kwargs)
    return DinoVisionTransformer(**args)


def assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    """Equal parameters, compared through the flat block layout of both models."""
    got = convert_chunked_to_flat(model.state_dict())
    expected = convert_chunked_to_flat(reference.state_dict())
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.fixture
def dinov2_logs():
    """Messages of the "dinov2" logger (which may not propagate to the root logger)."""
    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("dinov2")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


# ---------------------------------------------------------------- checkpoint formats


def test_raw_hub_state_dict_round_trip(tmp_path, dinov2_logs):
    source = tiny_vit(seed=1)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(source.state_dict(), path)
    target = tiny_vit(seed=2)
    load_pretrained_weights(target, str(path))
    assert_same_weights(target, source)
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    assert f"Loaded pretrained weights from {path}" in dinov2_logs


def test_model_key_with_module_prefix(tmp_path):
    source = tiny_vit(seed=1)
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    target = tiny_vit(seed=2)
    load_pretrained_weights(target, str(path))
    assert_same_weights(target, source)


def test_teacher_checkpoint_with_backbone_prefix_drops_heads(tmp_path, dinov2_logs):
    source = tiny_vit(seed=1)
    teacher = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    teacher.update({"dino_head.mlp.0.weight": torch.ones(3, 32), "dino_head.last_layer.weight_v": torch.ones(5, 3)})
    teacher["ibot_head.mlp.0.bias"] = torch.ones(3)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    target = tiny_vit(seed=2)
    load_pretrained_weights(target, str(path), checkpoint_key="teacher")
    assert_same_weights(target, source)
    dropped = [m for m in dinov2_logs if m.startswith("Ignoring checkpoint entries")]
    assert dropped == [
        f"Ignoring checkpoint entries not loaded into the model from {path}: "
        "dino_head.* (2 keys), ibot_head.* (1 keys)"
    ]


def test_student_key_is_selected_when_asked(tmp_path):
    student, teacher = tiny_vit(seed=1), tiny_vit(seed=3)
    path = tmp_path / "both.pth"
    torch.save(
        {
            "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
        },
        path,
    )
    target = tiny_vit(seed=2)
    load_pretrained_weights(target, str(path), checkpoint_key="student")
    assert_same_weights(target, student)
    load_pretrained_weights(target, str(path))  # default key: teacher
    assert_same_weights(target, teacher)


def test_full_training_checkpoint_selects_teacher_backbone(tmp_path, dinov2_logs):
    student, teacher = tiny_vit(seed=1), tiny_vit(seed=3)
    model = {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    model.update({f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()})
    model["teacher.dino_head.mlp.0.weight"] = torch.zeros(2, 32)
    path = tmp_path / "model_0000009.rank_0.pth"
    torch.save({"model": model, "optimizer": {}, "iteration": 9}, path)
    target = tiny_vit(seed=2)
    load_pretrained_weights(target, str(path), checkpoint_key="teacher")
    assert_same_weights(target, teacher)
    n_student = len(student.state_dict())
    assert f"from {path}: student.* ({n_student} keys)" in " ".join(dinov2_logs)
    assert f"from {path}: dino_head.* (1 keys)" in " ".join(dinov2_logs)


def test_missing_checkpoint_key_names_top_level_keys(tmp_path):
    path = tmp_path / "student_only.pth"
    torch.save({"student": {"backbone.cls_token": torch.zeros(1, 1, 32)}, "iteration": 1}, path)
    with pytest.raises(PretrainedWeightsError, match=r"student_only\.pth.*'teacher'.*\['iteration', 'student'\]"):
        load_pretrained_weights(tiny_vit(), str(path), checkpoint_key="teacher")


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here.pth"):
        load_pretrained_weights(tiny_vit(), str(tmp_path / "nothing_here.pth"))
    corrupt = tmp_path / "truncated.pth"
    torch.save(tiny_vit().state_dict(), corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    with pytest.raises(PretrainedWeightsError, match="truncated.pth"):
        load_pretrained_weights(tiny_vit(), str(corrupt))


def test_url_is_fetched_through_torch_hub(monkeypatch):
    source = tiny_vit(seed=1)
    calls = []

    def fake_load_state_dict_from_url(url, **kwargs):
        calls.append((url, kwargs))
        return source.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_load_state_dict_from_url)
    target = tiny_vit(seed=2)
    url = "https://example.org/dinov2_tiny_pretrain.pth"
    load_pretrained_weights(target, url)
    assert calls == [(url, {"map_location": "cpu", "weights_only": True})]
    assert_same_weights(target, source)

    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError, match=rf"Cannot download weights from {url} \(.*name resolution"):
        load_pretrained_weights(target, url)


# ---------------------------------------------------------------- chunked <-> flat


def test_convert_helpers_both_directions_exact_keys_and_values():
    flat = tiny_vit(seed=1, block_chunks=0)
    chunked = tiny_vit(seed=1, block_chunks=2)
    flat_sd, chunked_sd = flat.state_dict(), chunked.state_dict()
    assert "blocks.1.2.attn.qkv.weight" in chunked_sd  # chunk 1 holds blocks 2 and 3

    to_chunked = convert_flat_to_chunked(flat_sd, block_chunks=2, depth=4)
    assert list(to_chunked) == list(chunked_sd)
    to_flat = convert_chunked_to_flat(chunked_sd)
    assert list(to_flat) == list(flat_sd)
    for key, value in flat_sd.items():  # same seed: identical values under both layouts
        torch.testing.assert_close(to_flat[key], value, rtol=0, atol=0)
    for key, value in chunked_sd.items():
        assert to_chunked[key] is flat_sd[convert_chunked_to_flat({key: 0}).popitem()[0]]
        torch.testing.assert_close(to_chunked[key], value, rtol=0, atol=0)


def test_convert_flat_to_chunked_vit_large_layout_and_prefixes():
    flat = {f"backbone.blocks.{i}.ls1.gamma": i for i in range(24)}
    chunked = convert_flat_to_chunked(flat, block_chunks=4, depth=24)
    assert list(chunked) == [f"backbone.blocks.{i // 6}.{i}.ls1.gamma" for i in range(24)]
    assert convert_chunked_to_flat(chunked) == flat
    with pytest.raises(ValueError, match="beyond depth=12"):
        convert_flat_to_chunked(flat, block_chunks=4, depth=12)
    with pytest.raises(ValueError, match="block_chunks"):
        convert_flat_to_chunked(flat, block_chunks=0, depth=24)


@pytest.mark.parametrize("source_chunks, target_chunks", [(2, 0), (0, 2), (4, 2)])
def test_load_converts_block_layout_to_the_model(tmp_path, source_chunks, target_chunks):
    source = tiny_vit(seed=1, block_chunks=source_chunks)
    path = tmp_path / "weights.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, path)
    target = tiny_vit(seed=2, block_chunks=target_chunks)
    load_pretrained_weights(target, str(path))
    assert_same_weights(target, source)
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


# ---------------------------------------------------------------- strict errors


def test_strict_error_lists_missing_unexpected_and_shape_mismatches(tmp_path):
    released = tiny_vit(img_size=518, depth=2)  # pos_embed (1, 1370, 32), LayerScale, no registers
    path = tmp_path / "dinov2_tiny14_pretrain.pth"
    torch.save(released.state_dict(), path)
    model = tiny_vit(img_size=224, depth=2, init_values=None, num_register_tokens=4)  # pos_embed (1, 257, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedWeightsError) as excinfo:
        load_pretrained_weights(model, str(path))
    err = excinfo.value
    assert err.path == str(path)
    assert err.missing_keys == ["register_tokens"]
    unexpected = ["blocks.0.ls1.gamma", "blocks.0.ls2.gamma", "blocks.1.ls1.gamma", "blocks.1.ls2.gamma"]
    assert err.unexpected_keys == unexpected
    assert err.shape_mismatches == {"pos_embed": ((1, 1370, 32), (1, 257, 32))}
    message = str(err)
    assert str(path) in message
    assert "missing keys (1): register_tokens" in message
    assert f"unexpected keys (4): {', '.join(unexpected)}" in message
    assert "shape mismatch pos_embed: checkpoint (1, 1370, 32) vs model (1, 257, 32)" in message
    assert "img_size=518" in message
    for key, value in model.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_another_architecture_gives_a_short_error_naming_the_width(tmp_path):
    """Weights of a wider model: every tensor mismatches; 10 are listed, the rest counted, and the widths named."""
    path = tmp_path / "wide.pth"
    torch.save(tiny_vit(embed_dim=48).state_dict(), path)
    with pytest.raises(PretrainedWeightsError) as excinfo:
        load_pretrained_weights(tiny_vit(), str(path))
    err = excinfo.value
    assert len(err.shape_mismatches) == 7 + 4 * 14  # all of them stay available on the error
    lines = str(err).splitlines()
    assert sum(line.startswith("  shape mismatch ") for line in lines) == 10
    assert "  shape mismatch pos_embed: checkpoint (1, 5, 48) vs model (1, 5, 32)" in lines  # same grid: no hint
    assert lines[-2] == "  and 53 more shape mismatches: blocks.* (51), norm.* (2)"
    assert lines[-1] == ("  the checkpoint's embedding width is 48, the model's 32 (vit_small 384, vit_base 768, "
                         "vit_large 1024, vit_giant2 1536): check student.arch")


def test_non_strict_loads_matching_entries_and_warns(tmp_path, dinov2_logs):
    released = tiny_vit(seed=1, img_size=518, depth=2)
    path = tmp_path / "weights.pth"
    torch.save(released.state_dict(), path)
    model = tiny_vit(seed=2, img_size=224, depth=2)
    pos_embed_before = model.pos_embed.detach().clone()
    load_pretrained_weights(model, str(path), strict=False)
    torch.testing.assert_close(model.pos_embed, pos_embed_before, rtol=0, atol=0)
    for key, value in released.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert any("shape mismatch pos_embed" in m and "strict=False" in m for m in dinov2_logs)


# ---------------------------------------------------------------- other helpers


def test_fix_random_seeds_reproduces_all_generators():
    fix_random_seeds(7)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    fix_random_seeds(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    fix_random_seeds(8)
    assert torch.rand(1).item() != first[2]


def test_get_sha_inside_and_outside_git(monkeypatch):
    expected_sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=utils.__file__.rsplit("/", 1)[0])
    info = get_sha()
    assert info.startswith(f"sha: {expected_sha.decode().strip()}, status: ")
    assert ", branch: " in info

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(utils.subprocess, "check_output", no_git)
    assert get_sha() == "unknown"


def test_cosine_scheduler_matches_formula():
    base, final, total, warmup, start, freeze = 1.0, 0.1, 20, 5, 0.2, 3
    scheduler = CosineScheduler(base, final, total, warmup_iters=warmup, start_warmup_value=start, freeze_iters=freeze)
    n_cos = total - warmup - freeze
    expected = [0.0] * freeze
    expected += [start + (base - start) * i / (warmup - 1) for i in range(warmup)]
    expected += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n_cos)) for i in range(n_cos)]
    assert [scheduler[i] for i in range(total)] == pytest.approx(expected, abs=1e-12)
    assert scheduler[3] == 0.2 and scheduler[7] == 1.0 and scheduler[8] == 1.0
    assert scheduler[total] == final and scheduler[10**6] == final
    assert len(scheduler.schedule) == total


def test_cosine_scheduler_plain_and_invalid():
    scheduler = CosineScheduler(0.04, 0.4, 4)
    half_cos = [(1 - math.cos(math.pi * i / 4)) / 2 for i in range(4)]  # 0, .146, .5, .854
    assert [scheduler[i] for i in range(5)] == pytest.approx([0.04 + 0.36 * h for h in half_cos] + [0.4])
    assert scheduler[2] == pytest.approx(0.22)
    with pytest.raises(ValueError, match="freeze_iters=3, warmup_iters=2, total_iters=4"):
        CosineScheduler(1.0, 0.0, 4, warmup_iters=2, freeze_iters=3)


def test_has_batchnorms():
    assert not has_batchnorms(tiny_vit())
    assert has_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert has_batchnorms(nn.ModuleDict({"head": nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2))}))
    assert not has_batchnorms(nn.Sequential(nn.LayerNorm(4), nn.GroupNorm(2, 4)))


def test_atomic_write_replaces_whole_files_and_keeps_the_old_one_on_failure(tmp_path):
    from dinov2.utils.utils import atomic_write

    path = tmp_path / "result.json"
    atomic_write(str(path), lambda f: f.write("first\n"), binary=False)
    assert path.read_text() == "first\n"

    def crash(f):
        f.write(b"partial")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), crash)
    assert path.read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temp file left behind

    umask = os.umask(0o022)
    try:
        atomic_write(str(path), lambda f: f.write(b"second"))
    finally:
        os.umask(umask)
    assert path.read_bytes() == b"second"
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "backend, mode, expected",
    [("inductor", None, False), ("inductor", "default", False), ("inductor", "max-autotune-no-cudagraphs", False),
     ("inductor", "reduce-overhead", True), ("inductor", "max-autotune", True), ("aot_eager", None, False)],
)
def test_uses_cuda_graphs(backend, mode, expected):
    assert uses_cuda_graphs({"backend": backend, "mode": mode}) is expected


@pytest.mark.parametrize("version, expected", [("2.4.1+cu121", (2, 4)), ("2.11.0a0+git1234", (2, 11)),
                                               ("2.14.1", (2, 14))])
def test_torch_version_reads_major_and_minor(monkeypatch, version, expected):
    monkeypatch.setattr(torch, "__version__", version)
    assert torch_version() == expected
