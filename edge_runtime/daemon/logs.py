"""The daemon's log on stderr, as its settings say (--log-level / --log-format, or [log] in --config): text
lines, or JSON lines for log collectors, one object a line with time, level, logger, message and, when
there is one, the exception's traceback."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonLinesFormatter(logging.Formatter):
    """One JSON object a line: {"time": ISO 8601 UTC, "level", "logger", "message"[, "exception"][, "stack"]}."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)  # newlines in a message stay escaped: one line


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """The root logger at `level` ("debug", "info", "warning", "error") writing `fmt` ("text" or "json") to stderr,
    whoever configured logging before (the daemon's log is its operational record)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLinesFormatter())
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    number = logging.getLevelName(str(level).upper())
    if not isinstance(number, int):
        raise ValueError(f"log level must be debug, info, warning or error, got {level!r}")
    logging.basicConfig(level=number, handlers=[handler], force=True)
