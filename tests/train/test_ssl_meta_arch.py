import logging
import re

import pytest
import torch
from train_helpers import manual_losses, random_batch, tiny_cfg

from dinov2.configs import ConfigError
from dinov2.loss.kernels import centered_softmax, lossfunc
from dinov2.models import build_model_from_cfg
from dinov2.train.ssl_meta_arch import LOSS_KEYS, TARGET_KEYS, SSLMetaArch
from dinov2.train.train import teacher_state_dict
from dinov2.utils.utils import PretrainedWeightsError


@pytest.mark.parametrize(
    "overrides",
    [
        dict(train__centering="centering", ibot__separate_head=False, dino__loss_weight=0.5),
        dict(train__centering="sinkhorn_knopp", ibot__separate_head=True, dino__loss_weight=0.5),
        dict(train__centering="centering", ibot__separate_head=False, dino__loss_weight=0.0),
    ],
    ids=["centering-shared-head", "sinkhorn-separate-head", "ibot-only"],
)
def test_forward_backward_matches_manual_recomputation(overrides):
    torch.manual_seed(0)
    cfg = tiny_cfg(
        student__drop_path_rate=0.0, ibot__loss_weight=2.0, dino__koleo_loss_weight=0.3,
        ibot__mask_sample_probability=0.75, **overrides,
    )
    model = SSLMetaArch(cfg)
    model.train()
    # make the teacher differ from the student so that the crop pairing matters
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = random_batch(cfg, seed=1)
    assert batch["collated_masks"].any(dim=1).sum() == 6  # 0.75 * 8 global crops are masked

    expected, expected_total = manual_losses(model, cfg, batch, teacher_temp=0.05)
    model.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(batch, teacher_temp=0.05)

    assert sorted(loss_dict) == sorted(LOSS_KEYS + TARGET_KEYS + ("total_loss",))
    for key in LOSS_KEYS + TARGET_KEYS:
        torch.testing.assert_close(loss_dict[key].double(), expected[key].detach().double(), rtol=1e-5, atol=1e-6,
                                   msg=key)
    torch.testing.assert_close(loss_dict["total_loss"], expected_total.detach(), rtol=1e-5, atol=1e-6)
    # backward ran into the student only
    assert all(p.grad is not None for p in model.student.backbone.blocks.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())


def test_teacher_starts_as_copy_of_student_and_ema_update():
    torch.manual_seed(0)
    model = SSLMetaArch(tiny_cfg())
    student = model.student.state_dict()
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, student[k], rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(block.sample_drop_ratio == 0.0 for block in model.teacher.backbone.blocks)
    assert all(block.sample_drop_ratio == 0.1 for block in model.student.backbone.blocks)  # bbu_sample.yaml, uniform

    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before_teacher = {k: v.clone() for k, v in model.teacher.named_parameters()}
    student_params = dict(model.student.named_parameters())
    model.update_teacher(0.9)
    for k, v in model.teacher.named_parameters():
        torch.testing.assert_close(v, 0.9 * before_teacher[k] + 0.1 * student_params[k], rtol=1e-6, atol=1e-7)


def test_params_groups_cover_each_student_parameter_once():
    model = SSLMetaArch(tiny_cfg())
    groups = model.get_params_groups()
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.student.parameters() if p.requires_grad}
    for g in groups:
        assert {"lr_multiplier", "wd_multiplier", "is_last_layer"} <= set(g)
    last_layer = {id(p) for n, p in model.student.named_parameters() if "last_layer" in n}
    backbone = {id(p) for p in model.student.backbone.parameters()}
    for g in groups:
        assert g["is_last_layer"] == (id(g["params"][0]) in last_layer)
        assert g["is_backbone"] == (id(g["params"][0]) in backbone)
        assert len({id(p) in backbone for p in g["params"]}) == 1  # no group mixes backbone and head


def _hub_state_dict(arch: str) -> dict:
    cfg = tiny_cfg(student__arch=arch)
    backbone, _ = build_model_from_cfg(cfg, only_teacher=True)
    return {k: v.clone() for k, v in backbone.state_dict().items()}


def test_pretrained_weights_raw_hub_layout_loaded_strictly(tmp_path, caplog):
    torch.manual_seed(123)
    hub = _hub_state_dict("vit_tiny")
    path = tmp_path / "hub_vit_tiny.pth"
    torch.save(hub, path)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="dinov2"):
        model = SSLMetaArch(tiny_cfg(student__pretrained_weights=str(path)))
    assert f"Loaded pretrained weights from {path}" in caplog.text
    for module in (model.student.backbone, model.teacher.backbone):
        state = module.state_dict()
        assert sorted(state) == sorted(hub)
        for k, v in hub.items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_pretrained_weights_wrong_arch_is_an_error(tmp_path):
    path = tmp_path / "hub_vit_small.pth"
    torch.save({"model": _hub_state_dict("vit_small")}, path)
    with pytest.raises(PretrainedWeightsError, match=f"Weights in {path} do not match") as excinfo:
        SSLMetaArch(tiny_cfg(student__pretrained_weights=str(path)))
    assert "blocks.0.attn.qkv.weight" in excinfo.value.shape_mismatches


@pytest.mark.parametrize("separate_head", [False, True], ids=["shared-head", "separate-head"])
def test_pretrained_heads_continue_a_runs_teacher_with_its_heads(tmp_path, separate_head):
    """`student.pretrained_heads`: a run's teacher_checkpoint.pth gives backbone and heads to student and teacher,
    tensor for tensor; without it only the backbone is loaded and the heads start anew."""
    torch.manual_seed(5)
    source = SSLMetaArch(tiny_cfg(ibot__separate_head=separate_head))
    with torch.no_grad():
        for p in source.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    saved = teacher_state_dict(source)
    path = str(tmp_path / "teacher_checkpoint.pth")
    torch.save({"teacher": saved}, path)
    heads = ["dino_head", "ibot_head"] if separate_head else ["dino_head"]
    assert sorted({k.split(".")[0] for k in saved}) == ["backbone"] + heads

    torch.manual_seed(0)
    model = SSLMetaArch(tiny_cfg(ibot__separate_head=separate_head, student__pretrained_weights=path,
                                 student__pretrained_heads=True))
    for side in (model.student, model.teacher):
        state = {f"{name}.{k}": v for name, module in side.items() for k, v in module.state_dict().items()}
        assert list(state) == list(saved)
        for k, v in saved.items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    torch.manual_seed(0)
    backbone_only = SSLMetaArch(tiny_cfg(ibot__separate_head=separate_head, student__pretrained_weights=path))
    assert torch.equal(backbone_only.student.backbone.pos_embed, saved["backbone.pos_embed"])
    assert not torch.equal(backbone_only.student.dino_head.last_layer.weight_v, saved["dino_head.last_layer.weight_v"])


def test_pretrained_heads_need_a_file_with_heads(tmp_path):
    with pytest.raises(ConfigError, match="student.pretrained_heads is true but student.pretrained_weights is empty"):
        SSLMetaArch(tiny_cfg(student__pretrained_heads=True))
    path = tmp_path / "hub_vit_tiny.pth"
    torch.save(_hub_state_dict("vit_tiny"), path)  # a released backbone: no heads, no `backbone.` prefix
    with pytest.raises(PretrainedWeightsError) as excinfo:
        SSLMetaArch(tiny_cfg(student__pretrained_weights=str(path), student__pretrained_heads=True))
    lines = str(excinfo.value).splitlines()
    assert lines[0] == f"Weights in {path} do not match ModuleDict (key names as mapped to the model's layout):"
    # ViT-Ti: 3 tokens, 2 patch-embedding keys, 12 blocks x 14 keys and 2 norm keys = 175; the DINO head has 8
    assert lines[1] == "  missing keys (183): backbone.* (175), dino_head.* (8)"
    assert lines[2] == ("  unexpected keys (175): cls_token, pos_embed, mask_token, patch_embed.* (2), blocks.* (168), "
                        "norm.* (2)")
    assert len(excinfo.value.missing_keys) == 183


def test_compiled_checkpointed_blocks_give_the_plain_losses_gradients_and_keys():
    """`train.compile` and `train.compile_loss` (aot_eager backend: dynamo + AOTAutograd, no C++ compiler needed)
    with `train.activation_checkpointing`: same losses and student gradients as the plain model, same parameter
    names."""
    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        cfg = tiny_cfg(student__drop_path_rate=0.3, train__compile=fast, train__compile_backend="aot_eager",
                       train__activation_checkpointing=fast, train__compile_loss=fast)
        model = SSLMetaArch(cfg)
        model.prepare_for_distributed_training()  # compiles the blocks that run (here: one process, fp32)
        model.train()
        for loss in (model.dino_loss, model.ibot_patch_loss):
            assert (loss.kernels.lossfunc is not lossfunc) == fast
            assert (loss.kernels.centered_softmax is not centered_softmax) == fast
        assert [b.activation_checkpointing for b in model.student.backbone.blocks] == [fast] * 12
        assert not any(b.activation_checkpointing for b in model.teacher.backbone.blocks)
        for backbone in (model.student.backbone, model.teacher.backbone):
            assert [b._compiled_call_impl is not None for b in backbone.blocks] == [fast] * 12
        losses = []
        for seed in (1, 2):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            losses.append(model.forward_backward(random_batch(cfg, seed=seed), teacher_temp=0.05))
        grads = {n: p.grad for n, p in model.student.named_parameters() if p.grad is not None}
        results.append((losses, grads, list(model.state_dict())))
    (plain_losses, plain_grads, plain_keys), (fast_losses, fast_grads, fast_keys) = results
    assert fast_keys == plain_keys and not any("_orig_mod" in k for k in fast_keys)
    for plain, fast in zip(plain_losses, fast_losses):
        for key in plain:
            torch.testing.assert_close(fast[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)
    assert sorted(fast_grads) == sorted(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(train__compile_backend="turbo"), "train.compile_backend 'turbo' is not a torch.compile backend"),
        (dict(train__compile_mode="fastest"), "train.compile_mode 'fastest' is not a mode of backend 'inductor'"),
        (dict(train__compile_backend="aot_eager", train__compile_mode="max-autotune"),
         "train.compile_mode 'max-autotune' is not a mode of backend 'aot_eager'"),
        (dict(train__compile=False, train__compile_loss=True, train__compile_backend="turbo"),
         "train.compile_backend 'turbo' is not a torch.compile backend"),
        (dict(train__compile_mode="reduce-overhead"),
         "train.compile_mode 'reduce-overhead' records CUDA graphs, which need the teacher's parameters at fixed "
         "addresses, and train.release_teacher_copy=true frees them"),
    ],
)
def test_bad_compile_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SSLMetaArch(tiny_cfg(**{"train__compile": True, **overrides}))


def test_cuda_graph_modes_need_the_teacher_copy_kept():
    """The way out the error above names: a CUDA-graph mode with `train.release_teacher_copy=false`."""
    model = SSLMetaArch(tiny_cfg(train__compile=True, train__compile_mode="reduce-overhead",
                                 train__release_teacher_copy=False))  # fmt: skip
    assert model.release_teacher_copy is False


@pytest.mark.parametrize(
    "backends, message",
    [(["FLASH", "MATH"], "train.sdpa_backends: 'FLASH' is not an SDPBackend; expected a list of ['MATH', "),
     ([], "train.sdpa_backends is empty"), ("MATH", "train.sdpa_backends is 'MATH'; expected a list of")],
)
def test_bad_sdpa_backends_name_the_key(backends, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SSLMetaArch(tiny_cfg(train__sdpa_backends=backends))


def test_sdpa_backends_restrict_the_attention_kernels():
    """`train.sdpa_backends` applies to the whole step: MATH alone gives the losses of PyTorch's own choice, and a
    backend the CPU lacks leaves no kernel at all."""
    results = []
    for backends in (None, ["MATH"]):
        torch.manual_seed(0)
        cfg = tiny_cfg() if backends is None else tiny_cfg(train__sdpa_backends=backends)
        model = SSLMetaArch(cfg).train()
        results.append(model.forward_backward(random_batch(cfg, seed=1), teacher_temp=0.05))
    for key in LOSS_KEYS:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-6, msg=key)
    cfg = tiny_cfg(train__sdpa_backends=["CUDNN_ATTENTION"])
    with pytest.raises(RuntimeError, match="No viable backend for scaled_dot_product_attention"):
        SSLMetaArch(cfg).train().forward_backward(random_batch(cfg, seed=1), teacher_temp=0.05)


def test_bad_precision_dtype_names_the_key(monkeypatch):
    """One process without FSDP reads the mixed-precision dtypes itself (on CUDA; switched on here): a bad one is an
    error naming its key."""
    import dinov2.train.ssl_meta_arch as ssl_meta_arch

    monkeypatch.setattr(ssl_meta_arch, "mixed_precision_enabled", lambda: True)
    model = SSLMetaArch(tiny_cfg(compute_precision__teacher__dino_head__mixed_precision__buffer_dtype="fp17"))
    with pytest.raises(ValueError, match=re.escape("compute_precision.teacher.dino_head.mixed_precision.buffer_dtype="
                                                   "'fp17': Unknown dtype 'fp17'")):
        model.prepare_for_distributed_training()


def test_ibot_without_any_masked_crop_is_a_config_error():
    """int(2 * batch_size_per_gpu * mask_sample_probability) crops are masked: 0 would leave iBOT untrained."""
    with pytest.raises(ConfigError, match=r"ibot\.mask_sample_probability=0\.2 .* train\.batch_size_per_gpu=2 "):
        SSLMetaArch(tiny_cfg(train__batch_size_per_gpu=2, ibot__mask_sample_probability=0.2))
    SSLMetaArch(tiny_cfg(train__batch_size_per_gpu=2, ibot__mask_sample_probability=0.25))  # one crop: fine
    SSLMetaArch(tiny_cfg(train__batch_size_per_gpu=2, ibot__mask_sample_probability=0.2, ibot__loss_weight=0.0))
