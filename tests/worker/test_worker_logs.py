"""Log output: repeated client errors are rate-limited, other records pass untouched."""

from __future__ import annotations

import logging

from worker.logs import RepeatFilter


def record(name: str, msg: str, created: float, level: int = logging.ERROR) -> logging.LogRecord:
    item = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    item.created = created
    return item


def test_repeats_dropped_then_counted():
    repeats = RepeatFilter(interval_s=10)

    passed = [repeats.filter(record("aiokafka", "Unable connect to node %s", created=t)) for t in (0.0, 0.1, 0.2, 5.0)]
    late = record("aiokafka", "Unable connect to node %s", created=12.0)

    assert passed == [True, False, False, False]
    assert repeats.filter(late)
    assert late.msg == "Unable connect to node %s (3 more like this in the last 12 s)"


def test_other_loggers_and_templates_pass():
    repeats = RepeatFilter(interval_s=10)

    assert repeats.filter(record("aiokafka", "first template", created=0.0))
    assert repeats.filter(record("aiokafka", "second template", created=0.1))
    assert repeats.filter(record("worker.app", "batch failed", created=0.2))
    assert repeats.filter(record("worker.app", "batch failed", created=0.3))
