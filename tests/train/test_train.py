import os
import re
import shutil
import sys

import pytest
import torch
import train_helpers
from omegaconf import OmegaConf
from train_helpers import (
    REPO,
    SAMPLE_CONFIG,
    crash_training,
    precision_opts,
    read_metrics,
    run_torchrun,
    run_training,
    tiny_opts,
)

from dinov2.configs import ConfigError
from dinov2.data.prefetcher import DevicePrefetcher
from dinov2.loss import KoLeoLoss
from dinov2.models import vision_transformer as vits
from dinov2.train import ssl_meta_arch
from dinov2.train import train as train_module
from dinov2.train.ssl_meta_arch import LOSS_KEYS
from dinov2.utils.utils import load_pretrained_weights

METRICS = ("total_loss",) + LOSS_KEYS


def _losses_by_iteration(output_dir):
    return {m["iteration"]: [m[k] for k in METRICS] for m in read_metrics(output_dir)}


def test_loss_decreases_on_sample_data(tmp_path, sample_root):
    """50 iterations. Sinkhorn-Knopp targets keep a fixed entropy, so the loss measures how well the student
    predicts them (with centring the DINO loss first rises while the teacher temperature warms up)."""
    out = str(tmp_path / "run")
    opts = tiny_opts(sample_root, train__OFFICIAL_EPOCH_LENGTH=10, optim__epochs=5, optim__base_lr=0.02,
                     train__centering="sinkhorn_knopp", optim__freeze_last_layer_epochs=0,
                     train__checkpoint_period=1000)
    run_training(out, opts)
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == list(range(50))
    for key in METRICS:
        first, last = (sum(m[key] for m in part) / 5 for part in (metrics[:5], metrics[-5:]))
        assert last < (0.8 if key == "total_loss" else 1.0) * first, (key, first, last)
    # the schedules' values of each logged iteration (not a median over the last 20 logged ones)
    lr, wd, mom, _, last_layer_lr, _ = train_module.build_schedulers(OmegaConf.load(os.path.join(out, "config.yaml")))
    for m in metrics:
        i = m["iteration"]
        expected = [lr[i], wd[i], mom[i], last_layer_lr[i]]
        assert [m[k] for k in ("lr", "wd", "mom", "last_layer_lr")] == pytest.approx(expected, rel=1e-12), i


def _fp16_with_grad_scaler(monkeypatch) -> list:
    """The CUDA default (fp16 FSDP mixed precision + ShardedGradScaler), switched on for the CPU."""
    monkeypatch.setattr(ssl_meta_arch, "mixed_precision_enabled", lambda: True)
    return precision_opts("fp16", grad_scaler=True, keys=("param_dtype",))


@pytest.mark.parametrize(
    "num_workers, gpu_augmentation, fp16",
    [(0, False, False), (2, False, False), (2, True, False), (0, False, True)],
    ids=["in-process", "workers", "gpu-aug", "fp16-scaler"],
)
def test_resumed_run_reproduces_uninterrupted_losses(tmp_path, sample_root, monkeypatch, num_workers,
                                                     gpu_augmentation, fp16):
    """N iterations straight vs a crash, a resume from the last checkpoint (every 4 iterations) and the rest:
    identical losses and checkpoints. Also with the crops rendered by `crops.gpu_augmentation` (here on the CPU),
    and with fp16 + grad scaler, where the run is longer: the scale halves at every overflowing step from 2^16 and
    settles after about 12 iterations, so the crash comes after the optimizer has started stepping, and a scaler that
    did not resume at its saved scale would skip the next steps again. Batches from workers go through the
    `train.prefetch_to_device` wrapper (which reads ahead only on CUDA), the others do not."""
    epochs, crash_iteration = (4, 13) if fp16 else (2, 5)
    iterations, resume_from = 4 * epochs, crash_iteration // 4 * 4 - 1
    opts = tiny_opts(sample_root, train__num_workers=num_workers, crops__gpu_augmentation=gpu_augmentation,
                     optim__epochs=epochs)
    if fp16:
        opts += _fp16_with_grad_scaler(monkeypatch)
    prefetchers = []

    def recorded_prefetcher(*args):
        prefetchers.append(DevicePrefetcher(*args))
        return prefetchers[-1]

    monkeypatch.setattr(train_module, "DevicePrefetcher", recorded_prefetcher)
    straight = str(tmp_path / "straight")
    run_training(straight, opts)
    assert len(prefetchers) == (1 if num_workers > 0 and not gpu_augmentation else 0)
    expected = _losses_by_iteration(straight)
    assert sorted(expected) == list(range(iterations))

    resumed = str(tmp_path / "resumed")
    crash_training(resumed, opts, monkeypatch, crash_iteration)
    checkpoint = f"model_{resume_from:07d}.rank_0.pth"
    assert open(os.path.join(resumed, "last_checkpoint.rank_0")).read().strip() == checkpoint

    run_training(resumed, opts)
    log = open(os.path.join(resumed, "logs", "log.txt")).read()
    assert "Resumed training from checkpoint" in log and f"{checkpoint} at iteration {resume_from}" in log
    got = _losses_by_iteration(resumed)  # the crashed run's iterations, then the resumed one's
    for iteration in range(iterations):
        torch.testing.assert_close(
            torch.tensor(got[iteration]), torch.tensor(expected[iteration]), rtol=0, atol=1e-6,
            msg=f"iteration {iteration}",
        )
    saved = sorted(f for f in os.listdir(resumed) if f.endswith(".pth"))
    assert saved == sorted(f for f in os.listdir(straight) if f.endswith(".pth"))
    assert saved[-2:] == [f"model_{iterations - 1:07d}.rank_0.pth", "model_final.rank_0.pth"]
    if fp16:
        scalers = [torch.load(os.path.join(run, "model_final.rank_0.pth"), weights_only=False)["scaler"]
                   for run in (straight, resumed)]  # fmt: skip
        assert scalers[0] == scalers[1]
        assert scalers[0]["scale"] < 2.0**16 and scalers[0]["_growth_tracker"] >= 2  # backed off, then stepped


def test_compile_and_activation_checkpointing_keep_the_training_losses(tmp_path, sample_root):
    """4 iterations through the training loop: compiled (aot_eager) and checkpointed blocks with the compiled loss
    maths give the losses of the plain run, and the same checkpoint keys."""
    losses, keys = [], []
    for fast in (False, True):
        out = str(tmp_path / f"fast_{fast}")
        opts = tiny_opts(sample_root, optim__epochs=1, student__drop_path_rate=0.3, train__compile=fast,
                         train__compile_backend="aot_eager", train__activation_checkpointing=fast,
                         train__compile_loss=fast)
        run_training(out, opts)
        losses.append(_losses_by_iteration(out))
        keys.append(list(torch.load(os.path.join(out, "model_final.rank_0.pth"), weights_only=True)["model"]))
    assert sorted(losses[0]) == sorted(losses[1]) == [0, 1, 2, 3]
    for iteration, expected in losses[0].items():
        torch.testing.assert_close(torch.tensor(losses[1][iteration]), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert keys[0] == keys[1]


@pytest.mark.parametrize("as_directory", [False, True], ids=["file", "directory"])
def test_model_weights_file_or_directory_resumes_another_run(tmp_path, sample_root, as_directory):
    """MODEL.WEIGHTS = a checkpoint file, or a directory (its last_checkpoint): a full resume in a new output dir."""
    straight = str(tmp_path / "straight")
    run_training(straight, tiny_opts(sample_root))  # checkpoints at iterations 3 and 7
    weights = os.path.join(straight, "model_0000003.rank_0.pth")
    if as_directory:  # a directory whose newest checkpoint is the one of iteration 3
        source = tmp_path / "source"
        source.mkdir()
        shutil.copy(weights, source)
        (source / "last_checkpoint.rank_0").write_text("model_0000003.rank_0.pth")
        weights = str(source)
    out = str(tmp_path / "continued")
    run_training(out, tiny_opts(sample_root, MODEL__WEIGHTS=weights))
    got, expected = _losses_by_iteration(out), _losses_by_iteration(straight)
    assert sorted(got) == [4, 5, 6, 7]
    for iteration in got:
        torch.testing.assert_close(torch.tensor(got[iteration]), torch.tensor(expected[iteration]), rtol=0, atol=1e-6)


def test_max_to_keep_and_no_resume(tmp_path, sample_root):
    out = str(tmp_path / "run")
    run_training(out, tiny_opts(sample_root, train__checkpoint_period=2, train__max_to_keep=2))
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == [
        "model_0000005.rank_0.pth", "model_0000007.rank_0.pth", "model_final.rank_0.pth",
    ]
    first_run = read_metrics(out)
    with open(os.path.join(out, "training_metrics.json"), "a") as f:
        f.write('{"iteration": 8, "total_lo')  # a line a crash cut short
    run_training(out, tiny_opts(sample_root, train__checkpoint_period=2, train__max_to_keep=2), no_resume=True)
    metrics = read_metrics(out)  # started over: the first run's records are gone, not listed before the new ones
    assert [m["iteration"] for m in metrics] == list(range(8))
    assert [m["total_loss"] for m in metrics] == [m["total_loss"] for m in first_run]  # same seed, same losses


@pytest.mark.parametrize("key, value, message", [
    ("checkpoint_period", 0, r"train\.checkpoint_period must be a number of iterations >= 1 or null, got 0"),
    ("log_period", 0, r"train\.log_period must be a number of iterations >= 1, got 0"),
    ("log_period", None, r"train\.log_period must be a number of iterations >= 1, got None"),
])
def test_bad_periods_are_named_before_training(key, value, message):
    cfg = train_helpers.tiny_cfg()
    cfg.train[key] = value
    with pytest.raises(ConfigError, match=message):
        train_module.do_train(cfg, model=None)


def test_collapse_warning_names_the_kind_of_collapse():
    uniform = train_module.collapse_warning({"dino_target_entropy": 0.995, "dino_target_prototypes": 256.0}, 256)
    assert uniform.startswith("Collapse: the DINO targets are almost uniform (entropy 0.9950 of ln 256)")
    one = train_module.collapse_warning({"dino_target_entropy": 0.01, "dino_target_prototypes": 1.2}, 256)
    assert one.startswith("Collapse: every image goes to the same DINO prototype (effective prototypes in a batch: "
                          "1.20)")
    assert train_module.collapse_warning({"dino_target_entropy": 0.6, "dino_target_prototypes": 40.0}, 256) is None


def test_uniform_targets_are_reported_once_after_the_temperature_warmup(tmp_path, sample_root):
    """A random ViT-Ti with layer scales of 1e-5 gives every image the same class token, so its Sinkhorn targets are
    uniform: logged (entropy 1, all 64 prototypes) and warned about once, at the first log after the teacher's
    temperature warm-up (4 iterations)."""
    out = str(tmp_path / "run")
    run_training(out, tiny_opts(sample_root, train__centering="sinkhorn_knopp"))
    metrics = read_metrics(out)
    assert all(m["dino_target_entropy"] == pytest.approx(1.0, abs=1e-4) for m in metrics)
    assert all(m["dino_target_prototypes"] == pytest.approx(64.0, rel=1e-3) for m in metrics)
    log = open(os.path.join(out, "logs", "log.txt")).read()
    assert log.count("Collapse:") == 1 and "Iteration 4: Collapse: the DINO targets are almost uniform" in log


def test_non_finite_loss_stops_the_run(tmp_path, sample_root, monkeypatch):
    original = KoLeoLoss.forward
    calls = {"n": 0}

    def inf_at_iteration_2(self, x):
        calls["n"] += 1  # two KoLeo calls (one per global crop) per iteration
        value = original(self, x)
        return value + float("inf") if calls["n"] == 5 else value

    monkeypatch.setattr(KoLeoLoss, "forward", inf_at_iteration_2)
    out = str(tmp_path / "run")
    with pytest.raises(FloatingPointError) as excinfo:
        run_training(out, tiny_opts(sample_root, train__log_period=5, train__checkpoint_period=1000))
    message = str(excinfo.value)
    assert message.startswith("Non-finite total loss at iteration 2: total_loss=inf")
    for key in LOSS_KEYS:
        assert re.search(rf"{key}=[-+0-9.einf]+", message), key
    assert "koleo_loss=inf" in message
    assert not [f for f in os.listdir(out) if f.endswith(".pth")]  # stopped at iteration 5, before any save


def test_teacher_checkpoint_has_upstreams_chunked_keys_and_loads_into_chunked_and_hub_models(tmp_path, sample_root):
    """With student.block_chunks 4 the teacher is saved as upstream saves it, `blocks.<chunk>.<i>.`, so a model built
    from the run's config (upstream's evaluation) takes it as it is; this codebase's loader also puts it into the
    flat hub model."""
    out = str(tmp_path / "run")
    run_training(out, tiny_opts(sample_root, student__block_chunks=4, evaluation__eval_period_iterations=4))
    for name in ("training_3", "training_7"):
        assert os.path.isfile(os.path.join(out, "eval", name, "teacher_checkpoint.pth"))
    path = os.path.join(out, "eval", "training_7", "teacher_checkpoint.pth")
    checkpoint = torch.load(path, weights_only=True)
    assert list(checkpoint) == ["teacher"]
    state = checkpoint["teacher"]
    chunk_and_block = sorted({(int(m.group(1)), int(m.group(2))) for k in state
                              if (m := re.match(r"backbone\.blocks\.(\d+)\.(\d+)\.", k))})  # fmt: skip
    assert chunk_and_block == [(i // 3, i) for i in range(12)]  # upstream's BlockChunk: global block indices
    assert not any(re.match(r"backbone\.blocks\.\d+\.[a-z]", k) for k in state)
    assert {k.split(".")[0] for k in state} == {"backbone", "dino_head"}

    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    chunked = vits.vit_tiny(patch_size=16, img_size=64, init_values=1e-5, block_chunks=4)
    chunked.load_state_dict(backbone, strict=True)
    hub_model = vits.vit_tiny(patch_size=16, img_size=64, init_values=1e-5, block_chunks=0)
    load_pretrained_weights(hub_model, path, "teacher", strict=True)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(hub_model.eval()(images), chunked.eval()(images), rtol=0, atol=0)

    # --eval-only resumes the last checkpoint and saves the same teacher under eval/manual_<next iteration>
    run_training(out, tiny_opts(sample_root, student__block_chunks=4), eval_only=True)
    manual = torch.load(os.path.join(out, "eval", "manual_8", "teacher_checkpoint.pth"), weights_only=True)["teacher"]
    assert list(manual) == list(state)
    for k, v in state.items():
        assert torch.equal(manual[k], v), k


def _weight_decay_by_group(checkpoint):
    groups = torch.load(checkpoint, weights_only=True)["optimizer"]["param_groups"]
    return sorted((g["wd_multiplier"], len(g["params"])) for g in groups)


def test_two_process_torchrun_saves_and_resumes_on_other_world_sizes(tmp_path, sample_root):
    """2 sharded ranks (4 iterations), then 1 process resuming from their checkpoint (4 more), then 2 ranks again
    resuming from the single process's (4 more): the optimizer groups, weight decay included, are the same at every
    world size."""
    out = str(tmp_path / "run")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        os.path.join(REPO, "dinov2", "train", "train.py"), "--config-file", SAMPLE_CONFIG, "--output-dir", out,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_torchrun(cmd + tiny_opts(sample_root, optim__epochs=1, train__checkpoint_period=2), env)
    for rank in (0, 1):
        assert os.path.isfile(os.path.join(out, f"model_0000003.rank_{rank}.pth"))
        assert open(os.path.join(out, f"last_checkpoint.rank_{rank}")).read() == f"model_final.rank_{rank}.pth"
    assert os.path.isfile(os.path.join(out, "eval", "training_3", "teacher_checkpoint.pth"))
    two_rank_groups = _weight_decay_by_group(os.path.join(out, "model_final.rank_0.pth"))
    assert {wd for wd, _ in two_rank_groups} == {0.0, 1.0}

    run_training(out, tiny_opts(sample_root, optim__epochs=2, train__checkpoint_period=2))
    log = open(os.path.join(out, "logs", "log.txt")).read()
    assert "model_final.rank_0.pth at iteration 3" in log and "written by 2 ranks, this run has 1" in log
    assert _weight_decay_by_group(os.path.join(out, "model_final.rank_0.pth")) == two_rank_groups

    run_torchrun(cmd + tiny_opts(sample_root, optim__epochs=3, train__checkpoint_period=2), env)
    for rank, log_name in ((0, "log.txt"), (1, "log.txt.rank1")):
        log = open(os.path.join(out, "logs", log_name)).read()
        assert "model_final.rank_0.pth at iteration 7" in log  # rank 1 reads rank 0's file: one process wrote it
    assert [m["iteration"] for m in read_metrics(out)] == list(range(12))
    assert os.path.isfile(os.path.join(out, "eval", "training_11", "teacher_checkpoint.pth"))
    assert _weight_decay_by_group(os.path.join(out, "model_final.rank_0.pth")) == two_rank_groups


def test_two_rank_fp16_run_resumes_like_an_uninterrupted_one(tmp_path, sample_root):
    """The multi-GPU default, on the CPU: 2 sharded ranks with fp16 FSDP mixed precision and the grad scaler. A run
    of 16 iterations vs a second run that resumes from the first one's checkpoint of iteration 11 (sharded optimizer
    state, scaler and RNG included) and does the last 4: the same losses, final model, optimizer, scalers and RNG."""
    launcher = os.path.join(REPO, "tests", "train", "mixed_precision_train.py")
    opts = tiny_opts(sample_root, optim__epochs=4, train__checkpoint_period=12)
    opts += precision_opts("fp16", grad_scaler=True, keys=("param_dtype",))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {name: str(tmp_path / name) for name in ("straight", "resumed")}
    for name in ("straight", "resumed"):
        if name == "resumed":
            os.makedirs(runs[name])
            for rank in (0, 1):
                checkpoint = f"model_0000011.rank_{rank}.pth"
                shutil.copy(os.path.join(runs["straight"], checkpoint), runs[name])
                with open(os.path.join(runs[name], f"last_checkpoint.rank_{rank}"), "w") as f:
                    f.write(checkpoint)
        run_torchrun([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", launcher,
                       "--config-file", SAMPLE_CONFIG, "--output-dir", runs[name], *opts], env)  # fmt: skip

    assert "model_0000011.rank_0.pth at iteration 11" in open(os.path.join(runs["resumed"], "logs", "log.txt")).read()
    expected, got = (_losses_by_iteration(runs[name]) for name in ("straight", "resumed"))
    assert sorted(expected) == list(range(16)) and sorted(got) == list(range(12, 16))
    for iteration in range(12, 16):
        torch.testing.assert_close(torch.tensor(got[iteration]), torch.tensor(expected[iteration]), rtol=0, atol=1e-6,
                                   msg=f"iteration {iteration}")  # fmt: skip
    for rank in (0, 1):  # rank 0's file holds the full model and optimizer, every rank's its scaler and RNG
        final = [torch.load(os.path.join(runs[name], f"model_final.rank_{rank}.pth"), weights_only=False)
                 for name in ("straight", "resumed")]  # fmt: skip
        assert final[0]["scaler"] == final[1]["scaler"]
        assert final[0]["scaler"]["scale"] < 2.0**16 and final[0]["scaler"]["_growth_tracker"] >= 2  # it stepped
        rng = [f["rng"] for f in final]
        assert rng[1]["python"] == rng[0]["python"] and torch.equal(rng[1]["torch"], rng[0]["torch"])
        assert len(rng[1]["numpy"]) == len(rng[0]["numpy"])  # (name, key tensor, position, gaussian flag, cached)
        for got_part, expected_part in zip(rng[1]["numpy"], rng[0]["numpy"]):
            assert torch.equal(got_part, expected_part) if torch.is_tensor(got_part) else got_part == expected_part
        if rank == 0:
            assert list(final[1]["model"]) == list(final[0]["model"])
            torch.testing.assert_close(final[1]["model"], final[0]["model"], rtol=0, atol=0)
            torch.testing.assert_close(final[1]["optimizer"]["state"], final[0]["optimizer"]["state"], rtol=0, atol=0)
            assert final[1]["optimizer"]["param_groups"] == final[0]["optimizer"]["param_groups"]


def test_schedules_freeze_the_backbone_then_warm_it_up():
    cfg = train_helpers.tiny_cfg(optim__freeze_backbone_epochs=2, optim__epochs=5, optim__warmup_epochs=1,
                                 train__OFFICIAL_EPOCH_LENGTH=4)
    cfg.optim.lr = 0.01
    lr, _, _, _, last_layer_lr, backbone_lr = train_module.build_schedulers(cfg)
    assert list(backbone_lr.schedule[:8]) == [0.0] * 8  # two epochs of 4 iterations
    assert list(backbone_lr.schedule[8:12]) == pytest.approx([0.0, 0.01 / 3, 0.02 / 3, 0.01])  # its own warmup
    cosine = backbone_lr.schedule[12:]  # then a half cosine to min_lr by the end of the run, as lr's
    assert cosine[0] == pytest.approx(0.01) and (cosine[1:] < cosine[:-1]).all() and cosine[-1] < 0.001
    assert len(backbone_lr.schedule) == len(lr.schedule) == len(last_layer_lr.schedule) == 20
    optimizer = torch.optim.AdamW([
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_multiplier": 0.5, "wd_multiplier": 1.0,
         "is_last_layer": False, "is_backbone": True},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_multiplier": 1.0, "wd_multiplier": 0.0,
         "is_last_layer": False, "is_backbone": False},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_multiplier": 1.0, "wd_multiplier": 1.0,
         "is_last_layer": True},  # an optimizer state from before the flag: not the backbone
    ])
    train_module.apply_optim_scheduler(optimizer, lr=0.1, wd=0.04, last_layer_lr=0.2, backbone_lr=0.0)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(0.0, 0.04), (0.1, 0.0), (0.2, 0.04)]
    for epochs in (-1, 5):
        cfg.optim.freeze_backbone_epochs = epochs
        with pytest.raises(ValueError, match=f"optim.freeze_backbone_epochs must be between 0 and optim.epochs - "
                                             f"optim.warmup_epochs \\(5 - 1\\), got {epochs}"):
            train_module.build_schedulers(cfg)


def test_frozen_backbone_keeps_the_loaded_weights_while_the_heads_learn(tmp_path, sample_root):
    """Continued pretraining from weights with new heads: during optim.freeze_backbone_epochs the student backbone
    keeps the loaded weights bit for bit (learning rate 0, and AdamW's decay scales with it) while the heads train;
    then it trains too."""
    torch.manual_seed(5)
    backbone = vits.vit_tiny(patch_size=16, img_size=64, init_values=1e-5, block_chunks=0)
    weights = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), weights)
    out = str(tmp_path / "run")
    run_training(out, tiny_opts(sample_root, student__pretrained_weights=str(weights), optim__freeze_backbone_epochs=1,
                                optim__freeze_last_layer_epochs=0, train__checkpoint_period=4))
    loaded = backbone.state_dict()
    states = {it: torch.load(os.path.join(out, f"model_{it:07d}.rank_0.pth"), weights_only=True)["model"]
              for it in (3, 7)}
    for key, value in loaded.items():
        assert torch.equal(states[3][f"student.backbone.{key}"], value), key
    assert any(not torch.equal(states[7][f"student.backbone.{key}"], value) for key, value in loaded.items())
    heads = [key for key in states[3] if key.startswith("student.dino_head.")]
    assert heads and all(not torch.equal(states[3][key], states[3]["teacher" + key[len("student"):]])
                         for key in heads)  # the teacher started as a copy: the student's heads have moved
    teacher_drift = max(float((states[3][f"teacher.backbone.{key}"] - value).abs().max()) for key, value in
                        loaded.items())
    assert teacher_drift < 1e-6  # the EMA of equal weights: equal to rounding
