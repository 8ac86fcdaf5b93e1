import logging
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import dinov2.distributed as distributed
from dinov2.fsdp import FSDPCheckpointer, PeriodicCheckpointer, get_fsdp_wrapper, is_fsdp
from dinov2.fsdp import checkpointer as checkpointer_module


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def build(seed, wrap=False):
    torch.manual_seed(seed)
    model = nn.ModuleDict({"backbone": nn.Sequential(Block(), Block()), "head": nn.Linear(4, 2)})
    model.register_buffer("center", torch.zeros(2))
    if wrap:
        cfg = OmegaConf.create(
            {
                "sharding_strategy": "SHARD_GRAD_OP",
                "mixed_precision": {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
            }
        )
        model["backbone"] = get_fsdp_wrapper(cfg, {Block})(model["backbone"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    return model, optimizer


def step(model, optimizer, seed):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    model["head"](model["backbone"](x)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.center.add_(1.0)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "_fsdp_wrapped_module" not in k}


@pytest.fixture(params=["plain", "fsdp"])
def wrap(request, monkeypatch):
    """`plain`: no process group at all; `fsdp`: FSDP units in a 1-process gloo group (FSDP uses NO_SHARD there)."""
    if request.param == "plain":
        yield False
        return
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU (gloo) path, also on GPU machines
    distributed.enable()
    try:
        yield True
    finally:
        distributed.disable()


def test_round_trip_at_world_size_one_resumes_identically(tmp_path, wrap, caplog):
    model, opt = build(0, wrap)
    assert is_fsdp(model["backbone"]) == wrap
    periodic = PeriodicCheckpointer(FSDPCheckpointer(model, str(tmp_path), optimizer=opt), period=2, max_iter=4)
    for it in range(2):
        step(model, opt, it)
        periodic.step(it, sampler_position=10 * (it + 1))
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint.rank_0", "model_0000001.rank_0.pth"]
    expected_draw = torch.rand(2)
    step(model, opt, 2)
    straight = params(model)

    torch.manual_seed(123)  # the RNG state must come from the checkpoint
    model2, opt2 = build(1, wrap)
    checkpointer = FSDPCheckpointer(model2, str(tmp_path), optimizer=opt2)
    assert checkpointer.has_checkpoint()
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000001.rank_0.pth")
    with caplog.at_level(logging.INFO, logger="dinov2"):
        logging.getLogger("dinov2").propagate, previous = True, logging.getLogger("dinov2").propagate
        try:
            extra = checkpointer.resume_or_load("", resume=True)
        finally:
            logging.getLogger("dinov2").propagate = previous
    assert extra == {"iteration": 1, "sampler_position": 20}
    assert f"Resumed training from checkpoint {tmp_path / 'model_0000001.rank_0.pth'} at iteration 1" in caplog.text
    assert torch.equal(torch.rand(2), expected_draw)
    step(model2, opt2, 2)
    resumed = params(model2)
    assert sorted(resumed) == sorted(straight)
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_cuda_rng_state_is_this_ranks_device_only(monkeypatch):
    """On CUDA the state of the rank's own device is saved and restored (simulated: no GPU here), not the list of
    every visible device's, which would not load on a node that shows fewer devices."""
    states = {"current": torch.arange(4, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: states["current"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: states.update(current=state))
    for name in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: pytest.fail("all devices' RNG states were used"))
    saved = checkpointer_module.get_rng_state()
    assert sorted(saved) == ["cuda", "numpy", "python", "torch"] and torch.equal(saved["cuda"], torch.arange(4))
    states["current"] = torch.zeros(4, dtype=torch.uint8)
    checkpointer_module.set_rng_state(saved)
    assert torch.equal(states["current"], torch.arange(4, dtype=torch.uint8))


def test_files_are_weights_only_with_expected_entries(tmp_path):
    model, opt = build(0)
    step(model, opt, 0)
    scaler = torch.amp.GradScaler("cpu")
    FSDPCheckpointer(model, str(tmp_path), optimizer=opt, scaler=scaler).save("model_0000000", iteration=0)
    data = torch.load(tmp_path / "model_0000000.rank_0.pth", weights_only=True)
    assert sorted(data) == ["iteration", "model", "optimizer", "rank", "rng", "scaler", "world_size"]
    assert sorted(data["model"]) == sorted(model.state_dict())
    assert sorted(data["rng"]) == ["numpy", "python", "torch"]
    assert (tmp_path / "last_checkpoint.rank_0").read_text() == "model_0000000.rank_0.pth"
    with pytest.raises(ValueError, match="clashes"):
        FSDPCheckpointer(model, str(tmp_path), scaler=scaler).save("x", scaler=1)
    with pytest.raises(TypeError, match="'sampler' holds a ndarray"):
        FSDPCheckpointer(model, str(tmp_path)).save("x", sampler={"pos": [np.zeros(2)]})
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint.rank_0", "model_0000000.rank_0.pth"]


def test_periodic_keeps_last_n_and_writes_final(tmp_path):
    model, opt = build(0)
    periodic = PeriodicCheckpointer(
        FSDPCheckpointer(model, str(tmp_path), optimizer=opt), period=3, max_iter=11, max_to_keep=2
    )
    for it in range(11):
        periodic.step(it)
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint.rank_0",
        "model_0000005.rank_0.pth",
        "model_0000008.rank_0.pth",
        "model_final.rank_0.pth",
    ]
    assert (tmp_path / "last_checkpoint.rank_0").read_text() == "model_final.rank_0.pth"
    assert torch.load(tmp_path / "model_final.rank_0.pth", weights_only=True)["iteration"] == 10


def test_periodic_counts_the_checkpoints_of_an_earlier_process(tmp_path):
    """A resumed run (a new process, a new PeriodicCheckpointer) prunes the periodic checkpoints the crashed process
    left, oldest iteration first; other ranks' files, the final checkpoint and other prefixes stay."""
    model, opt = build(0)
    checkpointer = FSDPCheckpointer(model, str(tmp_path), optimizer=opt)
    for it in range(9):
        PeriodicCheckpointer(checkpointer, period=3, max_to_keep=2).step(it)  # one process per iteration
    others = ["model_0000002.rank_1.pth", "model_final.rank_0.pth", "ema_0000002.rank_0.pth", "notes.txt"]
    for name in others:
        (tmp_path / name).write_text("")
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("model_00")) == [
        "model_0000002.rank_1.pth", "model_0000005.rank_0.pth", "model_0000008.rank_0.pth",
    ]
    resumed = PeriodicCheckpointer(checkpointer, period=3, max_to_keep=2)
    resumed.step(8)  # the same iteration again (a crash between the save and the tag): one entry, nothing removed
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["last_checkpoint.rank_0", "model_0000005.rank_0.pth", "model_0000008.rank_0.pth", *others]
    )
    resumed.step(11)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["last_checkpoint.rank_0", "model_0000008.rank_0.pth", "model_0000011.rank_0.pth", *others]
    )


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = build(0)
    checkpointer = FSDPCheckpointer(model, str(tmp_path), optimizer=opt)
    checkpointer.save("model_0000001", iteration=1)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 truncated")  # part of a file, then the process "dies"
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpointer_module.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000003", iteration=3)
    monkeypatch.setattr(checkpointer_module.torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint.rank_0", "model_0000001.rank_0.pth"]
    # a hard kill leaves the temp file behind: it is never picked up
    (tmp_path / ".model_0000005.rank_0.pth.abc.tmp").write_bytes(b"PK partial")
    model2, opt2 = build(1)
    assert FSDPCheckpointer(model2, str(tmp_path), optimizer=opt2).resume_or_load("")["iteration"] == 1


def test_model_weights_directory_or_file(tmp_path):
    src = tmp_path / "run1"
    model, opt = build(0)
    checkpointer = FSDPCheckpointer(model, str(src), optimizer=opt)
    step(model, opt, 0)
    checkpointer.save("model_0000004", iteration=4)
    step(model, opt, 1)
    checkpointer.save("model_0000009", iteration=9)
    final = params(model)

    # a directory: its newest checkpoint, full resume (new output dir has none)
    model2, opt2 = build(1)
    extra = FSDPCheckpointer(model2, str(tmp_path / "run2"), optimizer=opt2).resume_or_load(str(src))
    assert extra == {"iteration": 9} and all(torch.equal(params(model2)[k], v) for k, v in final.items())
    # a file named for another rank: rank_3 -> this rank's (rank_0)
    model3, opt3 = build(2)
    os.link(src / "model_0000004.rank_0.pth", src / "model_0000004.rank_3.pth")
    extra = FSDPCheckpointer(model3, str(tmp_path / "run3"), optimizer=opt3).resume_or_load(
        str(src / "model_0000004.rank_3.pth")
    )
    assert extra == {"iteration": 4}
    # resume=False: model weights only, fresh optimizer and iteration
    model4, opt4 = build(3)
    assert FSDPCheckpointer(model4, str(src), optimizer=opt4).resume_or_load(str(src), resume=False) == {}
    assert all(torch.equal(params(model4)[k], v) for k, v in final.items())
    assert opt4.state_dict()["state"] == {}
    # nothing anywhere: fresh start
    assert FSDPCheckpointer(model4, str(tmp_path / "empty"), optimizer=opt4).resume_or_load("") == {}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        FSDPCheckpointer(model4, "").resume_or_load(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        FSDPCheckpointer(model4, "").resume_or_load(str(tmp_path / "missing.pth"))
    torch.save({}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="no 'rank_<r>' part"):
        FSDPCheckpointer(model4, "").load(str(tmp_path / "weights.pth"))


def test_model_loads_strictly(tmp_path):
    model, opt = build(0)
    FSDPCheckpointer(model, str(tmp_path), optimizer=opt).save("model_0000000", iteration=0)
    other = nn.ModuleDict({"backbone": nn.Sequential(Block()), "head": nn.Linear(4, 3)})
    unexpected = r"unexpected keys \['backbone.1.fc.bias', 'backbone.1.fc.weight', 'center'\]"
    with pytest.raises(RuntimeError, match=r"missing keys \[\], " + unexpected):
        FSDPCheckpointer(other, str(tmp_path)).resume_or_load("")
    other = nn.ModuleDict({"backbone": nn.Sequential(Block(), Block()), "head": nn.Linear(4, 3)})
    other.register_buffer("center", torch.zeros(2))
    with pytest.raises(RuntimeError, match="(?s)model_0000000.rank_0.pth.*size mismatch for head.weight"):
        FSDPCheckpointer(other, str(tmp_path)).resume_or_load("")
    torch.save({"model": model.state_dict(), "world_size": 1}, tmp_path / "bare.rank_0.pth")
    with pytest.raises(RuntimeError, match="bare.rank_0.pth: it has no optimizer state"):
        FSDPCheckpointer(model, "", optimizer=opt).load(str(tmp_path / "bare.rank_0.pth"))
    (tmp_path / "corrupt.rank_0.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="Cannot read checkpoint .*corrupt.rank_0.pth"):
        FSDPCheckpointer(model, "").load(str(tmp_path / "corrupt.rank_0.pth"))
