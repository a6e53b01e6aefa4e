"""Log setup: plain text for a terminal, one JSON object per line for a log pipeline."""

from __future__ import annotations

import json
import logging
import time

# Attributes every LogRecord has; anything else was passed through `extra=` and is kept.
_STANDARD_ATTRIBUTES = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line: time, level, logger, message, plus any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD_ATTRIBUTES and not name.startswith("_"):
                document[name] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Pass the first record of each logger and message template, then at most one per interval_s.

    While a broker is unreachable, aiokafka 0.14 logs the same connection errors on every
    retry, about every 100 ms per client. The record that passes after a quiet interval
    carries the number of records dropped since the last one.
    """

    def __init__(self, interval_s: float = 10.0, prefixes: tuple[str, ...] = ("aiokafka",)) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.prefixes = prefixes
        self._passed: dict[tuple[str, int, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, record.levelno, record.msg)
        passed_at, dropped = self._passed.get(key, (float("-inf"), 0))
        if record.created - passed_at < self.interval_s:
            self._passed[key] = (passed_at, dropped + 1)
            return False
        self._passed[key] = (record.created, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like this in the last {record.created - passed_at:.0f} s)"
        return True


def logging_config(level: str, log_format: str) -> dict:
    """Return a logging.config.dictConfig document: one stderr handler in the chosen format.

    faust's Worker applies it too, so its own log lines come out in the same format.
    """
    formatter = {"()": JsonFormatter} if log_format == "json" else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"repeats": {"()": RepeatFilter}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "default", "filters": ["repeats"], "stream": "ext://sys.stderr"}
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }
