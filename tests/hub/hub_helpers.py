"""Shared helpers of the hub tests."""

import contextlib
import importlib.util
import io
from pathlib import Path

from torch import nn

from dinov2.models import vision_transformer as vits

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_fake_official_weights.py"


def build_released_vits14() -> nn.Module:
    """ViT-S/14 exactly as the hub builds it for the released `dinov2_vits14_pretrain.pth`."""
    return vits.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)


def run_make_fake_official_weights(argv: list) -> list:
    """Run `scripts/make_fake_official_weights.py` in-process; returns the paths it printed as written."""
    spec = importlib.util.spec_from_file_location("make_fake_official_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert module.main(argv) == 0
    return [line.removeprefix("wrote ") for line in output.getvalue().splitlines() if line.startswith("wrote ")]
