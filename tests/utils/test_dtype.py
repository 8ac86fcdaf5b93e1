"""dinov2.utils.dtype.as_torch_dtype: config spellings, torch/numpy dtypes, clear error on unknown names."""

import re

import numpy as np
import pytest
import torch

from dinov2.utils.dtype import as_torch_dtype


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16),
        ("float32", torch.float32), ("half", torch.float16), ("BF16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16), (torch.float16, torch.float16), (torch.int8, torch.int8),
        (np.float16, torch.float16), (np.dtype("float32"), torch.float32), (np.dtype("int64"), torch.int64),
    ],
)  # fmt: skip
def test_known_dtypes(spec, expected):
    assert as_torch_dtype(spec) is expected


@pytest.mark.parametrize("spec", ["fp8", "", None, 16, object])
def test_unknown_dtype_is_named(spec):
    with pytest.raises(ValueError, match=rf"Unknown dtype {re.escape(repr(spec))}; expected one of .*'fp16'"):
        as_torch_dtype(spec)
