"""What the admission path's parts cost in the server: throughput with each part removed.

Run from the repository root (Debian: ``apt-get install -y hey``)::

    .venv/bin/python bench/ablate.py [--processes 2] [--rounds 3] [--duration 6]

Serves, with bench/load.py's settings (``--workers 2 --threads 4``, TLS,
16 keep-alive connections of ``hey``), these apps through ``webhook.server.run``:

* ``floor``: bench/load.py's canned answer (Flask, stdlib JSON);
* ``webhook``: ``create_app`` as ``serve`` builds it, audit to a file;
* ``no-audit``: the same, with an audit sink that drops every record;
* ``no-metrics``: the same, with metrics that record nothing;
* ``neither``: both removed: what is left is decoding, deciding and encoding.

The servers run on CPU 0 and ``hey`` on CPU 1 (``--no-pin`` to share both),
so the client's work does not land on the servers' core; ``--processes``
processes of each kind are measured in alternating rounds, because a
process's speed is sticky (bench/modes.py).  Prints each variant's median
requests per second, its ratio to the floor, and its server CPU time per
answer.  Not a test: the apps without audit or metrics exist only here, to
show how much of the gap to the floor each part is.  Figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tests.loadgen import cpu_seconds, hey  # noqa: E402
from tests.serving import (  # noqa: E402
    REGION,
    ServerProcess,
    admission_review,
    apiserver_tls_context,
    aws_node_pod,
    free_port,
)
from webhook import certs  # noqa: E402
from webhook.config import ServeConfig  # noqa: E402

VARIANTS = ("floor", "webhook", "no-audit", "no-metrics", "neither")


class _DropAudit:
    """An audit sink that writes nothing."""

    def write(self, record: object, *, defer: bool = False) -> None:
        return None

    def flush(self, wait: bool = False) -> None:
        return None

    def pending(self) -> bool:
        return False


def _null_metrics() -> Any:
    from webhook.metrics import Metrics

    class Null:
        def inc(self, amount: float = 1) -> None: ...
        def dec(self, amount: float = 1) -> None: ...
        def observe(self, value: float) -> None: ...

    class NullMetrics(Metrics):
        """Registers the metrics (the app reads some) but records nothing per request."""

        def __init__(self) -> None:
            super().__init__()
            self.in_flight = Null()  # type: ignore[assignment]

        def observe(self, code: int, result: str, seconds: float) -> None: ...
        def rewritten(self, rewrites: Any) -> None: ...

    return NullMetrics()


def app_factory(variant: str, tmp: Path) -> Any:
    def make(config: ServeConfig) -> Any:
        if variant == "floor":
            from load import floor_app

            return floor_app(config)
        from webhook import logs
        from webhook.app import create_app
        from webhook.auditlog import AuditLog

        kw: dict[str, Any] = {"log": logs.Log(verbosity=0)}
        dropped = variant in ("no-audit", "neither")
        kw["audit"] = _DropAudit() if dropped else AuditLog(str(tmp / "audit.log"))
        if variant in ("no-metrics", "neither"):
            kw["metrics"] = _null_metrics()
        else:  # as serve builds them
            from webhook.metrics import FLUSH_SECONDS, Metrics

            kw["metrics"] = Metrics(flush_seconds=FLUSH_SECONDS)
        return create_app(config, **kw)

    return make


def serve(args: argparse.Namespace) -> int:
    from webhook.server import run

    config = ServeConfig(host="127.0.0.1", port=args.port, metrics_port=args.metrics_port,
                         cert_file=args.cert, key_file=args.key, region=REGION,
                         workers=2, threads=4)  # fmt: skip
    return run(config, app_factory=app_factory(args.serve, Path(args.tmp)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=6)
    p.add_argument("--no-pin", action="store_true", help="servers and hey share all CPUs")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    # internal: serve one variant
    p.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--metrics-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cert", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args)
    if shutil.which("hey") is None:
        print("bench/ablate.py needs hey: apt-get install -y hey", file=sys.stderr)
        return 2
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset")
    server_cpus, client_cpus = ("0", "1") if pin else (None, None)
    tmp = Path(tempfile.mkdtemp(prefix="ecr-webhook-ablate-"))
    certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp)
    body = tmp / "review.json"
    body.write_text(json.dumps(admission_review(aws_node_pod())))
    print(f"{len(args.variants)} variants x {args.processes} processes, {args.rounds} rounds of "
          f"{args.duration} s, 16 keep-alive TLS connections, --workers 2 --threads 4, "
          + ("servers on CPU 0, hey on CPU 1" if pin else "unpinned"))  # fmt: skip
    servers: list[tuple[str, ServerProcess, int]] = []
    try:
        for n in range(args.processes):
            for variant in args.variants:
                d = tmp / f"{variant}-{n}"
                d.mkdir()
                port = free_port()
                argv = [*(["taskset", "-c", server_cpus] if server_cpus else []),
                        sys.executable, __file__, "--serve", variant, "--port", str(port),
                        "--metrics-port", str(free_port()), "--cert", str(tmp / "tls.crt"),
                        "--key", str(tmp / "tls.key"), "--tmp", str(d)]  # fmt: skip
                proc = ServerProcess(argv, stderr=d / "stderr")
                proc.wait_ready(port, apiserver_tls_context(tmp / "ca.crt"))
                servers.append((variant, proc, port))
                hey(port, body, 2, 16, cpus=client_cpus)  # warm up
        rps: dict[str, list[float]] = {v: [] for v in args.variants}
        cpu: dict[str, list[float]] = {v: [] for v in args.variants}
        for _ in range(args.rounds):
            for variant, proc, port in servers:
                before = cpu_seconds(proc.proc.pid)
                r = hey(port, body, args.duration, 16, cpus=client_cpus)
                used = cpu_seconds(proc.proc.pid) - before
                rps[variant].append(r.rps)
                cpu[variant].append(used / max(r.ok, 1) * 1e6)
                if r.non_200 or r.failed:
                    print(f"  {variant}: non-200 {r.non_200}, errors {r.failed}")
        floor = statistics.median(rps["floor"]) if "floor" in rps else None
        for variant in args.variants:
            m = statistics.median(rps[variant])
            ratio = f"{m / floor:5.2f}" if floor else "  -  "
            print(f"  {variant:<11} {m:7.0f} req/s   ratio to floor {ratio}   server CPU "
                  f"{statistics.median(cpu[variant]):5.0f} us/answer   (rounds: "
                  + " ".join(f"{x:.0f}" for x in rps[variant]) + ")")  # fmt: skip
    finally:
        for _, proc, _ in servers:
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
