"""DINOv2 self-supervised pretraining: `SSLMetaArch` and the training loop (`python dinov2/train/train.py`)."""

from .ssl_meta_arch import SSLMetaArch
from .train import get_args_parser, main

__all__ = ["SSLMetaArch", "get_args_parser", "main"]
