"""Figures for issue 11's full audit disk: ``serve`` keeps answering, counts every
lost record, reports on stderr at a bounded rate, and leaves no torn record.

Run from the repository root as root (it mounts a 64 KiB tmpfs)::

    .venv/bin/python bench/audit_disk_full.py [N]

``serve`` runs with its default workers and threads, the audit file on the
tmpfs; the disk is filled, N admissions (default 2000) are sent from 8 client
threads, the disk is freed and 20 more are sent.  Prints what was answered,
what the metrics counted, the stderr report lines and whether every line of
the audit file is a whole record.  Figures only: asserts nothing about time.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.serving import (
    REGION,
    ServerProcess,
    admission_review,
    apiserver_tls_context,
    ecr_webhook,
    free_port,
    post_review,
)
from tests.test_server import metrics, sample

CLIENTS = 8


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    tmp = Path(tempfile.mkdtemp(prefix="ecr-webhook-diskfull-"))
    mnt = tmp / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    subprocess.run([*ecr_webhook(), "certs", "generate", "--out-dir", str(tmp / "tls"),
                    "--dns", "localhost"], check=True, capture_output=True)  # fmt: skip
    port, mport = free_port(), free_port()
    proc = ServerProcess([*ecr_webhook(), "serve", "--host", "127.0.0.1", "--port", str(port),
                          "--metrics-port", str(mport), "--cert-file", str(tmp / "tls/tls.crt"),
                          "--key-file", str(tmp / "tls/tls.key"), "--region", REGION,
                          "--audit-log", str(mnt / "audit.log")],
                         stderr=tmp / "stderr.log")  # fmt: skip
    ctx = apiserver_tls_context(tmp / "tls" / "ca.crt")
    try:
        proc.wait_ready(port, ctx)
        fill(mnt / "filler")
        answers: dict[object, int] = {}
        lock = threading.Lock()

        def client() -> None:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
            conn.host = "localhost"
            conn._create_connection = (  # type: ignore[attr-defined]
                lambda a, *x, **kw: socket.create_connection(("127.0.0.1", port), *x, **kw)
            )
            for _ in range(n // CLIENTS):
                try:
                    status: object = post_review(port, ctx, admission_review(), conn=conn)[0]
                except Exception as exc:  # counted, not raised: this is a measurement
                    status = type(exc).__name__
                with lock:
                    answers[status] = answers.get(status, 0) + 1

        started = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        scrape = metrics(mport)
        lines = (tmp / "stderr.log").read_text().splitlines()
        reports = [ln for ln in lines if "audit record not written" in ln]
        print(f"disk full: {sum(answers.values())} admissions in {elapsed:.1f}s, answers {answers}")
        lost = sample(scrape, "ecr_webhook_audit_write_errors_total", errno="ENOSPC")
        audit_errors = sample(scrape, "ecr_webhook_errors_total", stage="audit")
        print("lost (ENOSPC):", lost, "errors audit:", audit_errors)
        print("stderr report lines:", len(reports))
        for line in reports:
            print(" ", line)
        (mnt / "filler").unlink()
        for _ in range(20):
            post_review(port, ctx, admission_review())
        for line in (tmp / "stderr.log").read_text().splitlines():
            if "written again" in line:
                print(" ", line)
        records = [json.loads(line) for line in (mnt / "audit.log").read_text().splitlines()]
        print("records in file:", len(records), "(every line a whole record)")
    finally:
        print("serve exit status:", proc.stop())
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
