"""Slow clients, before and after (issue 11): N connections stall; is /mutate answered?

Run from the repository root; ``--root`` serves another checkout (say the code
before the fix: ``git archive db20f87 | tar -x -C /tmp/old``)::

    .venv/bin/python bench/stall.py --stalled 64
    .venv/bin/python bench/stall.py --root /tmp/old --stalled 16

Each stalling client completes the TLS handshake (given up after 3 s), sends
headers with ``Content-Length: 1000`` and 6 bytes of body, and stops.  Then a
valid admission and ``/healthz`` are sent on fresh connections, with a 30 s
client timeout, against ``serve --workers 2 --threads 8``.  Figures only.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.serving import (  # noqa: E402
    REGION,
    ServerProcess,
    admission_review,
    apiserver_tls_context,
    free_port,
    get,
    post_review,
)
from webhook import certs  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(ROOT), help="checkout to serve (default: this one)")
    p.add_argument("--stalled", type=int, default=64)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ecr-webhook-stall-"))
    certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp)
    port = free_port()
    argv = [sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(free_port()), "--cert-file", str(tmp / "tls.crt"),
            "--key-file", str(tmp / "tls.key"), "--region", REGION,
            "--audit-log", str(tmp / "audit.log"), "--workers", "2", "--threads", "8"]  # fmt: skip
    proc = ServerProcess(argv, env=dict(os.environ, PYTHONPATH=args.root), cwd=args.root,
                         stderr=tmp / "stderr.log")  # fmt: skip
    ctx = apiserver_tls_context(tmp / "ca.crt")
    stalled: list[socket.socket] = []
    try:
        proc.wait_ready(port, ctx)
        unanswered = 0
        for _ in range(args.stalled):
            raw = socket.create_connection(("127.0.0.1", port), timeout=3)
            try:
                s = ctx.wrap_socket(raw, server_hostname="localhost")
            except OSError:
                unanswered += 1
                stalled.append(raw)
                continue
            s.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b'Content-Length: 1000\r\n\r\n{"api"')  # fmt: skip
            stalled.append(s)
        print(f"{args.root}: {unanswered} of the {args.stalled} stalling clients' own "
              "handshakes went unanswered for 3 s")  # fmt: skip
        for path in ("/mutate", "/healthz"):
            t = time.monotonic()
            try:
                if path == "/mutate":
                    status, _ = post_review(port, ctx, admission_review(), timeout=30)
                else:
                    status, _ = get(port, path, ctx, timeout=30)
                print(f"{args.root}: {args.stalled} stalled: {path} answered {status} "
                      f"after {time.monotonic() - t:.2f} s")  # fmt: skip
            except OSError as exc:
                print(f"{args.root}: {args.stalled} stalled: {path} NOT answered after "
                      f"{time.monotonic() - t:.1f} s ({type(exc).__name__})")  # fmt: skip
    finally:
        for s in stalled:
            s.close()
        proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
