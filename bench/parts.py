"""Thread CPU time of each part of a request, measured inside a running server under load.

Run from the repository root (Debian: ``apt-get install -y hey``)::

    .venv/bin/python bench/parts.py [--duration 10]

Serves bench/load.py's floor app and ``serve`` (``--workers 2 --threads 4``,
audit to a file), each in a copy whose parts are wrapped to add up
``time.thread_time_ns()`` around them, and drives each with ``hey`` (16
keep-alive TLS connections, bench/load.py's aws-node review).  Each worker
prints, at exit, the thread CPU time per request of each part: the whole WSGI
call, and for the webhook ``decode``, ``ProbingAdmit`` (``review.admit``),
``build_record``, the audit write (and its batches: ``write(2)`` calls per
record), metrics and JSON encoding; for the floor its ``get_data`` and
``json.loads``.  The wrappers cost about a microsecond each, and nested
parts are also inside their parents.

Why in the server: every part costs three to four times more there than in a
loop (bench/admit.py), because the TLS, HTTP and thread hand-offs around each
request leave caches cold.  Figures only, nothing asserted.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# ------------------------------------------------------------------ inside a server

_TOTALS: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])  # ns, calls
_WHOLE = "WSGI call (Flask.wsgi_app)"


def _wrap(owner: Any, name: str, label: str) -> None:
    inner = getattr(owner, name)
    clock = time.thread_time_ns

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            entry = _TOTALS[label]
            entry[0] += clock() - started
            entry[1] += 1

    setattr(owner, name, timed)


def _report(out_dir: str, kind: str) -> None:
    requests = _TOTALS[_WHOLE][1]
    if not requests:
        return  # the master, or a worker that served nothing
    lines = [f"{kind} worker {os.getpid()}: {requests} requests"]
    for label, (ns, calls) in sorted(_TOTALS.items()):
        lines.append(f"  {label:34s} {ns / requests / 1000:7.1f} us/request  ({calls} calls)")
    Path(out_dir, f"{kind}-{os.getpid()}.txt").write_text("\n".join(lines) + "\n")


def instrumented(kind: str, out_dir: str, argv: list[str]) -> int:
    """Serve ``kind`` (floor or webhook) with its parts wrapped; each worker reports at exit."""
    import flask

    _wrap(flask.Flask, "wsgi_app", _WHOLE)
    if kind == "floor":
        import load

        _wrap(json, "loads", "floor: json.loads")
        _wrap(flask.Request, "get_data", "floor: request.get_data")
        atexit.register(_report, out_dir, kind)
        return load.main(argv)
    from webhook import app, auditlog, metrics, prober
    from webhook.core import jsonc

    _wrap(prober.ProbingAdmit, "__call__", "ProbingAdmit (review.admit)")
    _wrap(app, "decode", "decode")
    _wrap(jsonc, "loads", "  jsonc.loads (in decode)")
    _wrap(app, "build_record", "build_record")
    _wrap(auditlog.AuditLog, "write", "AuditLog.write")
    _wrap(auditlog, "encode", "  audit encode (in write)")
    _wrap(auditlog.AuditLog, "_write_batch", "  audit batch write(2)")
    _wrap(jsonc, "dumps", "jsonc.dumps (answer, record, patch)")
    for method in ("begin", "answered", "end"):
        _wrap(metrics.Metrics, method, f"Metrics.{method}")
    atexit.register(_report, out_dir, kind)  # gunicorn workers leave through sys.exit
    from webhook.cli import main as cli

    sys.argv = ["ecr-webhook", *argv]
    cli()
    return 0


# ------------------------------------------------------------------ the driver


def main() -> int:
    if len(sys.argv) > 3 and sys.argv[1] == "--instrumented":
        return instrumented(sys.argv[2], sys.argv[3], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds of hey per server")
    args = p.parse_args()
    if shutil.which("hey") is None:
        print("bench/parts.py needs hey: apt-get install -y hey", file=sys.stderr)
        return 2

    from tests.loadgen import cpu_seconds, hey
    from tests.serving import (
        REGION,
        ServerProcess,
        admission_review,
        apiserver_tls_context,
        aws_node_pod,
        free_port,
    )
    from webhook import certs

    tmp = Path(tempfile.mkdtemp(prefix="ecr-webhook-parts-"))
    reports = tmp / "reports"
    reports.mkdir()
    try:
        certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp)
        body = tmp / "review.json"
        body.write_text(json.dumps(admission_review(aws_node_pod())))
        me = [sys.executable, __file__, "--instrumented"]
        for kind in ("floor", "webhook"):
            port = free_port()
            if kind == "floor":
                argv = [*me, kind, str(reports), "--floor-server", "--port", str(port),
                        "--metrics-port", str(free_port()), "--cert", str(tmp / "tls.crt"),
                        "--key", str(tmp / "tls.key"),
                        "--workers", "2", "--threads", "4"]  # fmt: skip
            else:
                argv = [*me, kind, str(reports), "serve", "--host", "127.0.0.1", "--port",
                        str(port), "--metrics-port", str(free_port()), "--cert-file",
                        str(tmp / "tls.crt"), "--key-file", str(tmp / "tls.key"), "--region",
                        REGION, "--audit-log", str(tmp / "audit.log"), "--workers", "2",
                        "--threads", "4"]  # fmt: skip
            proc = ServerProcess(argv, stderr=tmp / f"{kind}.err")
            try:
                proc.wait_ready(port, apiserver_tls_context(tmp / "ca.crt"))
                hey(port, body, 2, 16)  # warm up
                before = cpu_seconds(proc.proc.pid)
                result = hey(port, body, args.duration, 16)
                used = cpu_seconds(proc.proc.pid) - before
            finally:
                proc.stop()
            print(f"{kind}: {result.rps:.0f} req/s, server CPU {used / max(result.ok, 1) * 1e6:.0f}"
                  f" us per answer (master + workers, instrumented)")  # fmt: skip
            time.sleep(0.5)  # the workers' reports are written at their exit
            for report in sorted(reports.glob(f"{kind}-*.txt")):
                print(report.read_text(), end="")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
