"""General helpers: strict loading of pretrained backbone weights, seeding, git info, cosine schedules."""

import logging
import os
import random
import re
import subprocess
import tempfile
from collections import Counter
from typing import IO, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend

logger = logging.getLogger("dinov2")

# `blocks.<chunk>.<index>.<rest>` (BlockChunk layout); an optional dotted prefix such as `backbone.` is kept.
_CHUNKED_BLOCK_KEY = re.compile(r"^((?:.+\.)?blocks)\.(\d+)\.(\d+)\.(.+)$")
# `blocks.<index>.<rest>` where <rest> does not start with a number (flat layout).
_FLAT_BLOCK_KEY = re.compile(r"^((?:.+\.)?blocks)\.(\d+)\.(\D.*)$")


class PretrainedWeightsError(RuntimeError):
    """A weights file that cannot be loaded into a model: unreadable layout, or keys/shapes that do not match.

    `missing_keys`, `unexpected_keys` and `shape_mismatches` (key -> (checkpoint shape, model shape)) describe
    the mismatch; `path` is the file."""

    def __init__(
        self,
        message: str,
        path: str = "",
        missing_keys: Iterable[str] = (),
        unexpected_keys: Iterable[str] = (),
        shape_mismatches: Optional[Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]] = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)
        self.shape_mismatches = dict(shape_mismatches or {})


# Name parts inserted by FSDP (use_orig_params=True) and activation-checkpoint wrappers.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def torch_version() -> Tuple[int, int]:
    """(major, minor) of the running torch, for behaviour that differs between releases."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def clean_wrapped_name(name: str) -> str:
    """A parameter or buffer name as the unwrapped module names it (FSDP and checkpoint-wrapper parts removed)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def convert_chunked_to_flat(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Rename chunked block keys `[prefix.]blocks.<chunk>.<i>.*` to flat `[prefix.]blocks.<i>.*` (the layout of
    the released hub files); other keys are kept. Order is preserved."""
    flat = {}
    for key, value in state_dict.items():
        match = _CHUNKED_BLOCK_KEY.match(key)
        new_key = f"{match[1]}.{match[3]}.{match[4]}" if match else key
        if new_key in flat:
            raise ValueError(f"Chunked key {key!r} collides with {new_key!r} when flattening block keys")
        flat[new_key] = value
    return flat


def _chunk_flat_block_keys(state_dict: Mapping[str, Any], chunk_of_block: Mapping[int, int]) -> Dict[str, Any]:
    """Rename flat block keys `blocks.<i>.*` to `blocks.<chunk_of_block[i]>.<i>.*`; blocks without a chunk
    (not in the mapping) keep their flat name."""
    chunked = {}
    for key, value in state_dict.items():
        match = _FLAT_BLOCK_KEY.match(key)
        if match and int(match[2]) in chunk_of_block:
            key = f"{match[1]}.{chunk_of_block[int(match[2])]}.{match[2]}.{match[3]}"
        chunked[key] = value
    return chunked


def convert_flat_to_chunked(state_dict: Mapping[str, Any], block_chunks: int, depth: int) -> Dict[str, Any]:
    """Rename flat block keys `[prefix.]blocks.<i>.*` to `[prefix.]blocks.<i // chunksize>.<i>.*`, the key layout
    of `DinoVisionTransformer(depth=depth, block_chunks=block_chunks)` (chunksize = depth // block_chunks)."""
    if block_chunks <= 0 or depth < block_chunks:
        raise ValueError(f"Need 0 < block_chunks <= depth, got block_chunks={block_chunks}, depth={depth}")
    chunksize = depth // block_chunks
    chunked = _chunk_flat_block_keys(state_dict, {i: i // chunksize for i in range(depth)})
    leftover = [key for key in chunked if _FLAT_BLOCK_KEY.match(key)]
    if leftover:
        raise ValueError(f"Block keys beyond depth={depth}: {leftover[:5]}")
    return chunked


def _strip_leading(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix) :]
    return key


def _select_state_dict(checkpoint: Any, checkpoint_key: Optional[str], path: str) -> Dict[str, Any]:
    """The state dict inside a loaded checkpoint: `checkpoint[checkpoint_key]`, else the checkpoint itself when it
    is a raw state dict (hub files), else `checkpoint["model"]` (restricted to `<checkpoint_key>.*` keys when it is
    a full training-model state dict such as `teacher.backbone.*` / `student.backbone.*`)."""
    if not isinstance(checkpoint, Mapping):
        raise PretrainedWeightsError(f"{path}: expected a dict of tensors, got {type(checkpoint).__name__}", path)
    if checkpoint_key and isinstance(checkpoint.get(checkpoint_key), Mapping):
        return dict(checkpoint[checkpoint_key])
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return dict(checkpoint)
    if isinstance(checkpoint.get("model"), Mapping):
        state_dict = dict(checkpoint["model"])
        prefix = f"{checkpoint_key}." if checkpoint_key else None
        if prefix and any(key.startswith(prefix) for key in state_dict):
            _log_ignored([key for key in state_dict if not key.startswith(prefix)], path)
            return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        return state_dict
    raise PretrainedWeightsError(
        f"{path}: no state dict found under {checkpoint_key!r} or 'model', and the file is not a raw state dict "
        f"(top-level keys: {sorted(map(str, checkpoint))[:10]})",
        path,
    )


def _log_ignored(keys: List[str], path: str) -> None:
    if keys:
        groups = Counter(key.split(".")[0] for key in keys)
        summary = ", ".join(f"{name}.* ({count} keys)" for name, count in groups.items())
        logger.info(f"Ignoring checkpoint entries not loaded into the model from {path}: {summary}")


def _match_model_layout(state_dict: Dict[str, Any], model_keys: List[str], path: str) -> Dict[str, Any]:
    """Strip `module.` (DDP) and `backbone.` (SSL meta-architecture) prefixes the model does not have, dropping the
    other SSL submodules (`dino_head.*`, `ibot_head.*`), and convert chunked <-> flat block keys to the model's."""
    if not any(key.startswith("module.") for key in model_keys):
        state_dict = {_strip_leading(key, "module."): value for key, value in state_dict.items()}
    model_has_backbone = any(key.startswith("backbone.") for key in model_keys)
    if not model_has_backbone and any(key.startswith("backbone.") for key in state_dict):
        _log_ignored([key for key in state_dict if not key.startswith("backbone.")], path)
        state_dict = {
            _strip_leading(key[len("backbone.") :], "module."): value
            for key, value in state_dict.items()
            if key.startswith("backbone.")
        }
    if set(state_dict) <= set(model_keys):
        return state_dict
    state_dict = convert_chunked_to_flat(state_dict)
    chunk_of_block = {}
    for key in model_keys:
        match = _CHUNKED_BLOCK_KEY.match(key)
        if match:
            chunk_of_block[int(match[3])] = int(match[2])
    if chunk_of_block:
        state_dict = _chunk_flat_block_keys(state_dict, chunk_of_block)
    return state_dict


def _pos_embed_hint(model: nn.Module, shapes: Tuple[Tuple[int, ...], Tuple[int, ...]]) -> str:
    num_positions = shapes[0][1] if len(shapes[0]) == 3 else 0
    side = int(round(max(num_positions - 1, 0) ** 0.5))
    patch_size = getattr(model, "patch_size", None)
    if side * side != num_positions - 1 or not patch_size:
        return ""
    return (
        f" (the checkpoint's pos_embed covers 1 + {side}x{side} patches: build the model with "
        f"img_size={side * patch_size}; inputs of other sizes still work, pos_embed is interpolated at run time)"
    )


MISMATCHES_SHOWN = 10  # shape mismatches listed one by one in a load error; the rest are counted by prefix


def summarise_keys(keys: Sequence[str], limit: int = 20) -> str:
    """`keys` joined, or when there are more than `limit` of them counted by their first name part
    (`blocks.* (144), cls_token, ...`): a wrong file's error stays readable."""
    if len(keys) <= limit:
        return ", ".join(keys)
    counts = Counter(key.split(".")[0] + (".*" if "." in key else "") for key in keys)
    return ", ".join(f"{name} ({count})" if count > 1 else name for name, count in counts.items())


def _mismatch_message(
    model: nn.Module,
    path: str,
    missing: List[str],
    unexpected: List[str],
    mismatched: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]],
) -> str:
    lines = [f"Weights in {path} do not match {type(model).__name__} (key names as mapped to the model's layout):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {summarise_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {summarise_keys(unexpected)}")
    shown = list(mismatched)[:MISMATCHES_SHOWN]
    for key in shown:
        ckpt_shape, model_shape = mismatched[key]
        other_grid = key == "pos_embed" and tuple(ckpt_shape)[:-1] != tuple(model_shape)[:-1]
        hint = _pos_embed_hint(model, (ckpt_shape, model_shape)) if other_grid else ""
        lines.append(f"  shape mismatch {key}: checkpoint {tuple(ckpt_shape)} vs model {tuple(model_shape)}{hint}")
    rest = [key for key in mismatched if key not in shown]
    if rest:
        lines.append(f"  and {len(rest)} more shape mismatches: {summarise_keys(rest, limit=0)}")
    widths = {shapes[0][-1] != shapes[1][-1] for key, shapes in mismatched.items() if key == "cls_token"}
    if widths == {True}:  # another embedding width: another architecture, not a detail
        ckpt_width, model_width = (shape[-1] for shape in mismatched["cls_token"])
        lines.append(f"  the checkpoint's embedding width is {ckpt_width}, the model's {model_width} (vit_small 384, "
                     "vit_base 768, vit_large 1024, vit_giant2 1536): check student.arch")  # fmt: skip
    return "\n".join(lines)


def load_pretrained_weights(
    model: nn.Module,
    pretrained_weights: Union[str, "os.PathLike[str]"],
    checkpoint_key: Optional[str] = "teacher",
    strict: bool = True,
) -> None:
    """Load a weights file or URL into `model`.

    Accepts a raw state dict (released hub `.pth`), `{"model": ...}`, `{checkpoint_key: ...}` (e.g. a training
    `teacher_checkpoint.pth`) and full training checkpoints whose `model` holds `teacher.*`/`student.*` keys.
    `module.` and `backbone.` prefixes are stripped (other SSL heads are dropped and logged) and chunked/flat block
    keys are converted to the model's layout. With `strict` (default) any missing or unexpected key or shape
    mismatch raises `PretrainedWeightsError` listing them all; otherwise matching entries are loaded and the rest
    logged as warnings.
    """
    path = os.fspath(pretrained_weights)
    if path.startswith(("http://", "https://")):
        try:
            checkpoint = torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=True)
        except OSError as e:  # includes urllib's URLError/HTTPError: offline, 404, ...
            raise PretrainedWeightsError(
                f"Cannot download weights from {path} ({e}); download the file elsewhere and pass its local path",
                path,
            ) from e
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Pretrained weights file not found: {path}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt/truncated files or pickles with non-tensor objects
            raise PretrainedWeightsError(f"Cannot read weights file {path}: {e}", path) from e

    model_state = model.state_dict()
    state_dict = _match_model_layout(_select_state_dict(checkpoint, checkpoint_key, path), list(model_state), path)

    missing = [key for key in model_state if key not in state_dict]
    unexpected = [key for key in state_dict if key not in model_state]
    mismatched = {}
    for key, value in state_dict.items():
        if key in model_state and tuple(getattr(value, "shape", ())) != tuple(model_state[key].shape):
            mismatched[key] = (tuple(getattr(value, "shape", ())), tuple(model_state[key].shape))
    if missing or unexpected or mismatched:
        message = _mismatch_message(model, path, missing, unexpected, mismatched)
        if strict:
            raise PretrainedWeightsError(message, path, missing, unexpected, mismatched)
        logger.warning(message + "\n  (strict=False: loading the matching entries only)")
        state_dict = {key: value for key, value in state_dict.items() if key in model_state and key not in mismatched}
    model.load_state_dict(state_dict, strict=strict)
    logger.info(f"Loaded pretrained weights from {path}")


def _fsync_dir(dirname: str) -> None:
    """Persist a rename on file systems that need the directory synced (best effort)."""
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: the os module has no getter)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str, write_fn: Callable[[IO], None], binary: bool = True) -> None:
    """Write `path` through `write_fn(file)` on a temp file next to it, fsync, then `os.replace` it into place.

    A reader (or a resumed run) never sees a partial file: a crash leaves only a hidden `.<name>.*.tmp` file.
    Text mode (`binary=False`) writes with `newline=""` so CSV writers control line endings.
    """
    dirname, basename = os.path.split(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{basename}.", suffix=".tmp", dir=dirname)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    _fsync_dir(dirname)


def fix_random_seeds(seed: int = 31) -> None:
    """Seed Python, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def get_sha() -> str:
    """`"sha: <commit>, status: <clean|has uncommitted changes>, branch: <name>"` of the git checkout holding this
    package, or `"unknown"` when git or the repository is unavailable."""
    cwd = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.check_output(["git", *args], cwd=cwd, stderr=subprocess.DEVNULL, timeout=10).decode().strip()

    try:
        sha = git("rev-parse", "HEAD")
        status = "has uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "clean"
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"sha: {sha}, status: {status}, branch: {branch}"


class CosineScheduler:
    """Per-iteration schedule: `freeze_iters` zeros, a linear warmup from `start_warmup_value` to `base_value` over
    `warmup_iters`, then a half cosine from `base_value` to `final_value`; iterations >= `total_iters` give
    `final_value`. The values are in the numpy array `schedule` (callers may edit it, e.g. to freeze a layer)."""

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0,
        freeze_iters: int = 0,
    ) -> None:
        cosine_iters = total_iters - warmup_iters - freeze_iters
        if min(total_iters, warmup_iters, freeze_iters) < 0 or cosine_iters < 0:
            raise ValueError(
                f"CosineScheduler needs 0 <= freeze_iters + warmup_iters <= total_iters, got freeze_iters="
                f"{freeze_iters}, warmup_iters={warmup_iters}, total_iters={total_iters}"
            )
        self.final_value = final_value
        self.total_iters = total_iters
        steps = np.arange(cosine_iters)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(cosine_iters, 1)))
        self.schedule = np.concatenate(
            (np.zeros(freeze_iters), np.linspace(start_warmup_value, base_value, warmup_iters), cosine)
        )

    def __getitem__(self, it: int) -> float:
        if it < 0:
            raise IndexError(f"CosineScheduler index must be >= 0, got {it}")
        if it >= self.total_iters:
            return self.final_value
        return float(self.schedule[it])


def check_compile_options(
    backend: str, mode: Optional[str], backend_key: str = "backend", mode_key: str = "mode"
) -> Dict[str, Any]:
    """`torch.compile` backend and mode checked against this PyTorch (errors name `backend_key` / `mode_key`, the
    config key or option they came from), as keyword arguments; torch.compile itself would only fail at first use."""
    from torch._dynamo import list_backends
    from torch._inductor import list_mode_options

    backends = list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(f"{backend_key} {backend!r} is not a torch.compile backend; expected one of {backends}")
    if mode is not None:
        modes = list(list_mode_options()) if backend == "inductor" else []
        if mode not in modes:
            raise ValueError(f"{mode_key} {mode!r} is not a mode of backend {backend!r}; expected null or one of {modes}")
    return {"backend": backend, "mode": mode}


def uses_cuda_graphs(compile_kwargs: Dict[str, Any]) -> bool:
    """Whether `torch.compile` with these (checked) keyword arguments records CUDA graphs (inductor's
    `reduce-overhead` and `max-autotune` modes), which replay at the addresses their inputs had when recorded."""
    from torch._inductor import list_mode_options

    mode = compile_kwargs.get("mode")
    if compile_kwargs["backend"] != "inductor" or mode is None:
        return False
    return bool(list_mode_options(mode).get("triton.cudagraphs", False))


def sdpa_backends_from_cfg(names: Optional[Sequence[str]], key: str) -> Optional[List[SDPBackend]]:
    """`torch.nn.attention.SDPBackend` members from their names (None stays None: PyTorch's choice); the error for
    an unknown name names the config `key` and the choices."""
    if names is None:
        return None
    choices = [name for name in SDPBackend.__members__ if name != "ERROR"]
    if isinstance(names, str):
        raise ValueError(f"{key} is {names!r}; expected a list of {choices} or null")
    backends = []
    for name in names:
        if name not in choices:
            raise ValueError(f"{key}: {name!r} is not an SDPBackend; expected a list of {choices} or null")
        backends.append(SDPBackend.__members__[name])
    if not backends:
        raise ValueError(f"{key} is empty; expected a list of {choices} or null")
    return backends


def has_batchnorms(model: nn.Module) -> bool:
    """Whether `model` contains any BatchNorm layer (incl. SyncBatchNorm), which the FSDP training path rejects."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
