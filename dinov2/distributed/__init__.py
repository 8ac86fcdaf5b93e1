"""Distributed set-up: detect SLURM, torchrun or a single process, start the process group, rank helpers.

`enable()` always starts a process group, also for a world of one (NCCL when CUDA is available, gloo otherwise),
as upstream does, so FSDP behaves the same at every world size. Before `enable()` (or after `disable()`) the helpers
answer for a single process: rank 0, size 1, main process. Code that issues collectives itself should guard them with
`is_multi_process()`: with one process they are skipped.

Environment precedence: a torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT; some but not all of them -> RuntimeError naming the missing ones), then a SLURM task (SLURM_JOB_ID and
all task variables, as set by srun), then a single local process on a free port (also inside a SLURM allocation
without srun, e.g. an salloc shell, with a warning).
"""

import builtins
import datetime
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, NoReturn, Optional

import torch
import torch.distributed as dist

from dinov2.utils.utils import torch_version

logger = logging.getLogger("dinov2")

_TORCHRUN_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_TORCHRUN_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NUM_NODES",
    "SLURM_JOB_NODELIST",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)
_PORT_RANGE = (20000, 60000)  # [low, high) for ports derived from the SLURM job id

_ENABLED = False
_GLOO_TEARDOWN_NEEDS_GIL = torch_version() < (2, 8)  # see shutdown()
GLOO_TEARDOWN_GRACE_S = 0.2
_BUILTIN_PRINT = builtins.print
_SAVED_ENV: dict = {}  # values (None = unset) of the variables `enable()` exported, restored by `disable()`


@dataclass(frozen=True)
class DistributedEnvironment:
    """Where this process sits: what `enable()` exports as MASTER_ADDR/MASTER_PORT/RANK/... and uses."""

    source: str  # "torchrun", "slurm" or "local"
    master_addr: str
    master_port: int
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    def as_env(self) -> dict:
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
        }


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise RuntimeError(f"Environment variable {key}={env[key]!r} is not an integer") from None


def _get_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_from_job_id(job_id: int) -> int:
    """Deterministic port in [20000, 60000) so that every task of a SLURM job agrees without communicating."""
    return random.Random(job_id).randrange(*_PORT_RANGE)


def parse_slurm_first_host(nodelist: str) -> str:
    """First host of a SLURM node list, e.g. 'gpu[003-005,009],cpu1' -> 'gpu003' (zero padding kept)."""
    nodelist = nodelist.strip()
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if m is None:
        raise RuntimeError(f"Cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_master_addr(nodelist: str) -> str:
    """First node of the allocation: `scontrol show hostnames` when available, else `parse_slurm_first_host`."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError) as e:
            logger.warning(f"scontrol show hostnames failed ({e}); parsing SLURM_JOB_NODELIST instead")
    return parse_slurm_first_host(nodelist)


def detect_environment(env: Optional[Mapping[str, str]] = None) -> DistributedEnvironment:
    """Read the distributed layout from `env` (default `os.environ`) without initialising anything."""
    env = os.environ if env is None else env
    present = [k for k in _TORCHRUN_RANK_VARS if k in env]
    if present:
        missing = [k for k in _TORCHRUN_VARS if k not in env]
        if missing:
            raise RuntimeError(
                f"Partially set torchrun environment: {present} set but {missing} missing "
                f"(set all of {list(_TORCHRUN_VARS)} or none)"
            )
        return DistributedEnvironment(
            source="torchrun",
            master_addr=env["MASTER_ADDR"],
            master_port=_int_env(env, "MASTER_PORT"),
            rank=_int_env(env, "RANK"),
            world_size=_int_env(env, "WORLD_SIZE"),
            local_rank=_int_env(env, "LOCAL_RANK"),
            local_world_size=_int_env(env, "LOCAL_WORLD_SIZE"),
        )
    missing_slurm = [k for k in _SLURM_VARS if k not in env]
    if "SLURM_JOB_ID" in env and missing_slurm:
        logger.warning(f"SLURM_JOB_ID is set but {missing_slurm} are not (not an srun task): single local process")
    elif "SLURM_JOB_ID" in env:
        n_nodes = _int_env(env, "SLURM_JOB_NUM_NODES")
        world_size = _int_env(env, "SLURM_NTASKS")
        if world_size % n_nodes != 0:
            raise RuntimeError(f"SLURM_NTASKS={world_size} is not a multiple of SLURM_JOB_NUM_NODES={n_nodes}")
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        else:
            port = _port_from_job_id(_int_env(env, "SLURM_JOB_ID"))
        return DistributedEnvironment(
            source="slurm",
            master_addr=_slurm_master_addr(env["SLURM_JOB_NODELIST"]),
            master_port=port,
            rank=_int_env(env, "SLURM_PROCID"),
            world_size=world_size,
            local_rank=_int_env(env, "SLURM_LOCALID"),
            local_world_size=world_size // n_nodes,
        )
    return DistributedEnvironment(
        source="local",
        master_addr="127.0.0.1",
        master_port=_get_free_port(),
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
    )


def _export_env(values: Mapping[str, str], overwrite: bool) -> None:
    for key, value in values.items():
        if not overwrite and key in os.environ and os.environ[key] != value:
            raise RuntimeError(f"Cannot export {key}={value}: already set to {os.environ[key]} (use overwrite=True)")
    for key, value in values.items():
        _SAVED_ENV.setdefault(key, os.environ.get(key))
        os.environ[key] = value


def _restrict_print_to_main_process() -> None:
    """Silence `print` on non-main ranks (pass `force=True` to print anyway), as upstream."""

    def _print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if force or is_main_process():
            _BUILTIN_PRINT(*args, **kwargs)

    builtins.print = _print


def enable(*, set_cuda_current_device: bool = True, overwrite: bool = False, allow_nccl_timeout: bool = False) -> None:
    """Detect the environment, export it, and start the default process group (idempotent).

    Backend: NCCL when CUDA is available, gloo otherwise. `set_cuda_current_device` selects cuda:LOCAL_RANK (and
    passes it to NCCL as the group's `device_id`);
    `allow_nccl_timeout=False` sets TORCH_NCCL_ASYNC_ERROR_HANDLING=1 so a stuck collective fails instead of hanging.
    A second call while enabled is a no-op.
    """
    global _ENABLED
    if _ENABLED and dist.is_initialized():
        return
    environment = detect_environment()
    _export_env(environment.as_env(), overwrite)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device_kwargs = {}
    if backend == "nccl":
        if set_cuda_current_device:
            torch.cuda.set_device(environment.local_rank)
            # binds the communicator to this GPU (NCCL otherwise guesses it from the rank, and warns at each barrier)
            device_kwargs["device_id"] = torch.device("cuda", environment.local_rank)
        if not allow_nccl_timeout:
            _export_env({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, overwrite)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=environment.rank,
            world_size=environment.world_size,
            timeout=datetime.timedelta(minutes=30),
            **device_kwargs,
        )
        dist.barrier()
    _ENABLED = True
    _restrict_print_to_main_process()
    logger.info(
        f"distributed: {environment.source} environment, backend {backend}, "
        f"rank {environment.rank}/{environment.world_size}, local rank {environment.local_rank}"
    )


def disable() -> None:
    """Tear down the process group, restore `print` and the environment variables `enable()` exported
    (e.g. between runs in one process)."""
    global _ENABLED
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    builtins.print = _BUILTIN_PRINT
    for key, value in _SAVED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _SAVED_ENV.clear()
    _ENABLED = False


def shutdown() -> None:
    """Normal end of a distributed script: wait for every rank, then `disable()`. A process group left to interpreter
    exit can abort the process in gloo's threads ("terminate called without an active exception") while another
    rank is still using it.

    In torch < 2.8 gloo's worker thread frees a finished collective (the barrier holds the earlier ones) after the
    caller has returned, and needs the GIL for it; `destroy_process_group` holds the GIL while joining that thread,
    so the two can deadlock (pytorch/pytorch#154976; seen in two-rank probe runs on torch 2.4). Sleeping a moment
    releases the GIL for the worker first."""
    if is_multi_process():
        dist.barrier()
        if _GLOO_TEARDOWN_NEEDS_GIL and dist.get_backend() == "gloo":
            time.sleep(GLOO_TEARDOWN_GRACE_S)
    disable()


def exit_now(code: int = 0) -> NoReturn:
    """End a script whose work is done (after `shutdown()`): flush the logs and streams, then exit without
    interpreter finalization. Gloo's worker threads can still own collective results that reference Python objects;
    releasing them while the interpreter is torn down aborts the process now and then ("terminate called without an
    active exception", SIGABRT; see pytorch/pytorch#179291), which turns a finished CPU run into a failed one."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def is_enabled() -> bool:
    """True when a default process group exists (collectives can be issued)."""
    return dist.is_available() and dist.is_initialized()


def get_global_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_multi_process() -> bool:
    """True when a process group has more than one rank: the only case where a collective does anything.

    With one process collectives are skipped, not issued: they would only add host time, and a gloo collective can
    hang the process group's teardown in torch < 2.8 (its destructor holds the GIL while joining a worker thread
    that needs the GIL to free the collective's tensors; pytorch/pytorch#154976)."""
    return is_enabled() and get_global_size() > 1


def get_global_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_local_rank() -> int:
    """Rank within the node (LOCAL_RANK once enabled; 0 for a single process)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_enabled() else 0


def get_local_size() -> int:
    """Processes on this node (LOCAL_WORLD_SIZE once enabled; 1 for a single process)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if is_enabled() else 1


def is_main_process() -> bool:
    return get_global_rank() == 0


def barrier() -> None:
    """Wait for all ranks; a no-op with one process."""
    if is_multi_process():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place (returns `tensor`); the identity with one process."""
    if is_multi_process():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(get_global_size())
    return tensor


def collective_device() -> torch.device:
    """Device for tensors passed to collectives: cuda under NCCL, cpu otherwise (gloo or no process group)."""
    if is_enabled() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
