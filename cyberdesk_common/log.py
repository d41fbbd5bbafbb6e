"""Structured logging: one JSON object per line on stderr.

Secrets never reach a log line through these helpers: values of keys that look secret are masked
before they are written.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_SECRET_WORDS = ("token", "secret", "password", "authorization", "api_key", "apikey", "key")


def redact(name: str, value: object) -> object:
    """Mask `value` when `name` looks like it holds a secret."""
    lowered = name.lower()
    if any(word in lowered for word in _SECRET_WORDS) and not lowered.endswith(("_id", "key_id")):
        return "***"
    return value


class JsonFormatter(logging.Formatter):
    """Formats a record as a single JSON line with its `extra` fields."""

    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in self._STANDARD and not name.startswith("_"):
                line[name] = redact(name, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def setup_logging(service: str, level: str = "INFO") -> logging.Logger:
    """Configure the root logger for a service process and return the service's logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
    return logging.getLogger(service)
