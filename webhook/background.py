"""A periodic task in a daemon thread, started on first use.  A shell module.

The metrics (``Metrics``, flushed every second) and the audit records a busy
worker deferred (``webhook.app``, written every 50 ms) each need one: a thread
that calls a function every few milliseconds or seconds, started in the
process that uses it (so after gunicorn forked the worker, never in the
master), and a last call at exit, so a graceful stop loses nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
from collections.abc import Callable


class Periodic:
    """Call ``task`` every ``seconds`` in a daemon thread named ``name``.

    ``ensure()`` starts the thread the first time it is called (cheap after
    that: one attribute test, so it can sit on the admission path) and
    registers ``at_exit`` (default: ``task``) with ``atexit``.  It never raises:
    a thread that cannot be had (a pids limit, interpreter shutdown) leaves it
    unstarted, ``ensure()`` returns False, and the next call tries again.  An
    exception from ``task`` is swallowed: the thread must go on, or nothing
    would be written again.
    """

    def __init__(self, name: str, seconds: float, task: Callable[[], object],
                 at_exit: Callable[[], object] | None = None) -> None:  # fmt: skip
        self.name = name
        self.seconds = seconds
        self.task = task
        self.at_exit = at_exit or task
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure(self) -> bool:
        """Whether the thread runs (starting it if it does not yet)."""
        if self._thread is not None:
            return True
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # "can't start new thread", or at shutdown
                    return False
                self._thread = thread
                atexit.register(self.at_exit)
        return True

    def _loop(self) -> None:
        while True:
            time.sleep(self.seconds)
            with contextlib.suppress(Exception):
                self.task()
