"""Logging for the long-running processes: readable lines, or JSON lines with --log-format json."""

from __future__ import annotations

import json
import logging
import sys
import time

#: Keys every JSON record has; a field of the same name is kept as ``field_<name>``.
RESERVED = ("time", "level", "logger", "msg", "args", "exc")


class JSONFormatter(logging.Formatter):
    """One JSON object a line; the data goes in fields, never into ``msg``.

    ``msg`` is the message as written in the code (a constant: count it, alert on it, grep it);
    structured data (:func:`event`'s fields) are keys of their own, and the arguments of a
    ``%``-style call (``log.info("refused %s: %s", addr, why)``, e.g. from aioquic or the
    transports) are the list ``args`` rather than being formatted into ``msg``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": str(record.msg),
        }
        if record.args:
            args = record.args
            if isinstance(args, dict):  # log.info("%(a)s", {"a": 1}): already named
                entry["args"] = args
            else:
                entry["args"] = list(args) if isinstance(args, tuple) else [args]
        for key, value in getattr(record, "fields", {}).items():
            entry[f"field_{key}" if key in RESERVED else key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{record.levelname.lower()} {record.name}: {record.getMessage()}"
        return f"{line} {extra}".rstrip() + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else ""
        )


def setup(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("quic").setLevel(logging.WARNING)


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields) -> None:
    """Log ``msg`` with structured ``fields`` (kept as keys in JSON output)."""
    logger.log(level, msg, extra={"fields": fields})
