import json
import logging
import os

import pytest
import torch

from dinov2.logging import MetricLogger, SmoothedValue, setup_logging


def test_smoothed_value_statistics():
    v = SmoothedValue(window_size=3)
    for x in [1.0, 5.0, 2.0, 4.0]:
        v.update(x)
    assert (v.median, v.avg, v.max, v.value) == (4.0, pytest.approx(11 / 3), 5.0, 4.0)
    assert v.global_avg == pytest.approx(3.0)
    v.synchronize_between_processes()  # no process group: unchanged
    assert (v.count, v.total) == (4, 12.0)


def test_log_every_writes_json_lines_and_respects_start_and_length(tmp_path):
    out = tmp_path / "training_metrics.json"
    metric_logger = MetricLogger(delimiter="  ", output_file=str(out))
    seen = []
    for i, x in enumerate(metric_logger.log_every(range(100), 2, "Training", n_iterations=7, start_iteration=3)):
        seen.append(x)
        metric_logger.update(loss=torch.tensor(float(x)), lr=0.5)
    assert seen == [0, 1, 2, 3]  # iterations 3..6
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [4, 6]  # every 2nd iteration and the last one
    assert sorted(records[0]) == ["data_time", "iter_time", "iteration", "loss", "lr"]
    assert records[0]["loss"] == 0.0 and records[1]["loss"] == 1.0  # lower medians of [0,1] and [0,1,2,3]
    assert metric_logger.loss.global_avg == 1.5
    with pytest.raises(AttributeError):
        metric_logger.missing_meter
    with pytest.raises(TypeError, match="tag"):
        metric_logger.update(tag="x")


class _ListHandler(logging.Handler):
    """Collects the messages of one logger, whatever handlers other tests left on it or on the root logger."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_log_every_default_length_logs_eta():
    metric_logger = MetricLogger()
    logger = logging.getLogger("dinov2")
    handler, previous_level = _ListHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert list(metric_logger.log_every([10, 20, 30], 10, "Eval:")) == [10, 20, 30]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    lines = handler.messages
    assert len(lines) == 3
    assert lines[0].startswith("Eval:\t[0/3]\teta: ") and lines[1].startswith("Eval:\t[2/3]")
    assert "Total time" in lines[-1]


def test_setup_logging_writes_file_and_replaces_handlers(tmp_path):
    name = "dinov2_test_logger"
    logger = setup_logging(str(tmp_path / "a"), name=name, level=logging.INFO)
    logger.info("first message")
    logger = setup_logging(str(tmp_path / "b"), name=name, level=logging.INFO)
    logger.info("second message")
    assert len(logger.handlers) == 2  # stdout + one file, not accumulated
    first = (tmp_path / "a" / "logs" / "log.txt").read_text()
    second = (tmp_path / "b" / "logs" / "log.txt").read_text()
    assert "first message" in first and "second message" not in first
    assert "second message" in second
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    assert not os.path.exists(tmp_path / "b" / "logs" / "log.txt.rank1")
