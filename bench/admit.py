"""In-process cost of the admission path's parts, on bench/load.py's aws-node review.

Run from the repository root::

    .venv/bin/python bench/admit.py

Each line is the best of 7 loops of 20,000 calls (wall clock per call, one
thread, no server): the envelope check, the planner, the patch, the warnings,
the answer, all of ``review.admit``, the audit record and the JSON decode.
Then one whole WSGI call of the app ``serve`` builds (metrics as ``serve``
gathers them, audit records to a file) against bench/load.py's floor app, on
the same request: the in-process part of the throughput ratio, without the
noise of a loaded machine (in the server everything costs three to four
times more: README, "Throughput").  Figures only, nothing asserted.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.serving import admission_review, aws_node_pod
from webhook.core import jsonc, review
from webhook.core.audit import build_record
from webhook.core.patch import build_patch_checked
from webhook.core.plan import plan_pod
from webhook.reload import PolicyHolder


def best(name: str, fn: Callable[[], object], n: int = 20_000) -> None:
    times = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    print(f"{name:24s} {min(times):7.2f} us")


def main() -> int:
    raw = json.dumps(admission_review(aws_node_pod())).encode()
    ctx = PolicyHolder(None, "ap-southeast-4", {}).context()
    body = jsonc.loads(raw)
    req = body["request"]
    pod = req["object"]
    plan = plan_pod(pod["metadata"], pod["spec"], "kube-system", ctx)
    ops, _ = build_patch_checked(pod, plan)
    out = review.admit(body, ctx)
    best("parse_review", lambda: review.parse_review(body))
    best("plan_pod", lambda: plan_pod(pod["metadata"], pod["spec"], "kube-system", ctx))
    best("build_patch_checked", lambda: build_patch_checked(pod, plan))
    best("warnings", lambda: tuple(d.short_message(120) for d in plan.rewrites + plan.warnings))
    best("response", lambda: review.response("admission.k8s.io/v1", "u", tuple(ops), out.warnings))
    best("review.admit", lambda: review.admit(body, ctx))
    best("build_record", lambda: build_record(out, 1.0, 2.0))
    best("jsonc.loads", lambda: jsonc.loads(raw))
    wsgi_calls(raw)
    return 0


def wsgi_calls(raw: bytes) -> None:
    """The floor's and the webhook's whole WSGI call on the same request."""
    from load import floor_app

    from webhook.app import create_app
    from webhook.auditlog import AuditLog
    from webhook.config import ServeConfig
    from webhook.metrics import FLUSH_SECONDS, Metrics

    base = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/mutate", "SCRIPT_NAME": "",
        "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8443",
        "SERVER_PROTOCOL": "HTTP/1.1", "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(raw)), "HTTP_HOST": "127.0.0.1:8443",
        "wsgi.url_scheme": "https", "wsgi.version": (1, 0), "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        config = ServeConfig(region="ap-southeast-4", audit_log=f"{tmp}/audit.log")
        apps = {
            "WSGI call: floor": floor_app(config),
            "WSGI call: webhook": create_app(
                config, metrics=Metrics(flush_seconds=FLUSH_SECONDS),
                audit=AuditLog(f"{tmp}/audit.log", max_bytes=0)),
        }  # fmt: skip
        for name, app in apps.items():

            def call(app: object = app) -> None:
                environ = dict(base, **{"wsgi.input": io.BytesIO(raw)})
                for _ in app(environ, lambda status, headers, exc_info=None: None):  # type: ignore[operator]
                    pass

            best(name, call, n=5_000)


if __name__ == "__main__":
    sys.exit(main())
