import builtins
import os
import subprocess
import sys

import pytest

import dinov2.distributed as distributed
from dinov2.distributed import detect_environment, parse_slurm_first_host

SLURM_ENV = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
}
TORCHRUN_ENV = {
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29555",
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
}


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    monkeypatch.setattr(distributed.shutil, "which", lambda name: None)


def test_slurm_environment():
    env = detect_environment(SLURM_ENV)
    assert (env.source, env.master_addr, env.rank, env.world_size) == ("slurm", "gpu007", 5, 8)
    assert (env.local_rank, env.local_world_size) == (1, 4)
    assert 20000 <= env.master_port < 60000
    assert detect_environment(SLURM_ENV).master_port == env.master_port  # every task derives the same port
    assert detect_environment({**SLURM_ENV, "SLURM_JOB_ID": "123457"}).master_port != env.master_port
    assert detect_environment({**SLURM_ENV, "MASTER_PORT": "31000"}).master_port == 31000


def test_slurm_master_from_scontrol(monkeypatch):
    calls = []

    class Result:
        stdout = "nodeA\nnodeB\n"

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return Result()

    monkeypatch.setattr(distributed.shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(distributed.subprocess, "run", fake_run)
    assert detect_environment(SLURM_ENV).master_addr == "nodeA"
    assert calls == [["scontrol", "show", "hostnames", "gpu[007-008]"]]


def test_slurm_errors_and_allocation_without_srun(caplog):
    salloc_shell = {k: v for k, v in SLURM_ENV.items() if k not in ("SLURM_PROCID", "SLURM_LOCALID")}
    logger = distributed.logger
    logger.propagate, previous = True, logger.propagate
    try:
        with caplog.at_level("WARNING", logger="dinov2"):
            env = detect_environment(salloc_shell)
    finally:
        logger.propagate = previous
    assert (env.source, env.world_size) == ("local", 1)
    assert "['SLURM_PROCID', 'SLURM_LOCALID'] are not (not an srun task)" in caplog.text
    with pytest.raises(RuntimeError, match="SLURM_NTASKS=7 is not a multiple"):
        detect_environment({**SLURM_ENV, "SLURM_NTASKS": "7"})


@pytest.mark.parametrize(
    "nodelist, first",
    [("node1", "node1"), ("gpu[003-005,009],cpu1", "gpu003"), ("a-b[10,2]", "a-b10"), ("n[1-2],m[3]", "n1")],
)
def test_parse_slurm_first_host(nodelist, first):
    assert parse_slurm_first_host(nodelist) == first


def test_torchrun_environment_takes_precedence_over_slurm():
    env = detect_environment({**SLURM_ENV, **TORCHRUN_ENV})
    assert env == distributed.DistributedEnvironment("torchrun", "10.0.0.1", 29555, 3, 4, 1, 2)
    assert env.as_env() == TORCHRUN_ENV


def test_partial_torchrun_environment_is_an_error():
    partial = {k: v for k, v in TORCHRUN_ENV.items() if k not in ("MASTER_PORT", "LOCAL_WORLD_SIZE")}
    with pytest.raises(RuntimeError, match=r"\['MASTER_PORT', 'LOCAL_WORLD_SIZE'\] missing"):
        detect_environment(partial)
    with pytest.raises(RuntimeError, match="RANK='x' is not an integer"):
        detect_environment({**TORCHRUN_ENV, "RANK": "x"})


def test_single_process_environment():
    env = detect_environment({"MASTER_PORT": "1234"})  # a lone MASTER_PORT is not a partial torchrun env
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("local", 0, 1, 0, 1)
    assert 0 < env.master_port < 65536


def test_helpers_without_process_group(monkeypatch):
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    assert not distributed.is_enabled()
    assert distributed.get_global_rank() == 0 and distributed.get_global_size() == 1
    assert distributed.get_local_rank() == 0 and distributed.get_local_size() == 1
    assert distributed.is_main_process()
    distributed.barrier()
    t = distributed.all_reduce_mean(distributed.torch.tensor([2.0]))
    assert t.item() == 2.0


def test_enable_single_process_gloo_and_disable(monkeypatch):
    for key in [*TORCHRUN_ENV, *SLURM_ENV]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    original_print = builtins.print
    try:
        distributed.enable(overwrite=True)
        distributed.enable()  # idempotent
        assert distributed.is_enabled()
        assert distributed.torch.distributed.get_backend() == "gloo"
        assert distributed.get_global_size() == 1 and distributed.get_global_rank() == 0
        assert distributed.get_local_size() == 1 and distributed.is_main_process()
    finally:
        distributed.disable()
    assert builtins.print is original_print and not distributed.is_enabled()
    assert not [key for key in TORCHRUN_ENV if key in distributed.os.environ]  # exported variables removed again


def test_enable_binds_nccl_to_the_local_gpu(monkeypatch):
    """With CUDA, the NCCL group gets cuda:LOCAL_RANK as its `device_id` (the current device too), so NCCL does not
    guess the GPU from the global rank; without `set_cuda_current_device` neither is set."""
    for key in SLURM_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    devices, calls = [], []
    monkeypatch.setattr(distributed.torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed.dist, "barrier", lambda: None)
    for set_device in (True, False):
        try:
            distributed.enable(set_cuda_current_device=set_device)
        finally:
            distributed.disable()
    assert devices == [1]
    assert [(c["backend"], c["rank"], c["world_size"], c.get("device_id")) for c in calls] == [
        ("nccl", 3, 4, distributed.torch.device("cuda", 1)),
        ("nccl", 3, 4, None),
    ]


def test_shutdown_waits_for_the_other_ranks_then_tears_down(monkeypatch):
    for key in [*TORCHRUN_ENV, *SLURM_ENV]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    calls = []
    distributed.enable(overwrite=True)
    try:
        real_barrier = distributed.dist.barrier
        monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append(distributed.is_enabled()) or real_barrier())
        monkeypatch.setattr(distributed, "get_global_size", lambda: 2)  # as if another rank were still running
        distributed.shutdown()
    finally:
        distributed.disable()
    assert calls == [True]  # the barrier ran while the process group was still up
    assert not distributed.is_enabled() and not [key for key in TORCHRUN_ENV if key in distributed.os.environ]
    distributed.shutdown()  # without a process group: nothing to wait for, no error
    assert calls == [True]


def test_one_process_issues_no_collectives(monkeypatch):
    """With a process group of one, the helpers' collectives are skipped (torch < 2.8 can hang tearing down a gloo
    group whose worker thread still frees a collective's tensors) and give what the collective would give."""
    from dinov2.logging.helpers import SmoothedValue

    for key in [*TORCHRUN_ENV, *SLURM_ENV]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    assert not distributed.is_multi_process()
    distributed.enable(overwrite=True)
    try:
        calls = []
        for name in ("all_reduce", "barrier"):
            monkeypatch.setattr(distributed.dist, name, lambda *args, name=name, **kwargs: calls.append(name))
        assert distributed.is_enabled() and not distributed.is_multi_process()
        tensor = distributed.torch.tensor([3.0, 5.0])
        assert distributed.all_reduce_mean(tensor).tolist() == [3.0, 5.0]
        value = SmoothedValue()
        value.update(2.0, num=3)
        value.synchronize_between_processes()
        distributed.barrier()
        assert (calls, value.count, value.total) == ([], 3, 6.0)
        monkeypatch.setattr(distributed, "get_global_size", lambda: 2)  # as if there were another rank
        assert distributed.is_multi_process()
        distributed.all_reduce_mean(tensor)
        distributed.barrier()
        assert calls == ["all_reduce", "barrier"]
    finally:
        distributed.disable()


def test_exit_now_flushes_logs_and_streams_and_keeps_the_exit_code(tmp_path):
    """A finished script ends without interpreter finalization, but nothing written before is lost."""
    log_file = tmp_path / "log.txt"
    script = (
        "import logging, sys\n"
        "import dinov2.distributed as distributed\n"
        f"handler = logging.FileHandler({str(log_file)!r})\n"
        "logging.getLogger('dinov2').addHandler(handler)\n"
        "logging.getLogger('dinov2').warning('last log line')\n"
        "sys.stdout.write('unflushed stdout')\n"
        "sys.stderr.write('unflushed stderr')\n"
        "distributed.exit_now(3)\n"
        "print('never printed')\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": repo}, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 3
    assert done.stdout == "unflushed stdout" and done.stderr.endswith("unflushed stderr")
    assert log_file.read_text() == "last log line\n"
