"""Operational logs: klog-style JSON lines on stderr.  A shell module.

Operational logs are for the operator ("policy reloaded", "certificate
reloaded", "internal error, admitted unchanged"); they are not audit records
(``webhook.auditlog``), which go to their own stream with their own schema
(STYLE.md habit 13).

The line format follows klog's JSON output (Kubernetes structured logging,
KEP-1602): ``ts`` (epoch seconds, float), ``v`` (verbosity of an info line),
``msg``, then key/value pairs; an error line has ``err`` instead of ``v``::

    {"ts":1700000000.123456,"v":0,"msg":"policy reloaded","source":"/etc/.../policy.yaml"}
    {"ts":1700000000.234567,"msg":"policy rejected, keeping the last good one","err":"..."}

Verbosity maps onto the standard ``logging`` levels as ``INFO - v``, so that
``-v 2`` shows lines of v 0, 1 and 2 and nothing costs more than a level check
when it is filtered out.  Everything goes through the stdlib ``logging`` module
(one handler per process, one ``write`` per line), so gunicorn's own messages
share the format: ``webhook.server`` attaches the same formatter to them.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import IO, Any

LOGGER_NAME = "ecr_webhook"
STACKTRACE_VERBOSITY = 4


def level_of(v: int) -> int:
    """The ``logging`` level of an info line of verbosity ``v`` (v 0 is INFO)."""
    return max(logging.INFO - max(v, 0), 1)


class KlogJsonFormatter(logging.Formatter):
    """Format a ``LogRecord`` as one klog-style JSON object.

    Key/value pairs come from ``extra={"kv": {...}}``; an ``err`` string from
    ``extra={"err": ...}`` or from the record's exception.  Records at WARNING
    and above are error lines (no ``v``); an info record's ``v`` is
    ``extra={"v": ...}`` or derived from its level (DEBUG is v 4).
    """

    def __init__(self, stacktraces: bool = False) -> None:
        super().__init__()
        self.stacktraces = stacktraces

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": round(record.created, 6)}
        if record.levelno < logging.WARNING:
            v = getattr(record, "v", None)
            if not isinstance(v, int):
                v = 4 if record.levelno <= logging.DEBUG else max(logging.INFO - record.levelno, 0)
            line["v"] = v
        line["msg"] = record.getMessage()
        kv = getattr(record, "kv", None)
        if isinstance(kv, dict):
            for key, value in kv.items():
                if key not in line:
                    line[key] = value
        err = getattr(record, "err", None)
        if err is None and record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            err = f"{type(exc).__name__}: {exc}"
        if err is not None:
            line["err"] = str(err)
        if self.stacktraces and record.exc_info and record.exc_info[0] is not None:
            line["stacktrace"] = "".join(traceback.format_exception(*record.exc_info))
        elif record.levelno >= logging.WARNING and "err" not in line:
            line["err"] = line["msg"]
        return json.dumps(line, default=str, separators=(",", ":"))


def handler(verbosity: int = 0, stream: IO[str] | None = None) -> logging.Handler:
    """A stderr handler with the klog JSON formatter."""
    h = logging.StreamHandler(stream if stream is not None else sys.stderr)
    h.setFormatter(KlogJsonFormatter(stacktraces=verbosity >= STACKTRACE_VERBOSITY))
    return h


def attach(logger: logging.Logger, verbosity: int = 0, stream: IO[str] | None = None) -> None:
    """Make ``logger`` write klog JSON to stderr (replacing its handlers)."""
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.addHandler(handler(verbosity, stream))
    logger.propagate = False


def configure(verbosity: int = 0, stream: IO[str] | None = None) -> Log:
    """Set up the process's operational log and return it.

    Called once by the server launcher (never at import time); tests use
    ``Log`` directly with pytest's ``caplog``.
    """
    logger = logging.getLogger(LOGGER_NAME)
    attach(logger, verbosity, stream)
    logger.setLevel(level_of(verbosity))
    return Log(logger, verbosity)


class Log:
    """The small API the shells log through: ``info(msg, v=, **kv)`` and ``error``."""

    def __init__(self, logger: logging.Logger | None = None, verbosity: int = 0) -> None:
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.verbosity = verbosity

    def enabled(self, v: int) -> bool:
        return self.logger.isEnabledFor(level_of(v))

    def info(self, msg: str, v: int = 0, **kv: Any) -> None:
        level = level_of(v)
        if self.logger.isEnabledFor(level):
            self.logger.log(level, msg, extra={"v": v, "kv": kv})

    def error(self, msg: str, *, err: BaseException | str | None = None, **kv: Any) -> None:
        """An error line.  An exception's traceback is added at verbosity >= 4 only."""
        text = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else err
        exc_info = (
            (type(err), err, err.__traceback__)
            if isinstance(err, BaseException) and self.verbosity >= STACKTRACE_VERBOSITY
            else None
        )
        self.logger.error(msg, extra={"err": text, "kv": kv}, exc_info=exc_info)


class Throttle:
    """Rate-limits a repeated report: at most one per ``interval`` seconds.

    ``due()`` counts one occurrence and answers whether to report it now and how
    many were held back since the last report; ``settle()`` answers how many
    occurred since the last ``settle`` and resets (for a "recovered" line).  A disk
    that fills up fails every admission's audit write; one line per interval
    with a count says the same without flooding stderr (issue 11).
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._held = 0
        self._count = 0

    @property
    def pending(self) -> bool:
        return self._count > 0

    def due(self, n: int = 1) -> tuple[bool, int]:
        """Count ``n`` occurrences (one report covers them all)."""
        with self._lock:
            now = self.clock()
            self._count += n
            if self._last is not None and now - self._last < self.interval:
                self._held += n
                return False, 0
            held, self._held, self._last = self._held + n - 1, 0, now
            return True, held

    def settle(self) -> int:
        with self._lock:
            n, self._count, self._held, self._last = self._count, 0, 0, None
            return n


def stderr_line(text: str) -> None:
    """Write a human line to stderr (``--dev`` instructions), outside the JSON log."""
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()
