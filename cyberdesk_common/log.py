"""Structured logging: one JSON object per line on stderr.

Secrets never reach a log line through these helpers: values of keys that look secret are masked
before they are written, and so is the password of any URL (`redis://:SECRET@host`) anywhere in
the message, the extra fields or a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

_SECRET_WORDS = ("token", "secret", "password", "authorization", "api_key", "apikey", "key")


# scheme://[user]:password@ -- the userinfo of a URL (RFC 3986). The password is everything up to
# the last "@" before the host: a password may itself contain ":" or an unescaped "@", and
# stopping early would print the rest of it.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)(?P<password>[^/?#\s]*)@")


def mask_secrets(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def mask_paths(text: str, *roots: str | os.PathLike[str]) -> str:
    """`text` with each of `roots` (the state directory...) written as `<state>`, for a tenant's eyes.

    A runtime's error (tar's, bubblewrap's) names files under the platform's state directory; the
    tenant may learn what failed, not where the platform keeps its files, nor the host's home.
    Both the path as given and its resolved form are replaced (a symlinked /tmp, a relative root).
    """
    for root in roots:
        forms = {os.fspath(root).rstrip("/"), os.path.realpath(root).rstrip("/")}
        for form in sorted(forms, key=len, reverse=True):  # the longer first: one may prefix the other
            if form:
                text = text.replace(form, "<state>")
    return text


def redact(name: str, value: object) -> object:
    """Mask `value` when `name` looks like it holds a secret; mask URL passwords in any string."""
    lowered = name.lower()
    if any(word in lowered for word in _SECRET_WORDS) and not lowered.endswith(("_id", "key_id")):
        return "***"
    if isinstance(value, str):
        return mask_secrets(value)
    return value


class JsonFormatter(logging.Formatter):
    """Formats a record as a single JSON line with its `extra` fields."""

    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask_secrets(record.getMessage()),
        }
        for name, value in record.__dict__.items():
            if name not in self._STANDARD and not name.startswith("_"):
                line[name] = redact(name, value)
        if record.exc_info:
            line["exc"] = mask_secrets(self.formatException(record.exc_info))
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
