"""DINOv2 self-supervised pretraining and evaluation, adapted to industrial quality control (BBU devices)."""

__version__ = "0.1.0"
