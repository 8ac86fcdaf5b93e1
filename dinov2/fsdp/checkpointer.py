"""Checkpoints that work at every world size, with or without FSDP, written atomically.

Layout in `save_dir` (upstream's names): `<name>.rank_<r>.pth` per rank and `last_checkpoint.rank_<r>` (the basename
of that rank's newest complete checkpoint).

- Rank 0's file holds the FULL (unsharded) model state dict and the full optimizer state keyed by parameter name
  (`torch.distributed.checkpoint.state_dict`, which handles FSDP, nested FSDP units and plain modules alike), so a
  checkpoint can be resumed on any number of ranks and read without FSDP. Every rank's file holds its own RNG states
  (python, numpy, torch, cuda), the extra checkpointables (e.g. the grad scaler), the extra data given to `save`
  (iteration, ...) and the world size that wrote it. Upstream saves per-rank LOCAL shards instead, which crashes
  at world size 1 and cannot be resumed on another number of ranks.
- Loading: every rank reads the model/optimizer from rank 0's file (memory-mapped), so the save directory must be
  visible to all ranks (a shared file system, as for upstream's checkpoints on multi-node jobs).
- Atomic writes: temp file in the same directory + fsync + os.replace; the `last_checkpoint` tags are written after
  all ranks' files exist (barrier). The checkpoint of record is the one `last_checkpoint.rank_0` names, so all ranks
  agree even if a crash interrupted the tag updates; an interrupted save leaves at most a hidden `.*.tmp` file that
  nothing reads.
- Files hold only tensors and plain python values and are loaded with `torch.load(..., weights_only=True)`.
"""

import logging
import os
import random
import re
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

import dinov2.distributed as distributed
from dinov2.utils.utils import atomic_write, clean_wrapped_name

logger = logging.getLogger("dinov2")

_RESERVED_KEYS = ("model", "optimizer", "rng", "world_size", "rank")
_RANK_PATTERN = re.compile(r"rank_\d+")


def _rankstr(rank: Optional[int] = None) -> str:
    return f"rank_{distributed.get_global_rank() if rank is None else rank}"


def get_rng_state() -> Dict[str, Any]:
    """RNG states of python, numpy, torch and, on CUDA, this rank's device (the others belong to other ranks; a
    list of every visible device's would not load where a node shows fewer) as tensors / plain python values
    (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of `get_rng_state`."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _check_weights_only_value(value: Any, key: str) -> None:
    """Extras must load with `torch.load(weights_only=True)`: tensors, numbers, str, None and lists/tuples/dicts."""
    if isinstance(value, (torch.Tensor, bool, int, float, str, type(None))):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_weights_only_value(item, key)
        return
    if isinstance(value, dict):
        for k, item in value.items():
            _check_weights_only_value(k, key)
            _check_weights_only_value(item, key)
        return
    raise TypeError(f"checkpoint extra {key!r} holds a {type(value).__name__}: use tensors or plain python values")


def _expected_model_keys(model: nn.Module) -> List[str]:
    """State-dict keys of `model` without FSDP prefixes, from the names of its parameters and persistent buffers: no
    gather, and no sharded state dict (torch 2.4 cannot build one on a rank that holds no shard of a parameter)."""
    keys = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, _ in module.named_buffers(recurse=False, remove_duplicate=False):
            if name not in module._non_persistent_buffers_set:
                keys.append(f"{module_name}.{name}" if module_name else name)
    return [clean_wrapped_name(key) for key in keys]


def full_state_dict_options(model: nn.Module) -> StateDictOptions:
    """Options that gather the full (unsharded) state of `model` on every rank, or only on rank 0 for CUDA models.

    `cpu_offload` (gather to rank 0, on the CPU) is only used for CUDA models. With CPU (gloo) FSDP it breaks: the
    offloaded optimizer states alias one buffer (exp_avg comes back equal to exp_avg_sq), and torch 2.11's FSDP
    segfaults cloning the offloaded parameters. Without it every rank simply receives the full CPU state."""
    return StateDictOptions(full_state_dict=True, cpu_offload=any(p.is_cuda for p in model.parameters()))


class FSDPCheckpointer:
    """Save/load `model` (+ `optimizer`, + named `checkpointables` with state_dict/load_state_dict) per rank.

    `save`, `load` and `resume_or_load` are collective: call them on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        optimizer: Optional[torch.optim.Optimizer] = None,
        save_to_disk: bool = True,
        **checkpointables: Any,
    ) -> None:
        for name in checkpointables:
            if name in _RESERVED_KEYS:
                raise ValueError(f"checkpointable name {name!r} is reserved ({_RESERVED_KEYS})")
        self.model = model
        self.save_dir = save_dir
        self.optimizer = optimizer
        self.save_to_disk = save_to_disk
        self.checkpointables = checkpointables

    # ---- paths -------------------------------------------------------------------------------------------------
    def _tag_file(self, rank: Optional[int] = None) -> str:
        return os.path.join(self.save_dir, f"last_checkpoint.{_rankstr(rank)}")

    @staticmethod
    def _for_rank(path: str, rank: Optional[int] = None) -> str:
        """`path` with its `rank_<k>` (in the basename) replaced by `rank_<rank>` (default: this rank)."""
        dirname, basename = os.path.split(path)
        if not _RANK_PATTERN.search(basename):
            raise ValueError(f"Checkpoint file name {path} has no 'rank_<r>' part (expected <name>.rank_<r>.pth)")
        return os.path.join(dirname, _RANK_PATTERN.sub(_rankstr(rank), basename))

    def has_checkpoint(self) -> bool:
        """True when `save_dir` has a complete checkpoint (named by `last_checkpoint.rank_0`)."""
        return bool(self.save_dir) and os.path.exists(self._tag_file(0))

    def get_checkpoint_file(self) -> str:
        """This rank's file of the newest complete checkpoint in `save_dir`, or "" if there is none."""
        return self._checkpoint_file_in(self.save_dir) if self.has_checkpoint() else ""

    def _checkpoint_file_in(self, directory: str) -> str:
        tag = os.path.join(directory, f"last_checkpoint.{_rankstr(0)}")
        if not os.path.exists(tag):
            raise FileNotFoundError(f"{directory} holds no checkpoint ({tag} does not exist)")
        with open(tag) as f:
            basename = f.read().strip()
        if not basename:
            raise RuntimeError(f"{tag} is empty")
        return self._for_rank(os.path.join(directory, basename))

    def _resolve(self, path: str) -> str:
        """A checkpoint directory -> its newest checkpoint; a `.pth` file -> the same name for this rank. That file
        may not exist (resuming on more ranks than wrote the checkpoint): `load` then reads rank 0's."""
        if os.path.isdir(path):
            return self._checkpoint_file_in(path)
        has_rank = _RANK_PATTERN.search(os.path.basename(path)) is not None
        if not os.path.exists(path) and not (has_rank and os.path.exists(self._for_rank(path, 0))):
            raise FileNotFoundError(
                f"Checkpoint {path} does not exist (expected a checkpoint directory or a <name>.rank_<r>.pth file)"
            )
        return self._for_rank(path)

    # ---- save --------------------------------------------------------------------------------------------------
    def _gather_states(self):
        options = full_state_dict_options(self.model)
        if self.optimizer is None:
            return get_model_state_dict(self.model, options=options), None
        return get_state_dict(self.model, self.optimizer, options=options)

    def save(self, name: str, **extra: Any) -> None:
        """Write `<save_dir>/<name>.rank_<r>.pth` on every rank, then the `last_checkpoint` tags (collective; with
        `save_to_disk=False` or no `save_dir` a rank still takes part in the gather and barriers but writes nothing).

        `extra` values must be tensors or plain python values (they are returned by `load`)."""
        for key, value in extra.items():
            if key in _RESERVED_KEYS or key in self.checkpointables:
                raise ValueError(f"extra key {key!r} clashes with a checkpoint entry")
            _check_weights_only_value(value, key)
        model_state, optim_state = self._gather_states()
        write = bool(self.save_dir) and self.save_to_disk
        rank, world_size = distributed.get_global_rank(), distributed.get_global_size()
        basename = f"{name}.{_rankstr()}.pth"
        if write:
            data: Dict[str, Any] = {"world_size": world_size, "rank": rank, "rng": get_rng_state()}
            if rank == 0:
                data["model"] = model_state
                if optim_state is not None:
                    data["optimizer"] = optim_state
            for key, obj in self.checkpointables.items():
                data[key] = obj.state_dict()
            data.update(extra)
            os.makedirs(self.save_dir, exist_ok=True)
            save_file = os.path.join(self.save_dir, basename)
            logger.info(f"Saving checkpoint to {save_file}")
            atomic_write(save_file, lambda f: torch.save(data, f))
        distributed.barrier()  # every rank's file exists before any tag names it
        if write:
            atomic_write(self._tag_file(), lambda f: f.write(basename.encode()))
        distributed.barrier()

    # ---- load --------------------------------------------------------------------------------------------------
    @staticmethod
    def _read(path: str) -> Dict[str, Any]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint file {path} does not exist")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise RuntimeError(f"Cannot read checkpoint {path}: {e}") from e

    def _check_model_keys(self, state: Dict[str, Any], path: str) -> None:
        expected = set(_expected_model_keys(self.model))
        found = set(state)
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            raise RuntimeError(
                f"Checkpoint {path} does not match the model: missing keys {missing}, unexpected keys {unexpected}"
            )

    def load(self, path: str, *, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        """Load a checkpoint (a directory or any rank's `.pth` file of it) into the model and, unless
        `checkpointables` restricts it, into the optimizer, the named checkpointables and the RNGs (collective).

        `checkpointables=[]` loads the model only. Returns the extra data (e.g. "iteration")."""
        own_path = self._resolve(path)
        main_path = self._for_rank(own_path, 0)
        main = self._read(main_path)
        if "model" not in main:
            raise RuntimeError(f"Checkpoint {main_path} has no 'model' entry")
        written_by, world_size = int(main.get("world_size", 1)), distributed.get_global_size()
        if written_by == world_size or distributed.get_global_rank() < written_by:
            own = main if own_path == main_path else self._read(own_path)
        else:
            own = main
        own_source = own_path if own is not main else main_path  # the file this rank's entries come from
        self._check_model_keys(main["model"], main_path)
        full_load = checkpointables is None
        names = list(self.checkpointables) if full_load else list(checkpointables)
        strict = StateDictOptions(full_state_dict=True, strict=True)
        try:
            if full_load and self.optimizer is not None:
                if "optimizer" not in main:
                    raise RuntimeError("it has no optimizer state to resume from")
                set_state_dict(
                    self.model,
                    self.optimizer,
                    model_state_dict=main["model"],
                    optim_state_dict=main["optimizer"],
                    options=strict,
                )
            else:
                set_model_state_dict(self.model, main["model"], options=strict)
        except (RuntimeError, KeyError, ValueError) as e:
            raise RuntimeError(f"Cannot load checkpoint {main_path}: {e}") from e
        for name in names:
            if name not in self.checkpointables:
                raise KeyError(f"Unknown checkpointable {name!r} (have {sorted(self.checkpointables)})")
            if name not in own:
                raise RuntimeError(f"Checkpoint {own_source} has no {name!r} entry")
            self.checkpointables[name].load_state_dict(own[name])
        if full_load:
            if written_by == world_size:
                set_rng_state(own["rng"])
            else:
                logger.warning(
                    f"Checkpoint {main_path} was written by {written_by} ranks, this run has {world_size}: "
                    "model and optimizer loaded (they are stored unsharded), per-rank RNG states not restored"
                )
        logger.info(f"Loaded checkpoint {own_source}")
        return {k: v for k, v in own.items() if k not in _RESERVED_KEYS and k not in self.checkpointables}

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """Where training starts from (collective).

        resume=True: the newest complete checkpoint in `save_dir`; else, if `path` (MODEL.WEIGHTS: a checkpoint
        directory or a `.pth` file) is given, a full resume from it (model, optimizer, checkpointables, RNG);
        else nothing. resume=False: only the model weights from `path` if given (a fresh run starting from them).
        Returns the extra data of the loaded checkpoint ({} when starting fresh or with resume=False).
        """
        if resume and self.has_checkpoint():
            source = self.get_checkpoint_file()
        elif resume and path:
            source = self._resolve(path)
        else:
            if path:
                self.load(path, checkpointables=[])
                logger.info(f"Loaded model weights from {path} (no resume: optimizer and iteration start fresh)")
            return {}
        extra = self.load(source)  # logs the file this rank read
        checkpoint = self._for_rank(source, 0)  # named by rank 0's file on every rank
        logger.info(f"Resumed training from checkpoint {checkpoint} at iteration {extra.get('iteration')}")
        return extra


class PeriodicCheckpointer:
    """Save `<prefix>_<iteration:07d>` when (iteration + 1) % period == 0 and `<prefix>_final` at max_iter - 1;
    keep only the newest `max_to_keep` periodic checkpoints of this rank. Unlike fvcore, which counts only the files
    its own process wrote, the periodic checkpoints already in `save_dir` (an earlier process of a run that crashed
    or was preempted, then resumed) count too, oldest iteration first: otherwise every resume leaves up to
    `max_to_keep` more files behind."""

    def __init__(
        self,
        checkpointer: FSDPCheckpointer,
        period: int,
        max_iter: Optional[int] = None,
        max_to_keep: Optional[int] = None,
        file_prefix: str = "model",
    ) -> None:
        if period < 1:
            raise ValueError(f"checkpoint period must be >= 1, got {period}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.checkpointer = checkpointer
        self.period = int(period)
        self.max_iter = max_iter
        self.max_to_keep = max_to_keep
        self.file_prefix = file_prefix
        self.recent_checkpoints: List[str] = self._existing_checkpoints() if max_to_keep is not None else []

    def _existing_checkpoints(self) -> List[str]:
        """This rank's periodic checkpoint files in `save_dir`, by iteration."""
        directory = self.checkpointer.save_dir
        if not directory or not os.path.isdir(directory):
            return []
        pattern = re.compile(rf"{re.escape(self.file_prefix)}_(\d{{7}})\.{_rankstr()}\.pth")
        found = [(int(m.group(1)), name) for name in os.listdir(directory) if (m := pattern.fullmatch(name))]
        return [os.path.join(directory, name) for _, name in sorted(found)]

    def step(self, iteration: int, **kwargs: Any) -> None:
        iteration = int(iteration)
        additional_state = {"iteration": iteration, **kwargs}
        if (iteration + 1) % self.period == 0:
            name = f"{self.file_prefix}_{iteration:07d}"
            self.checkpointer.save(name, **additional_state)
            if self.max_to_keep is not None:
                path = os.path.join(self.checkpointer.save_dir, f"{name}.{_rankstr()}.pth")
                self.recent_checkpoints = [p for p in self.recent_checkpoints if p != path] + [path]
                while len(self.recent_checkpoints) > self.max_to_keep:
                    old = self.recent_checkpoints.pop(0)
                    if os.path.exists(old):
                        os.remove(old)
        if self.max_iter is not None and iteration >= self.max_iter - 1:
            self.checkpointer.save(f"{self.file_prefix}_final", **additional_state)

    def save(self, name: str, **kwargs: Any) -> None:
        self.checkpointer.save(name, **kwargs)
