"""Structured logging: one JSON object per line (or plain text for a terminal)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

_RESERVED = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; `extra=` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO", json_format: bool = True) -> None:
    """Sets up the root logger once per process; later calls only change the level."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if getattr(configure_logging, "_done", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
        )
    root.handlers[:] = [handler]
    configure_logging._done = True  # type: ignore[attr-defined]


class RateLimitedLog:
    """Logs a warning of each kind at most once per `interval_s`, saying how many of that
    kind were left out since the last one. For what callers can repeat at will (bad
    input, refused credentials): an attacker's flood of bad calls must not flood the
    log, and such a warning never carries a traceback (the stack is always the same)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, message: str, *args: object, kind: str = "") -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(kind, 0.0):
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._next[kind] = now + self.interval_s
            suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (%d more left out)"
            args = (*args, suppressed)
        self._log.warning(message, *args)
