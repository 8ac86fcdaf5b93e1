"""torch.hub entry points, e.g. `torch.hub.load("<this repo>", "dinov2_vits14", source="local")`.

Offline machines: put the released files (`dinov2_vits14_pretrain.pth`, ...) in `$DINOV2_WEIGHTS_DIR`."""

from dinov2.hub.backbones import (  # noqa: F401
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
)
from dinov2.hub.classifiers import (  # noqa: F401
    dinov2_vitb14_lc,
    dinov2_vitb14_reg_lc,
    dinov2_vitg14_lc,
    dinov2_vitg14_reg_lc,
    dinov2_vitl14_lc,
    dinov2_vitl14_reg_lc,
    dinov2_vits14_lc,
    dinov2_vits14_reg_lc,
)

dependencies = ["torch"]
