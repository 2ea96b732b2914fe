"""Structured logs for every dsn process: one JSON object per line on stderr.

Each record has ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``event`` (the message), the
process's static fields (for example the MPI rank) and the record's own fields, passed as
``log.info("event", extra=fields(key=value))``. Callers never pass tokens or key material.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any


class JsonLines(logging.Formatter):
    def __init__(self, static: dict[str, Any]) -> None:
        super().__init__()
        self._static = static

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **self._static,
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(name: str, level: int = logging.INFO, **static: Any) -> logging.Logger:
    """The logger ``name`` (and its children), writing JSON lines to stderr."""
    logger = logging.getLogger(name)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(static))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return logger


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the values appear as keys of the JSON object."""
    return {"fields": values}
