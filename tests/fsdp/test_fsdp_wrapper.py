import warnings

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

import dinov2.distributed as distributed
from dinov2.fsdp import (
    ShardedGradScaler,
    get_fsdp_modules,
    get_fsdp_wrapper,
    is_fsdp,
    is_sharded_fsdp,
    rankstr,
    reshard_fsdp_model,
)


def cfg(strategy="FULL_SHARD", param="fp16", reduce="fp32", buffer="fp32"):
    return OmegaConf.create(
        {
            "sharding_strategy": strategy,
            "mixed_precision": {"param_dtype": param, "reduce_dtype": reduce, "buffer_dtype": buffer},
        }
    )


def test_wrapper_arguments_come_from_config():
    wrapper = get_fsdp_wrapper(cfg("SHARD_GRAD_OP", "bf16", "fp16", "fp32"), {nn.Linear})
    kwargs = wrapper.keywords
    assert kwargs["sharding_strategy"] is ShardingStrategy.SHARD_GRAD_OP
    assert kwargs["mixed_precision"] == MixedPrecision(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float16, buffer_dtype=torch.float32
    )
    assert kwargs["use_orig_params"] is True and kwargs["sync_module_states"] is True
    assert kwargs["auto_wrap_policy"]._module_classes == {nn.Linear}


@pytest.mark.parametrize(
    "bad, key",
    [(cfg(strategy="HYBRID"), "sharding_strategy='HYBRID'"), (cfg(param="fp8"), "mixed_precision.param_dtype='fp8'")],
)
def test_bad_config_values_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(")):
        get_fsdp_wrapper(bad)


def test_single_process_fsdp_is_not_sharded_and_matches_plain_module(single_cpu_process):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    torch.manual_seed(0)
    wrapper = get_fsdp_wrapper(cfg("SHARD_GRAD_OP", "fp32"), {nn.Linear})
    wrapped = wrapper(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    assert is_fsdp(wrapped) and not is_fsdp(plain)
    assert len(get_fsdp_modules(wrapped)) == 3
    assert not any(is_sharded_fsdp(m) for m in get_fsdp_modules(wrapped))  # FSDP uses NO_SHARD at world size 1
    x = torch.randn(5, 3)
    torch.testing.assert_close(wrapped(x), plain(x))
    reshard_fsdp_model(wrapped)  # nothing to free, must not break the module
    torch.testing.assert_close(wrapped(x), plain(x))
    assert rankstr() == "rank_0"
    # ShardedGradScaler on CPU: device="cpu" works once a process group exists (it all-reduces found_inf)
    scaler = ShardedGradScaler(device="cpu", init_scale=1024.0)
    p = nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([p], lr=0.5)
    scaler.scale((p * torch.tensor([3.0, -1.0])).sum()).backward()
    assert torch.equal(p.grad, torch.tensor([3072.0, -1024.0]))
    scaler.step(sgd)
    scaler.update()
    assert torch.equal(p.detach(), torch.tensor([-0.5, 1.5]))


class ListWithoutForward(nn.ModuleList):
    """A container FSDP really cannot all-gather for (no forward of its own)."""


def test_wrapping_block_chunks_does_not_warn_but_other_containers_still_do(single_cpu_process):
    # FSDP warns of every nn.ModuleList it wraps, with its repr; BlockChunk has a forward, so that warning is wrong
    # for it and filling the training log with the chunks' reprs. The filter must leave the warning for others.
    from dinov2.models.vision_transformer import BlockChunk, vit_tiny

    backbone = vit_tiny(img_size=32, block_chunks=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = get_fsdp_wrapper(cfg("SHARD_GRAD_OP", "fp32"), {BlockChunk})(backbone)
    assert len(get_fsdp_modules(wrapped)) == 3  # the root and the two chunks
    assert not [w for w in caught if "containers that do not implement forward" in str(w.message)]
    with pytest.warns(UserWarning, match="containers that do not implement forward: ListWithoutForward"):
        get_fsdp_wrapper(cfg("SHARD_GRAD_OP", "fp32"), {ListWithoutForward})(
            nn.Sequential(ListWithoutForward([nn.Linear(2, 2)]))
        )


def test_sharded_grad_scaler_default_is_enabled_only_with_cuda():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available. Disabling."
        assert ShardedGradScaler().is_enabled() == torch.cuda.is_available()


def test_sharded_grad_scaler_with_fused_adamw_skips_inf_steps_and_matches_unscaled_steps():
    """The training step's sequence (unscale_ for clipping, step, update) with fused AdamW, which torch's own
    ShardedGradScaler breaks (pytorch/pytorch#140514): an inf gradient skips the step (parameters, moments and step
    count unchanged) and halves the scale; a finite one gives exactly the step of an unscaled AdamW."""
    distributed.enable()
    try:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
        reference = [nn.Parameter(p.detach().clone()) for p in params]
        optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
        reference_optimizer = torch.optim.AdamW(reference, lr=0.1, fused=True)
        scaler = ShardedGradScaler(device="cpu", init_scale=1024.0)

        def scaled_step(grads):
            optimizer.zero_grad()
            scaler.scale(sum((p * g).sum() for p, g in zip(params, grads))).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()

        grads = [torch.randn(4, 3), torch.randn(3)]
        scaled_step(grads)
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        reference_optimizer.step()
        torch.testing.assert_close(params, reference, rtol=0, atol=1e-6)
        assert scaler.get_scale() == 1024.0

        before = [p.detach().clone() for p in params]
        moments = [optimizer.state[p]["exp_avg"].clone() for p in params]
        bad = [torch.randn(4, 3), torch.randn(3)]
        bad[1][0] = float("inf")
        scaled_step(bad)
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
        assert all(torch.equal(optimizer.state[p]["exp_avg"], m) for p, m in zip(params, moments))
        assert [optimizer.state[p]["step"].item() for p in params] == [1.0, 1.0]
        assert scaler.get_scale() == 512.0
    finally:
        distributed.disable()
