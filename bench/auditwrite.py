"""CPU per audit record: ``AuditLog.write`` from one thread and from four (bench, no asserts).

Run from the repository root::

    .venv/bin/python bench/auditwrite.py [OLD_CHECKOUT]

Writes 20,000 records of about 1.3 KB (the size of an aws-node admission's
record) to a file in a temporary directory, from one thread and then from four
threads at once (the server's ``--threads``), and prints the process CPU time
per record.  With ``OLD_CHECKOUT`` (a directory holding another version's
``webhook/auditlog.py``, e.g. from ``git worktree add``), that version is
measured alongside.  ``combine-only`` is this version with the path checked
before every record (``recheck_seconds=0``), to separate the two changes.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webhook.auditlog import AuditLog

RECORD = {"kind": "EcrWebhookAudit", "pad": "y" * 1200}
N = 20_000


def measure(name: str, make: Callable[[str], Any]) -> None:
    log = make(os.path.join(tempfile.mkdtemp(), "audit.log"))
    t = time.process_time()
    for _ in range(N):
        log.write(RECORD)
    one = (time.process_time() - t) / N * 1e6

    def run() -> None:
        for _ in range(N // 4):
            log.write(RECORD)

    threads = [threading.Thread(target=run) for _ in range(4)]
    t = time.process_time()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    four = (time.process_time() - t) / N * 1e6
    print(f"{name:14s} 1 thread {one:6.1f} us/record   4 threads {four:6.1f} us/record")


def main() -> int:
    makers: list[tuple[str, Callable[[str], Any]]] = []
    if len(sys.argv) > 1:
        spec = importlib.util.spec_from_file_location(
            "old_auditlog", os.path.join(sys.argv[1], "webhook", "auditlog.py"))
        assert spec is not None and spec.loader is not None  # nosec B101  # a path given by hand
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        makers.append(("old", old.AuditLog))
    makers += [("combine-only", functools.partial(AuditLog, recheck_seconds=0)),
               ("this version", AuditLog)]  # fmt: skip
    for _ in range(2):
        for name, make in makers:
            measure(name, make)
    return 0


if __name__ == "__main__":
    sys.exit(main())
