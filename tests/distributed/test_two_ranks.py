"""One 2-process gloo run (torchrun-style environment, `dinov2.distributed.enable`) checking that the collectives
in the losses, the FSDP wrapper and the checkpointer give exactly what a single process gives on the whole batch."""

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import dinov2.distributed as distributed
from dinov2.fsdp import (
    FSDPCheckpointer,
    PeriodicCheckpointer,
    ShardedGradScaler,
    clip_grad_norm_,
    get_fsdp_modules,
    get_fsdp_wrapper,
    is_fsdp,
    is_sharded_fsdp,
    reshard_fsdp_model,
)
from dinov2.loss import DINOLoss, iBOTPatchLoss
from dinov2.train.train import optimizer_step
from dinov2.utils.param_groups import get_params_groups_with_decay

WORLD = 2
K = 5
IBOT_COUNTS = (3, 5)  # masked patches per rank (uneven on purpose)
CLIP_NORMS = (0.01, 1e6)  # below the gradient norm of the test (clips), far above it (does not)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


def fsdp_cfg(strategy):
    mp = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    return OmegaConf.create({"sharding_strategy": strategy, "mixed_precision": mp})


def loss_data():
    g = torch.Generator().manual_seed(0)
    teacher_rounds = [torch.randn(WORLD * 4, K, generator=g) for _ in range(2)]
    patches = torch.randn(WORLD, 2, 6, K, generator=g)  # per rank: (B=2 images, N=6 patches, K)
    masked = torch.randn(sum(IBOT_COUNTS), K, generator=g)
    return teacher_rounds, patches, masked


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * 4, 6, generator=g) for _ in range(2)]


def build_ssl(seed, strategy=None):
    """A student/teacher ModuleDict like SSLMetaArch (optionally FSDP-wrapped), its optimizer and a grad scaler."""
    torch.manual_seed(seed)
    model = nn.ModuleDict(
        {"student": nn.ModuleDict({"backbone": Net()}), "teacher": nn.ModuleDict({"backbone": Net()})}
    )
    model.add_module("dino_loss", DINOLoss(3))
    for p in model.teacher.parameters():
        p.requires_grad = False
    if strategy is not None:
        wrapper = get_fsdp_wrapper(fsdp_cfg(strategy), {Block})
        for part in ("student", "teacher"):
            model[part]["backbone"] = wrapper(model[part]["backbone"])
    optimizer = torch.optim.AdamW([p for p in model.student.parameters()], lr=0.01)
    return model, optimizer, torch.amp.GradScaler("cpu")


def train_step(model, optimizer, x):
    out = model.student.backbone(x)
    out.pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.dino_loss.update_center(out.detach())  # left pending: the checkpoint must still contain it


def full_state(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.clone() for k, v in state.items()}


def rng_draws():
    return [torch.rand(3), float(np.random.rand()), random.random()]


def worker(rank, world_size, port, out_dir, one_rank_ckpt):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    distributed.enable()
    res = {"rank": distributed.get_global_rank(), "size": distributed.get_global_size()}
    sl = slice(rank * 4, (rank + 1) * 4)

    # --- losses -------------------------------------------------------------------------------------------------
    teacher_rounds, patches, masked = loss_data()
    dino = DINOLoss(K)
    dino.update_center(teacher_rounds[0][sl])
    dino.softmax_center_teacher(teacher_rounds[1][sl], 0.07)
    dino.update_center(teacher_rounds[1][sl])
    res["dino_center"] = dino.state_dict()["center"]
    res["dino_sinkhorn"] = dino.sinkhorn_knopp_teacher(teacher_rounds[0][sl], 0.1)
    ibot = iBOTPatchLoss(K)
    ibot.update_center(patches[rank])
    res["ibot_center"] = ibot.state_dict()["center"]
    start = sum(IBOT_COUNTS[:rank])
    local = masked[start : start + IBOT_COUNTS[rank]]
    res["ibot_sinkhorn"] = ibot.sinkhorn_knopp_teacher(local, 0.1, torch.tensor(IBOT_COUNTS[rank]))

    # --- FSDP wrapper: rank-dependent init is synced from rank 0; one SGD step on the local shard -------------------
    torch.manual_seed(100 + rank)
    net = get_fsdp_wrapper(fsdp_cfg("FULL_SHARD"), {Block})(Net())
    res["fsdp_units"] = sum(is_fsdp(m) for m in net.modules())
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    net(batches()[0][sl]).pow(2).mean().backward()
    sgd.step()
    res["fsdp_after_step"] = full_state(net)

    # --- optimizer groups of a sharded model (its parameters are 1-D views of the shards) --------------------------
    sharded = get_fsdp_wrapper(fsdp_cfg("FULL_SHARD"), {Block})(Net())
    res["param_groups"] = {g["name"]: (g["wd_multiplier"], g["lr_multiplier"]) for g in
                           get_params_groups_with_decay(sharded, lr_decay_rate=0.5)}  # fmt: skip

    # --- fp16 overflow with fused AdamW on sharded ranks: the step is skipped whether one or both ranks overflow ---
    torch.manual_seed(200)
    net = get_fsdp_wrapper(fsdp_cfg("FULL_SHARD"), {Block})(Net())
    adamw = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    scaler = ShardedGradScaler(device="cpu", init_scale=1024.0)
    res["fused_skips"] = []
    for overflowing_ranks in ((0, 1), (1,), ()):
        before = full_state(net)
        x = batches()[0][sl] * (float("inf") if rank in overflowing_ranks else 1.0)
        scaler.scale(net(x).pow(2).mean()).backward()
        scaler.unscale_(adamw)
        scaler.step(adamw)
        scaler.update()
        adamw.zero_grad(set_to_none=True)
        after = full_state(net)
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        finite = all(torch.isfinite(v).all() for v in after.values())
        res["fused_skips"].append((unchanged, finite, scaler.get_scale()))

    # --- the training step's optimizer_step: an overflow in one rank's shard only skips the step on both ranks -----
    res["one_shard_overflow"] = []
    for clip_grad in (0.0, 3.0):
        shard = nn.Parameter(torch.ones(4))  # this rank's shard; only rank 0's gradient overflows
        adamw = torch.optim.AdamW([shard], lr=0.1, fused=True)
        scaler = ShardedGradScaler(device="cpu", init_scale=1024.0)
        scaler.scale((shard * (float("inf") if rank == 0 else 1.0)).sum()).backward()
        optimizer_step(SimpleNamespace(fp16_scaler=scaler, student={}), adamw, clip_grad)
        res["one_shard_overflow"].append((clip_grad, torch.equal(shard.detach(), torch.ones(4)), scaler.get_scale()))

    # --- gradient clipping of sharded units: the foreach version against FSDP's own, clipping and not clipping -----
    res["clip"] = []
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
        for max_norm in CLIP_NORMS:
            nets = []
            for _ in range(2):
                torch.manual_seed(300)
                nets.append(get_fsdp_wrapper(fsdp_cfg(strategy), {Block})(Net()))
                nets[-1](batches()[1][sl]).pow(2).mean().backward()
            before = [p.grad.clone() for p in nets[0].parameters() if p.grad is not None]
            fsdp_norm = nets[0].clip_grad_norm_(max_norm)
            norm = clip_grad_norm_(nets[1], max_norm)
            grads = [[p.grad for p in net.parameters() if p.grad is not None] for net in nets]
            sharded = all(is_sharded_fsdp(unit) for unit in get_fsdp_modules(nets[1]))
            res["clip"].append((strategy, max_norm, sharded, fsdp_norm, norm, before, *grads))

    # --- teacher resharding: unsharded parameters freed after a no-grad forward, outputs unchanged ----------------
    teacher = get_fsdp_wrapper(fsdp_cfg("SHARD_GRAD_OP"), {Block})(Net())
    units = [m for m in get_fsdp_modules(teacher) if m._handle is not None]
    res["sharded_units"] = [is_sharded_fsdp(m) for m in units]
    with torch.no_grad():
        y1 = teacher(batches()[0][sl])

    def unsharded_sizes():
        return [m._handle.flat_param._full_param_padded.untyped_storage().size() for m in units]

    res["unsharded_sizes_after_forward"] = unsharded_sizes()
    reshard_fsdp_model(teacher)
    res["unsharded_sizes_after_reshard"] = unsharded_sizes()
    with torch.no_grad():
        res["same_output_after_reshard"] = torch.equal(teacher(batches()[0][sl]), y1)

    # --- checkpointer: save at 2 ranks, resume at 2 ranks, continue identically ----------------------------------
    ckpt_dir = os.path.join(out_dir, "two_rank_ckpt")
    model, opt, scaler = build_ssl(7, "SHARD_GRAD_OP")
    x1, x2 = (b[sl] for b in batches())
    train_step(model, opt, x1)
    periodic = PeriodicCheckpointer(FSDPCheckpointer(model, ckpt_dir, optimizer=opt, scaler=scaler), period=5)
    torch.manual_seed(1000 + rank)
    np.random.seed(1000 + rank)
    random.seed(1000 + rank)
    periodic.step(4, sampler_position=40)
    res["saved_state"] = full_state(model)
    res["draws_after_save"] = rng_draws()
    train_step(model, opt, x2)
    res["continued_state"] = full_state(model)

    model2, opt2, scaler2 = build_ssl(8, "SHARD_GRAD_OP")
    res["resume_extra"] = FSDPCheckpointer(model2, ckpt_dir, optimizer=opt2, scaler=scaler2).resume_or_load("")
    res["draws_after_resume"] = rng_draws()
    res["resumed_state"] = full_state(model2)
    train_step(model2, opt2, x2)
    res["resumed_continued_state"] = full_state(model2)

    # --- a checkpoint written by one plain process, loaded (fully) by 2 FSDP ranks ---------------------------------
    model3, opt3, scaler3 = build_ssl(9, "FULL_SHARD")
    res["from_one_rank_extra"] = FSDPCheckpointer(model3, "", optimizer=opt3, scaler=scaler3).load(one_rank_ckpt)
    res["from_one_rank_state"] = full_state(model3)
    torch.save(res, os.path.join(out_dir, f"rank_{rank}.pt"))
    distributed.shutdown()  # both ranks done before the group goes away (an early exit can abort the other in gloo)
    distributed.exit_now(0)  # as the scripts end: no interpreter finalization under live gloo threads


@pytest.fixture(scope="module")
def results(spawn, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("two_ranks"))
    one_rank_dir = os.path.join(out_dir, "one_rank_ckpt")
    model, opt, scaler = build_ssl(11)
    train_step(model, opt, batches()[0])
    FSDPCheckpointer(model, one_rank_dir, optimizer=opt, scaler=scaler).save("model_0000002", iteration=2)
    spawn(worker, WORLD, out_dir, one_rank_dir)
    per_rank = [torch.load(os.path.join(out_dir, f"rank_{r}.pt"), weights_only=False) for r in range(WORLD)]
    return per_rank, out_dir, full_state(model)


def test_ranks(results):
    per_rank, _, _ = results
    assert [(r["rank"], r["size"]) for r in per_rank] == [(0, 2), (1, 2)]


def test_dino_center_and_sinkhorn_reduce_like_one_process(results):
    per_rank, _, _ = results
    teacher_rounds, _, _ = loss_data()
    ref = DINOLoss(K)
    ref.update_center(teacher_rounds[0])
    ref.softmax_center_teacher(teacher_rounds[1], 0.07)
    ref.update_center(teacher_rounds[1])
    ref_sinkhorn = ref.sinkhorn_knopp_teacher(teacher_rounds[0], 0.1)
    for r in per_rank:
        torch.testing.assert_close(r["dino_center"], ref.state_dict()["center"])
    torch.testing.assert_close(torch.cat([r["dino_sinkhorn"] for r in per_rank]), ref_sinkhorn)


def test_ibot_center_and_sinkhorn_reduce_like_one_process(results):
    per_rank, _, _ = results
    _, patches, masked = loss_data()
    ref = iBOTPatchLoss(K)
    ref.update_center(patches.flatten(0, 1))
    ref_sinkhorn = ref.sinkhorn_knopp_teacher(masked, 0.1, torch.tensor(sum(IBOT_COUNTS)))
    for r in per_rank:
        torch.testing.assert_close(r["ibot_center"], ref.state_dict()["center"])
    torch.testing.assert_close(torch.cat([r["ibot_sinkhorn"] for r in per_rank]), ref_sinkhorn)


def test_fsdp_step_equals_single_process_step_on_concatenated_batch(results):
    per_rank, _, _ = results
    torch.manual_seed(100)  # rank 0's init, broadcast to rank 1 by the wrapper
    net = Net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    net(batches()[0]).pow(2).mean().backward()
    sgd.step()
    assert per_rank[0]["fsdp_units"] == 3  # two Blocks + the root
    for key, value in net.state_dict().items():
        torch.testing.assert_close(per_rank[0]["fsdp_after_step"][key], value, rtol=1e-6, atol=1e-7)


def test_sharded_parameters_get_the_groups_of_the_plain_model(results):
    """Weight decay and lr multipliers follow the parameter names, not the flattened shards FSDP exposes."""
    per_rank, _, _ = results
    expected = {g["name"]: (g["wd_multiplier"], g["lr_multiplier"])
                for g in get_params_groups_with_decay(Net(), lr_decay_rate=0.5)}  # fmt: skip
    assert expected["blocks.0.fc.weight"][0] == 1.0 and expected["head.bias"][0] == 0.0
    for r in per_rank:
        assert r["param_groups"] == expected


def test_fp16_overflow_skips_the_fused_step_on_every_rank(results):
    """Both ranks overflow, then one: the step is skipped everywhere and the scale halves each time; then a finite
    step updates the parameters."""
    per_rank, _, _ = results
    for r in per_rank:
        assert r["fused_skips"] == [(True, True, 512.0), (True, True, 256.0), (False, True, 256.0)]


def test_overflow_in_one_rank_shard_skips_the_step_on_every_rank_with_and_without_clipping(results):
    """`optimizer_step` unscales through the scaler even without clipping, where the found-inf flags are summed
    over the ranks: a fused step would otherwise check each rank's own shard, and the ranks' scales would drift."""
    per_rank, _, _ = results
    for r in per_rank:
        assert r["one_shard_overflow"] == [(0.0, True, 512.0), (3.0, True, 512.0)]


def test_foreach_clipping_of_shards_equals_fsdp_and_one_process(results):
    """`dinov2.fsdp.clip_grad_norm_` on sharded ranks: the total norm of one process computing the gradient of the
    whole batch, on every rank; each rank's gradient shards scaled exactly as FSDP's per-parameter method scales them."""
    per_rank, _, _ = results
    torch.manual_seed(300)
    net = Net()
    net(batches()[1]).pow(2).mean().backward()
    one_process_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1e6)
    assert one_process_norm > CLIP_NORMS[0]
    for r in per_rank:
        assert [(c[0], c[1], c[2]) for c in r["clip"]] == [(s, n, True) for s in ("FULL_SHARD", "SHARD_GRAD_OP")
                                                          for n in CLIP_NORMS]  # fmt: skip
        for _, max_norm, _, fsdp_norm, norm, before, fsdp_grads, grads in r["clip"]:
            torch.testing.assert_close(norm, one_process_norm, rtol=1e-6, atol=0)
            torch.testing.assert_close(norm, fsdp_norm, rtol=1e-6, atol=0)
            coef = min(1.0, max_norm / (norm.item() + 1e-6))
            assert len(grads) == len(fsdp_grads) == len(before) > 0
            for g, fsdp_g, b in zip(grads, fsdp_grads, before):
                torch.testing.assert_close(g, fsdp_g, rtol=1e-6, atol=1e-9)
                torch.testing.assert_close(g, b * coef, rtol=1e-6, atol=1e-9)
                if max_norm == CLIP_NORMS[1]:
                    assert torch.equal(g, b)


def test_reshard_frees_unsharded_parameters(results):
    per_rank, _, _ = results
    for r in per_rank:
        assert r["sharded_units"] == [True, True, True]
        assert all(size > 0 for size in r["unsharded_sizes_after_forward"])
        assert r["unsharded_sizes_after_reshard"] == [0, 0, 0]
        assert r["same_output_after_reshard"]


def test_two_rank_checkpoint_files(results):
    _, out_dir, _ = results
    ckpt_dir = os.path.join(out_dir, "two_rank_ckpt")
    assert sorted(os.listdir(ckpt_dir)) == [
        "last_checkpoint.rank_0",
        "last_checkpoint.rank_1",
        "model_0000004.rank_0.pth",
        "model_0000004.rank_1.pth",
    ]
    rank0 = torch.load(os.path.join(ckpt_dir, "model_0000004.rank_0.pth"), weights_only=True)
    rank1 = torch.load(os.path.join(ckpt_dir, "model_0000004.rank_1.pth"), weights_only=True)
    per_rank_keys = ["iteration", "rank", "rng", "sampler_position", "scaler", "world_size"]
    assert sorted(rank0) == sorted(per_rank_keys + ["model", "optimizer"])
    assert sorted(rank1) == per_rank_keys
    assert (rank0["world_size"], rank1["rank"]) == (2, 1)
    assert "student.backbone.blocks.0.fc.weight" in rank0["model"] and "dino_loss.center" in rank0["model"]


def test_two_rank_resume_restores_everything_and_continues_identically(results):
    per_rank, _, _ = results
    for r in per_rank:
        assert r["resume_extra"] == {"iteration": 4, "sampler_position": 40}
        for key, value in r["saved_state"].items():
            assert torch.equal(r["resumed_state"][key], value), key
        for a, b in zip(r["draws_after_save"], r["draws_after_resume"]):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        for key, value in r["continued_state"].items():
            assert torch.equal(r["resumed_continued_state"][key], value), key
    assert not torch.equal(per_rank[0]["saved_state"]["dino_loss.center"], torch.zeros(1, 3))  # pending update saved


def test_one_rank_checkpoint_loads_on_two_fsdp_ranks(results):
    per_rank, _, one_rank_state = results
    for r in per_rank:
        assert r["from_one_rank_extra"] == {"iteration": 2}
        for key, value in one_rank_state.items():
            assert torch.equal(r["from_one_rank_state"][key], value), key


def test_two_rank_checkpoint_resumes_in_one_plain_process(results):
    per_rank, out_dir, _ = results
    model, opt, scaler = build_ssl(12)
    extra = FSDPCheckpointer(model, "", optimizer=opt, scaler=scaler).resume_or_load(
        os.path.join(out_dir, "two_rank_ckpt", "model_0000004.rank_1.pth")
    )
    assert extra == {"iteration": 4, "sampler_position": 40}
    for key, value in per_rank[0]["saved_state"].items():
        assert torch.equal(model.state_dict()[key], value), key
    x2 = batches()[1]
    train_step(model, opt, x2)  # the optimizer state came along: one more step matches the 2-rank continuation
    for key, value in per_rank[0]["continued_state"].items():
        if key.startswith("student."):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
