"""Metric tracking for training/eval loops: windowed averages, periodic console lines with ETA, JSON lines."""

import datetime
import json
import logging
import os
import time
from collections import defaultdict, deque
from typing import Dict, Iterable, Iterator, Optional

import torch

import dinov2.distributed as distributed
from dinov2.utils.utils import atomic_write

logger = logging.getLogger("dinov2")


class SmoothedValue:
    """A series of values: median/avg over the last `window_size`, global average and last value."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None) -> None:
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, num: int = 1) -> None:
        self.deque.append(value)
        self.count += num
        self.total += value * num

    def synchronize_between_processes(self) -> None:
        """Sum count and total over ranks (the window stays local). A no-op with one process."""
        if not distributed.is_multi_process():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=distributed.collective_device())
        torch.distributed.all_reduce(t)
        self.count = int(t[0].item())
        self.total = t[1].item()

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float64).median().item()

    @property
    def avg(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float64).mean().item()

    @property
    def global_avg(self) -> float:
        return self.total / self.count

    @property
    def max(self) -> float:
        return max(self.deque)

    @property
    def value(self) -> float:
        return self.deque[-1]

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


def _record_iteration(line: str) -> Optional[int]:
    """The iteration of one JSON line of the output file; None for a line that is not a whole record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("iteration") if isinstance(record, dict) else None


class MetricLogger:
    """Named `SmoothedValue` meters; `log_every` wraps an iterable and logs every `print_freq` iterations.

    With `output_file`, the main process appends one JSON line per logged iteration:
    `{"iteration": i, "iter_time": s, "data_time": s, <meter>: <median>, ...}`.
    """

    def __init__(self, delimiter: str = "\t", output_file: Optional[str] = None) -> None:
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.output_file = output_file

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            if not isinstance(v, (float, int)):
                raise TypeError(f"MetricLogger.update: {k} must be a number or a one-element tensor, got {type(v)}")
            self.meters[k].update(v)

    def __getattr__(self, attr: str):
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def drop_records_from(self, iteration: int) -> None:
        """Remove the output file's records of `iteration` and later, and any line a crash cut short (main process).
        A run started over, or resumed from a checkpoint older than its last logged iteration, would otherwise list
        those iterations twice, the old values first."""
        if self.output_file is None or not distributed.is_main_process() or not os.path.isfile(self.output_file):
            return
        with open(self.output_file) as f:
            lines = f.readlines()
        kept = [line for line in lines if (logged := _record_iteration(line)) is not None and logged < iteration]
        if len(kept) != len(lines):
            atomic_write(self.output_file, lambda f: f.writelines(kept), binary=False)

    def dump_in_output_file(self, iteration: int, iter_time: float, data_time: float) -> None:
        if self.output_file is None or not distributed.is_main_process():
            return
        record = dict(iteration=iteration, iter_time=iter_time, data_time=data_time)
        record.update({k: v.median for k, v in self.meters.items()})
        os.makedirs(os.path.dirname(os.path.abspath(self.output_file)), exist_ok=True)
        with open(self.output_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_every(
        self,
        iterable: Iterable,
        print_freq: int,
        header: Optional[str] = None,
        n_iterations: Optional[int] = None,
        start_iteration: int = 0,
    ) -> Iterator:
        """Yield from `iterable` for iterations `start_iteration .. n_iterations-1` (n_iterations defaults to
        len(iterable)); log `header [i/n] eta ... meters ... time data max mem` every `print_freq` and at the end."""
        i = start_iteration
        header = header or ""
        start_time = time.time()
        end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.6f}")
        data_time = SmoothedValue(fmt="{avg:.6f}")
        if n_iterations is None:
            n_iterations = len(iterable)
        space_fmt = ":" + str(len(str(n_iterations))) + "d"
        parts = [header, "[{0" + space_fmt + "}/{1}]", "eta: {eta}", "{meters}", "time: {time}", "data: {data}"]
        if torch.cuda.is_available():
            parts.append("max mem: {memory:.0f}")
        log_msg = self.delimiter.join(parts)
        if i >= n_iterations:
            return
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n_iterations - 1:
                self.dump_in_output_file(iteration=i, iter_time=iter_time.avg, data_time=data_time.avg)
                eta_seconds = iter_time.global_avg * (n_iterations - i - 1)
                fields = dict(
                    eta=str(datetime.timedelta(seconds=int(eta_seconds))),
                    meters=str(self),
                    time=str(iter_time),
                    data=str(data_time),
                )
                if torch.cuda.is_available():
                    fields["memory"] = torch.cuda.max_memory_allocated() / (1024.0 * 1024.0)
                logger.info(log_msg.format(i, n_iterations, **fields))
            i += 1
            end = time.time()
            if i >= n_iterations:
                break
        total_time = time.time() - start_time
        total_time_str = str(datetime.timedelta(seconds=int(total_time)))
        n_done = max(i - start_iteration, 1)
        logger.info(f"{header} Total time: {total_time_str} ({total_time / n_done:.6f} s / it)")
