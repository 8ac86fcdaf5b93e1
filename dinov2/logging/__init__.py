"""Logging set-up: console on the main process, one log file per rank under `<output>/logs/`."""

import logging
import os
import sys
from typing import Optional

import dinov2.distributed as distributed

from .helpers import MetricLogger, SmoothedValue

__all__ = ["setup_logging", "MetricLogger", "SmoothedValue"]

_FORMAT = "%(levelname).1s%(asctime)s %(process)s %(name)s %(filename)s:%(lineno)s] %(message)s"
_DATEFMT = "%Y%m%d %H:%M:%S"
_HANDLER_FLAG = "_dinov2_handler"  # marks handlers added here, so a second call replaces rather than duplicates them


def _log_file_path(output: str) -> str:
    """`output` ending in .txt/.log is the file itself; otherwise `<output>/logs/log.txt`. Non-main ranks: `.rankN`."""
    if os.path.splitext(output)[-1] in (".txt", ".log"):
        filename = output
    else:
        filename = os.path.join(output, "logs", "log.txt")
    rank = distributed.get_global_rank()
    if rank > 0:
        filename = f"{filename}.rank{rank}"
    return filename


def setup_logging(
    output: Optional[str] = None,
    *,
    name: Optional[str] = None,
    level: int = logging.DEBUG,
    capture_warnings: bool = True,
) -> logging.Logger:
    """Configure logger `name` (default "dinov2"): stdout on the main process, and a file when `output` is given.

    Safe to call again (e.g. with a new output directory): handlers from a previous call are replaced.
    `capture_warnings` routes `warnings.warn` through logging ("py.warnings", same handlers).
    """
    logging.captureWarnings(capture_warnings)
    logger = logging.getLogger(name or "dinov2")
    logger.setLevel(level)
    logger.propagate = False
    targets = [logger] + ([logging.getLogger("py.warnings")] if capture_warnings else [])
    for target in targets:
        for handler in [h for h in target.handlers if getattr(h, _HANDLER_FLAG, False)]:
            target.removeHandler(handler)
            handler.close()

    formatter = logging.Formatter(fmt=_FORMAT, datefmt=_DATEFMT)
    handlers = []
    if distributed.is_main_process():
        stream_handler = logging.StreamHandler(stream=sys.stdout)
        handlers.append(stream_handler)
    if output:
        filename = _log_file_path(output)
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        handlers.append(logging.FileHandler(filename, mode="a", encoding="utf-8"))
    for handler in handlers:
        handler.setLevel(level)
        handler.setFormatter(formatter)
        setattr(handler, _HANDLER_FLAG, True)
        for target in targets:
            target.addHandler(handler)
    return logger
