"""In-process cost of the admission path's parts, on bench/load.py's aws-node review.

Run from the repository root::

    .venv/bin/python bench/admit.py

Each line is the best of 7 loops of 20,000 calls (wall clock per call, one
thread, no server): the envelope check, the planner, the patch, the warnings,
the answer, all of ``review.admit``, the audit record and the JSON decode.
Figures only, nothing asserted.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
