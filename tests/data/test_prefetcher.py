"""DevicePrefetcher: batches in order with their tensors on the device; on CUDA one batch read ahead, copied on a
side stream the training stream waits for."""

import contextlib
from typing import Any, Dict, Iterator, List

import pytest
import torch

from dinov2.data.prefetcher import DevicePrefetcher


def _counted(batches: List[Dict[str, Any]], pulled: List[int]) -> Iterator[Dict[str, Any]]:
    for i, batch in enumerate(batches):
        pulled.append(i)
        yield batch


def test_on_the_cpu_batches_pass_in_order_without_reading_ahead():
    batches = [{"crops": torch.full((2, 3), float(i)), "n": i, "name": f"b{i}"} for i in range(3)]
    pulled: List[int] = []
    prefetcher = DevicePrefetcher(_counted(batches, pulled), torch.device("cpu"))
    assert iter(prefetcher) is prefetcher
    for i, batch in enumerate(prefetcher):
        assert pulled == list(range(i + 1))  # nothing read ahead: the source may draw from this process's RNG
        assert batch["n"] == i and batch["name"] == f"b{i}"
        assert torch.equal(batch["crops"], batches[i]["crops"]) and batch["crops"].device.type == "cpu"
    with pytest.raises(StopIteration):
        next(prefetcher)


class _FakeStream:
    """Stands in for torch.cuda.Stream: records which streams it was made to wait for."""

    def __init__(self, name: str, log: List[str]) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: "_FakeStream") -> None:
        self.log.append(f"{self.name} waits for {other.name}")


def test_on_cuda_the_next_batch_is_queued_on_the_side_stream_before_the_caller_gets_this_one(monkeypatch):
    """The ordering logic with CUDA's stream calls replaced by recorders (no GPU here): the first `next` queues two
    batches, each later one queues one; the training stream waits for the side stream before every batch it gets;
    the last batch is handed out once and the end of the source is the end of the prefetcher."""
    log: List[str] = []
    training = _FakeStream("training", log)

    @contextlib.contextmanager
    def on_stream(stream: _FakeStream) -> Iterator[None]:
        log.append(f"queue on {stream.name}")
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: _FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: training)
    pulled: List[int] = []
    batches = [{"n": i} for i in range(3)]  # no tensors: nothing to move to a device that is not there
    prefetcher = DevicePrefetcher(_counted(batches, pulled), torch.device("cuda"))
    assert pulled == [] and log == []

    assert next(prefetcher) == {"n": 0}
    assert pulled == [0, 1]
    assert log == ["queue on side", "training waits for side", "queue on side"]
    log.clear()
    assert next(prefetcher) == {"n": 1}
    assert pulled == [0, 1, 2] and log == ["training waits for side", "queue on side"]
    log.clear()
    assert next(prefetcher) == {"n": 2}
    assert log == ["training waits for side"]  # the source is exhausted: nothing more queued
    with pytest.raises(StopIteration):
        next(prefetcher)
