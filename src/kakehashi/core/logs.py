"""Logging setup shared by every command: human-readable on a terminal, JSON otherwise."""

from __future__ import annotations

import json
import logging
import sys
import time


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        audit = getattr(record, "audit", None)
        if audit is not None:  # an audit decision: its fields, not a JSON string in "msg"
            return json.dumps({"level": record.levelname.lower(), "logger": record.name,
                               **audit}, default=str)
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", *, fmt: str = "auto") -> None:
    """Configure the root logger once. ``fmt``: auto | text | json."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    if use_json:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                               "%H:%M:%S"))
        logging.Formatter.converter = time.localtime
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # the audit stream is always kept; quiet it only explicitly
    logging.getLogger("kakehashi.audit").setLevel(logging.INFO if level != "error" else
                                                  logging.ERROR)
