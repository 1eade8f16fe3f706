"""Benchmark: ``ecr-webhook audit`` over 1,000,000 audit records.

Target (issue 9): at least 200,000 records/s on one core with a filter.  The
records are built by the project's own ``build_record`` from real ``admit``
outcomes (aws-node pods, workloads in 20 namespaces, skipped and failed-open
admissions) and written once, as ``webhook.auditlog`` writes them, to a
temporary file.  Then each query runs in this process (one core) with its
output going to /dev/null, and the figures are printed: wall and CPU time of
this process, and records per second by each.  On a machine shared with other
work the wall time includes waiting for a core, so records per CPU second is
the figure for "one core".  Asserts nothing (tests never assert on time).

Run: ``.venv/bin/python bench/audit.py [N] [--keep FILE]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from webhook import auditread
from webhook.auditlog import encode
from webhook.core import auditquery
from webhook.core.audit import build_record
from webhook.core.plan import PlanContext
from webhook.core.policy import Policy
from webhook.core.review import Outcome, admit, fail_open

REGION = "ap-southeast-4"
BAD = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com"
GOOD = "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com"
NAMESPACES = ["kube-system"] + [f"team-{i:02d}" for i in range(19)]
START = 1_764_547_200.0  # 2025-12-01T00:00:00Z


def review(namespace: str, images: list[str], owner: str | None, n: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"generateName": f"app-{n}-", "namespace": namespace}
    if owner:
        meta["ownerReferences"] = [{"kind": "ReplicaSet", "name": owner, "controller": True}]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "operation": "CREATE",
            "namespace": namespace,
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": {
                "metadata": meta,
                "spec": {
                    "containers": [{"name": f"c{i}", "image": im} for i, im in enumerate(images)]
                },
            },
        },
    }


def outcomes(rng: random.Random) -> list[Outcome]:
    """A pool of real outcomes: mostly unchanged, some patched, a few skipped and errors."""
    ctx = PlanContext.build(Policy(), REGION)
    pool = []
    repos = ["amazon-k8s-cni:v1.19.4", "eks/pause:3.10", "eks/coredns:v1.11.4-eksbuild.2",
             "amazon/aws-network-policy-agent:v1.2.0"]  # fmt: skip
    for n in range(400):
        ns = NAMESPACES[n % len(NAMESPACES)]
        kind = n % 20
        if kind < 12:  # workloads that never touch EKS images
            images = [f"{GOOD.replace('491585149902', '111122223333')}/app/{ns}:v{n}", "nginx:1"]
        elif kind < 17:
            images = [f"{BAD}/{repos[n % 4]}", f"{BAD}/{repos[(n + 1) % 4]}"]
        elif kind < 19:
            images = [f"{GOOD}/{repos[n % 4]}"]
        else:
            images = [f"{BAD}/{repos[n % 4]}"]
        body = review(ns, images, f"app-{n}-7d9f" if n % 3 else None, n)
        out = fail_open(body, RuntimeError("probe timed out")) if n % 97 == 0 else admit(body, ctx)
        pool.append(out)
    rng.shuffle(pool)
    return pool


def generate(path: Path, n: int) -> None:
    rng = random.Random(9)
    pool = outcomes(rng)
    t = START
    with open(path, "wb") as f:
        buf = []
        for i in range(n):
            o = pool[i % len(pool)]
            req = dict(o.request)
            req["uid"] = str(uuid.UUID(int=rng.getrandbits(128)))
            t += rng.random() * 0.05
            buf.append(encode(build_record(dataclasses.replace(o, request=req), t, t + 0.0012)))
            if len(buf) == 10_000:
                f.writelines(buf)
                buf.clear()
        f.writelines(buf)


def measure(label: str, path: Path, n: int, **kw: Any) -> None:
    filters = auditquery.build_filters(now=time.time(), **kw.pop("filters", {}))
    query = auditread.Query((str(path),), filters, **kw)
    with open(os.devnull, "wb") as out, open(os.devnull, "w") as err:
        wall, cpu = time.perf_counter(), time.process_time()
        code = auditread.run(query, out, err)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{label:<38} {wall:6.2f} s wall {n / wall:>9,.0f}/s | {cpu:6.2f} s cpu "
          f"{n / cpu:>9,.0f}/s  (exit {code})", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=1_000_000)
    ap.add_argument("--keep", help="write the records here and keep them")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.keep or Path(tmp.name) / "audit.jsonl")
    t0 = time.perf_counter()
    if not path.exists():
        generate(path, args.n)
    size = path.stat().st_size
    print(f"{args.n:,} records, {size / 1e6:,.0f} MB, written in {time.perf_counter() - t0:.1f} s"
          f" ({path})", flush=True)  # fmt: skip
    n = args.n
    measure("no filter, --output json", path, n, output="json")
    measure("no filter, table", path, n)
    measure("--namespace team-07 (5 %), table", path, n, filters={"namespaces": ["team-07"]})
    measure("--namespace team-07, --output json", path, n, output="json",
            filters={"namespaces": ["team-07"]})  # fmt: skip
    measure("--decision error (1 %), table", path, n, filters={"decisions": ["error"]})
    measure("--since/--until one hour, table", path, n,
            filters={"since": "2025-12-01T03:00:00Z", "until": "2025-12-01T04:00:00Z"})  # fmt: skip
    measure("--summary", path, n, summary=True)
    measure("--summary --namespace kube-system", path, n, summary=True,
            filters={"namespaces": ["kube-system"]})  # fmt: skip


if __name__ == "__main__":
    main()
