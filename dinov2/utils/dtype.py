"""Conversion of config dtype names (`fp32`, `fp16`, `bf16`, ...) to `torch.dtype`."""

from typing import Union

import numpy as np
import torch

TypeSpec = Union[str, np.dtype, type, torch.dtype]

# Config spellings (compute_precision.*.mixed_precision.*_dtype) and the usual torch/numpy names.
_NAMED_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}


def as_torch_dtype(dtype: TypeSpec) -> torch.dtype:
    """`dtype` as a `torch.dtype`: a torch dtype is returned as is; a name such as "fp16", "bf16", "fp32",
    "float16" or "torch.bfloat16" is looked up; numpy dtypes map to their torch equivalent.
    Anything else raises a ValueError naming the accepted spellings."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in _NAMED_DTYPES:
            return _NAMED_DTYPES[name]
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(_NAMED_DTYPES)} or a torch.dtype")
    if isinstance(dtype, (np.dtype, type)):
        try:
            return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        except TypeError:
            pass
    raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(_NAMED_DTYPES)} or a torch.dtype")
