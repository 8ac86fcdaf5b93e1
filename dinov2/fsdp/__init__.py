"""FSDP wrapping from `compute_precision.<model>.<submodule>` configs, FSDP helpers and the checkpointers (with one
process, training runs without FSDP: see `low_precision.py`).

CPU: torch's FSDP runs on CPU with gloo when `device_id=torch.device("cpu")`, but refuses
`sync_module_states=True` there; the CPU wrapper therefore broadcasts parameters and buffers from rank 0 itself
before wrapping (the same effect). The training maths is the same as on GPU.
`ShardedGradScaler` (torch's, made usable with fused optimizers) is the grad scaler of fp16 training. Without CUDA,
`ShardedGradScaler()` disables itself (with a warning); `ShardedGradScaler(device="cpu")` works but needs a process
group (it all-reduces found-inf flags). With fp32 parameters on CPU the training code runs without a scaler.
"""

import functools
import warnings
from typing import Any, Callable, List, Set, Type

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
from torch.distributed.fsdp._runtime_utils import _reshard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as _TorchShardedGradScaler
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import dinov2.distributed as distributed
from dinov2.utils.dtype import as_torch_dtype

from .checkpointer import FSDPCheckpointer, PeriodicCheckpointer

__all__ = [
    "get_fsdp_wrapper",
    "is_fsdp",
    "is_sharded_fsdp",
    "free_if_fsdp",
    "get_fsdp_modules",
    "reshard_fsdp_model",
    "clip_grad_norm_",
    "rankstr",
    "FSDPCheckpointer",
    "PeriodicCheckpointer",
    "ShardedGradScaler",
    "mixed_precision_dtype",
]

_SHARDING_STRATEGIES = {
    "NO_SHARD": ShardingStrategy.NO_SHARD,
    "SHARD_GRAD_OP": ShardingStrategy.SHARD_GRAD_OP,
    "FULL_SHARD": ShardingStrategy.FULL_SHARD,
}


_BLOCK_CHUNK_WARNING = r"FSDP will not all-gather parameters for containers that do not implement forward: BlockChunk\("


def _sharding_strategy(value: Any) -> ShardingStrategy:
    if value not in _SHARDING_STRATEGIES:
        raise ValueError(f"sharding_strategy={value!r} is not supported (use one of {sorted(_SHARDING_STRATEGIES)})")
    return _SHARDING_STRATEGIES[value]


def mixed_precision_dtype(value: Any, key: str) -> torch.dtype:
    """A `mixed_precision` dtype from the config as a torch dtype; errors name `key`, the config key it came from."""
    try:
        return as_torch_dtype(value)
    except ValueError as e:
        raise ValueError(f"{key}={value!r}: {e}") from None


def _broadcast_module_states(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (what `sync_module_states=True` does on GPU)."""
    if distributed.get_global_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def _fsdp(module: nn.Module, **fsdp_kwargs: Any) -> FSDP:
    """`FSDP(module, **fsdp_kwargs)`, without FSDP's warning that a wrapped `BlockChunk` would not all-gather its
    parameters: FSDP says so of every `nn.ModuleList` it wraps, with the chunk's whole repr (dozens of log lines per
    chunk), but `BlockChunk` has a forward, so FSDP does all-gather it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BLOCK_CHUNK_WARNING, category=UserWarning)
        return FSDP(module, **fsdp_kwargs)


def _fsdp_on_cpu(module: nn.Module, *, sync_module_states: bool, **fsdp_kwargs: Any) -> FSDP:
    if sync_module_states:
        _broadcast_module_states(module)
    return _fsdp(module, device_id=torch.device("cpu"), sync_module_states=False, **fsdp_kwargs)


def get_fsdp_wrapper(
    model_cfg: DictConfig, modules_to_wrap: Set[Type[nn.Module]] = set()
) -> Callable[[nn.Module], FSDP]:
    """A `functools.partial` that wraps a module in FSDP per `model_cfg` (`sharding_strategy`: NO_SHARD |
    SHARD_GRAD_OP | FULL_SHARD; `mixed_precision.{param,reduce,buffer}_dtype`: fp32 | fp16 | bf16), with
    `use_orig_params=True`, `sync_module_states=True` and each instance of `modules_to_wrap` as its own FSDP unit
    (e.g. `{BlockChunk}`). On CUDA the device is cuda:LOCAL_RANK; on CPU see the module docstring."""
    sharding_strategy = _sharding_strategy(model_cfg.sharding_strategy)
    mp_cfg = model_cfg.mixed_precision
    mixed_precision = MixedPrecision(
        param_dtype=mixed_precision_dtype(mp_cfg.param_dtype, "mixed_precision.param_dtype"),
        reduce_dtype=mixed_precision_dtype(mp_cfg.reduce_dtype, "mixed_precision.reduce_dtype"),
        buffer_dtype=mixed_precision_dtype(mp_cfg.buffer_dtype, "mixed_precision.buffer_dtype"),
    )
    fsdp_kwargs = dict(
        sharding_strategy=sharding_strategy,
        mixed_precision=mixed_precision,
        sync_module_states=True,
        use_orig_params=True,
        auto_wrap_policy=ModuleWrapPolicy(modules_to_wrap),
    )
    if torch.cuda.is_available():
        return functools.partial(_fsdp, device_id=distributed.get_local_rank(), **fsdp_kwargs)
    return functools.partial(_fsdp_on_cpu, **fsdp_kwargs)


def is_fsdp(x: nn.Module) -> bool:
    return isinstance(x, FSDP)


def is_sharded_fsdp(x: nn.Module) -> bool:
    """FSDP with an effective strategy other than NO_SHARD (FSDP falls back to NO_SHARD at world size 1)."""
    return is_fsdp(x) and x.sharding_strategy is not ShardingStrategy.NO_SHARD


def free_if_fsdp(x: nn.Module) -> None:
    """Free the unsharded flat parameter of a sharded FSDP unit (keeps only this rank's shard in memory)."""
    if is_sharded_fsdp(x) and x._handle is not None:
        _reshard(x, x._handle, True)


def get_fsdp_modules(x: nn.Module) -> List[FSDP]:
    return FSDP.fsdp_modules(x)


def reshard_fsdp_model(x: nn.Module) -> None:
    """Free all unsharded parameters of `x`'s FSDP units (the teacher after its no-grad forward, as upstream)."""
    for m in get_fsdp_modules(x):
        free_if_fsdp(m)


def clip_grad_norm_(module: FSDP, max_norm: float) -> torch.Tensor:
    """`module.clip_grad_norm_(max_norm)` (L2 norm over the gradients of all ranks' shards, then all gradients times
    min(1, max_norm / (norm + 1e-6))) with foreach kernels; returns the total norm (fp32).

    FSDP's own method, once some unit is sharded, computes one norm per parameter and multiplies one gradient at a
    time: 1109 operator calls for a ViT-L backbone at 2 ranks, against 11 here (profiler counts). When no unit is
    sharded (world size 1, NO_SHARD) FSDP already uses `torch.nn.utils.clip_grad_norm_`, and so does this."""
    if not all(is_sharded_fsdp(unit) for unit in get_fsdp_modules(module)):
        return module.clip_grad_norm_(max_norm)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        norms = torch._foreach_norm([g if g.dtype == torch.float32 else g.float() for g in grads])
        squared = torch.linalg.vector_norm(torch.stack(norms)) ** 2
    else:  # this rank holds no gradient, but takes part in the reduction
        squared = torch.zeros((), device=module.compute_device)
    dist.all_reduce(squared, group=module.process_group)
    total_norm = squared.sqrt()
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for dtype in {g.dtype for g in grads}:
        torch._foreach_mul_([g for g in grads if g.dtype == dtype], coef.to(dtype))
    return total_norm


class ShardedGradScaler(_TorchShardedGradScaler):
    """torch's `ShardedGradScaler` whose `unscale_` leaves 0-dim found-inf flags of 0 or 1, as a fused optimizer
    stepped through the scaler after `unscale_` (as gradient clipping needs) requires.

    torch's flags have shape (1,), and the fused step then fails in its step-counter update ("output with shape []
    doesn't match the broadcast shape [1]", pytorch/pytorch#140514). They are also summed over the ranks, so with
    several ranks that all overflow the flag is the number of ranks, and the fused kernel, which skips the update only
    for a flag of exactly 1, applies the inf gradients: the parameters become NaN at the first fp16 overflow. The
    non-fused optimizers test the flag for non-zero on the host, which hid both."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        state = self._per_optimizer_states[id(optimizer)]
        flags = state["found_inf_per_device"]
        state["found_inf_per_device"] = {device: flag.reshape(()).clamp(max=1.0) for device, flag in flags.items()}


def rankstr() -> str:
    return f"rank_{distributed.get_global_rank()}"
