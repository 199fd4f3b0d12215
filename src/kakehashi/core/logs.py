"""Logging setup shared by every command: human-readable on a terminal, JSON otherwise."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

#: ``json.dumps(obj, default=str)`` without building a :class:`json.JSONEncoder` per call
#: (``dumps`` does, for any argument it is given): the same text, about 3 us less per
#: audit line, which a busy gateway writes once per client connection
dumps_default_str: Callable[[object], str] = json.JSONEncoder(default=str).encode


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        audit = getattr(record, "audit", None)
        if audit is not None:  # an audit decision: its fields, not a JSON string in "msg"
            return dumps_default_str({"level": record.levelname.lower(),
                                      "logger": record.name, **audit})
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


#: what :func:`setup_logging` installed for audit lines: writes one the way its handler
#: would, without the logging machinery (None: the audit log goes through ``logging``)
audit_writer: Callable[[dict[str, Any]], None] | None = None

#: the audit line's own writer may be used (``KAKEHASHI_AUDIT_DIRECT=0`` turns it off:
#: every line then goes through ``logging``, as it did before)
AUDIT_DIRECT = os.environ.get("KAKEHASHI_AUDIT_DIRECT", "1") != "0"

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
TEXT_DATEFMT = "%H:%M:%S"


def _audit_writer(handler: logging.StreamHandler, use_json: bool,  # type: ignore[type-arg]
                  ) -> Callable[[dict[str, Any]], None]:
    """The audit logger's line exactly as ``handler`` formats it, written under its lock.

    A busy gateway writes one audit line per client connection. Through ``logging``
    (a record, the logger tree, the handler, the formatter) a line cost about 41 us
    and 30 % of a one-request connection's CPU at the default log level; the same
    bytes written here cost a third of that. Only the handler of :func:`setup_logging`
    is served this way: any other handler (a test's, an embedding application's) gets
    the records through ``logging`` as before.
    """
    stream = handler.stream
    lock = handler.lock
    dumps = dumps_default_str
    if use_json:
        head = {"level": "info", "logger": "kakehashi.audit"}

        def line(entry: dict[str, Any]) -> str:
            return dumps({**head, **entry})
    else:
        prefix = " INFO    kakehashi.audit: "

        def line(entry: dict[str, Any]) -> str:
            return time.strftime(TEXT_DATEFMT, time.localtime()) + prefix + \
                dumps(entry)

    def write(entry: dict[str, Any]) -> None:
        text = line(entry) + "\n"
        if lock is None:
            stream.write(text)
            stream.flush()
            return
        with lock:
            stream.write(text)
            stream.flush()

    return write


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
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, TEXT_DATEFMT))
        logging.Formatter.converter = time.localtime
    root.addHandler(handler)
    global audit_writer
    audit_writer = _audit_writer(handler, use_json) if AUDIT_DIRECT else None
    handler.kakehashi_audit_direct = audit_writer is not None  # type: ignore[attr-defined]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # the audit stream is always kept; quiet it only explicitly
    logging.getLogger("kakehashi.audit").setLevel(logging.INFO if level != "error" else
                                                  logging.ERROR)
