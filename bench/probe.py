"""Figures for availability probing (issue 8): latency and throughput of ``serve --probe``.

Run from the repository root (Debian: ``apt-get install -y hey``)::

    .venv/bin/python bench/probe.py                # about 2 min
    .venv/bin/python bench/probe.py --rounds 5 --duration 10

Everything runs on loopback: moto in server mode for the ECR token
(``AWS_ENDPOINT_URL_ECR``) and stand-in registries from tests/probe_support.py
(Python HTTPS servers; the eu-central-1 stand-in refuses moto's token with 401,
the us-west-2 one serves every manifest, the hung one accepts connections and
never answers).  Both servers run ``--workers 2 --threads 4`` with the seed
case's policy (cluster eu-central-1, ``--fallback-region us-west-2``).

1. **Warm cache vs static.**  Sequential keep-alive admissions of the seed-case
   pod, alternating blocks between ``serve`` (static rules only, with a policy
   declaring the eu-central-1 registry unavailable) and ``serve --probe``
   (probe answers cached).  Both move the image to us-west-2, so both build
   the same patch and audit record.  Expectation: the same latency within noise.
2. **Cold cache, hung registry.**  ``serve --probe`` with the eu-central-1
   registry hung; every admission names a new tag, so every one probes cold.
   Expectation: every answer inside the budget (1 s) plus the server's own
   few milliseconds, and the image moved to us-west-2 (``unreachable``).
3. **Throughput under hey.**  Alternating rounds of ``hey`` (16 keep-alive
   connections) against both servers; ratio of the median requests/s.

The machine is a shared 2-core box and hey, moto and the stand-ins run on it
too: the figures are noisy, compare them within one run only.  Figures only:
nothing is asserted, the exit status is 0.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import hey, line  # noqa: E402
from tests.probe_support import MOTO_TOKEN, StandInRegistry, aws_env, moto_server  # noqa: E402
from tests.serving import (  # noqa: E402
    ServerProcess,
    admission_review,
    apiserver_tls_context,
    ecr_webhook,
    free_port,
)
from webhook import certs  # noqa: E402

EU = "602401143452.dkr.ecr.eu-central-1.amazonaws.com"
US = "602401143452.dkr.ecr.us-west-2.amazonaws.com"
CNI = "amazon-k8s-cni"


def pod(tag: str) -> dict[str, Any]:
    container = {"name": "aws-node", "image": f"{EU}/{CNI}:{tag}"}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "aws-node-", "namespace": "kube-system"},
            "spec": {"containers": [container]}}  # fmt: skip


def start(tmp: Path, name: str, env: dict[str, str], extra: list[str]) -> tuple[ServerProcess, int]:
    port = free_port()
    argv = [*ecr_webhook(), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(free_port()), "--cert-file", str(tmp / "tls.crt"),
            "--key-file", str(tmp / "tls.key"), "--region", "eu-central-1",
            "--audit-log", str(tmp / f"{name}.audit"), "--workers", "2", "--threads", "4",
            *extra]  # fmt: skip
    proc = ServerProcess(argv, env=env, stderr=tmp / f"{name}.err")
    proc.wait_ready(port, apiserver_tls_context(tmp / "ca.crt"))
    return proc, port


class Client:
    """One keep-alive TLS connection, as the kube-apiserver keeps one."""

    def __init__(self, port: int, ca: Path) -> None:
        ctx = apiserver_tls_context(ca)
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        self.conn.host = "localhost"
        self.conn._create_connection = (  # type: ignore[attr-defined]
            lambda addr, *a, **kw: socket.create_connection(("127.0.0.1", port), *a, **kw)
        )

    def post(self, body: bytes) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        headers = {"Content-Type": "application/json"}
        self.conn.request("POST", "/mutate", body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        return time.perf_counter() - started, json.loads(data)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (f"  {name:<22} n={len(ms):4d}  p50 {pct(ms, .5):7.2f} ms  p90 {pct(ms, .9):7.2f} ms  "
            f"p99 {pct(ms, .99):7.2f} ms  max {max(ms):7.2f} ms")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=600, help="sequential admissions per server")
    p.add_argument("--cold", type=int, default=20, help="cold admissions against the hung registry")
    p.add_argument("--duration", type=int, default=10, help="seconds per hey round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--only", type=int, choices=(1, 2, 3), help="run only this part")
    args = p.parse_args(argv)
    run = {1, 2, 3} if args.only is None else {args.only}
    if shutil.which("hey") is None:
        print("bench/probe.py needs hey: apt-get install -y hey", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="ecr-webhook-probe-bench-"))
    certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp)
    eu = StandInRegistry(tmp / "eu", basic="bm9wZQ==", default=200)
    us = StandInRegistry(tmp / "us", basic=MOTO_TOKEN, default=200)
    hung = StandInRegistry(tmp / "hung", hang=True)
    cas = tmp / "registry-cas.pem"
    cas.write_text("".join(Path(r.ca_file).read_text() for r in (eu, us, hung)))
    procs: list[ServerProcess] = []
    try:
        with moto_server() as moto:
            env = aws_env(moto)
            probe_flags = ["--probe", "--fallback-region", "us-west-2", "--registry-ca", str(cas),
                           "--registry-endpoint", f"{US}={us.url}"]  # fmt: skip
            # The static server reaches the same answer from a declared outage, so
            # both servers build the same patch, warning and audit record.
            policy = tmp / "static-policy.yaml"
            policy.write_text(f"unavailable: [{EU}]\n")
            static, sport = start(tmp, "static", env, ["--fallback-region", "us-west-2",
                                                       "--policy", str(policy)])
            probing, pport = start(tmp, "probe", env,
                                   [*probe_flags, "--registry-endpoint", f"{EU}={eu.url}"])
            procs += [static, probing]
            body = json.dumps(admission_review(pod("v1.19.4"))).encode()

            if 1 in run:
                latency(args, tmp, sport, pport, body)
            if 2 in run:
                cold_cache(args, tmp, env, probe_flags, hung)
            if 3 in run:
                throughput(args, tmp, sport, pport, body)
            print(f"  registry HEADs during the run: eu {len(eu.heads)}, us {len(us.heads)}, "
                  f"hung {len(hung.heads)}")  # fmt: skip
    finally:
        for proc in procs:
            proc.stop()
        for r in (eu, us, hung):
            r.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def latency(args: argparse.Namespace, tmp: Path, sport: int, pport: int, body: bytes) -> None:
    print(f"1. warm cache vs static: {args.requests} sequential keep-alive admissions "
          "each, alternating blocks of 50, --workers 2 --threads 4")  # fmt: skip
    clients = {"static": Client(sport, tmp / "ca.crt"), "probe": Client(pport, tmp / "ca.crt")}
    times: dict[str, list[float]] = {"static": [], "probe": []}
    for _ in range(20):  # warm both workers' caches and connections
        for c in clients.values():
            c.post(body)
    for _ in range(max(1, args.requests // 50)):
        for name, c in clients.items():
            for _ in range(50):
                times[name].append(c.post(body)[0])
    print(summary("serve (static)", times["static"]))
    print(summary("serve --probe (warm)", times["probe"]))
    for name, c in clients.items():
        answer = c.post(body)[1]["response"].get("warnings", [""])[0]
        print(f"  {name + ' answer:':<14} {answer}")
    d = statistics.median(times["probe"]) - statistics.median(times["static"])
    print(f"  median difference: {d * 1000:+.2f} ms")


def cold_cache(args: argparse.Namespace, tmp: Path, env: dict[str, str], probe_flags: list[str],
               hung: StandInRegistry) -> None:  # fmt: skip
    print(f"2. cold cache, eu-central-1 registry hung: {args.cold} admissions, "
          "each with a new tag (budget 1 s)")  # fmt: skip
    cold, cport = start(tmp, "cold", env, [*probe_flags, "--registry-endpoint", f"{EU}={hung.url}"])
    try:
        cc = Client(cport, tmp / "ca.crt")
        cold_times, moved = [], 0
        for i in range(args.cold):
            seconds, doc = cc.post(json.dumps(admission_review(pod(f"cold-{i}"))).encode())
            cold_times.append(seconds)
            moved += "patch" in doc["response"]
    finally:
        cold.stop()
    print(summary("serve --probe (cold)", cold_times))
    print(f"  {moved} of {args.cold} moved to us-west-2; "
          f"{sum(t > 1.0 for t in cold_times)} answers over the 1 s budget")  # fmt: skip


def throughput(args: argparse.Namespace, tmp: Path, sport: int, pport: int, body: bytes) -> None:
    print(f"3. throughput: {args.rounds} alternating hey rounds of {args.duration} s, "
          f"{args.connections} keep-alive TLS connections")  # fmt: skip
    review = tmp / "review.json"
    review.write_bytes(body)
    hey(sport, review, 2, args.connections)
    hey(pport, review, 2, args.connections)
    statics, probes = [], []
    for i in range(args.rounds):
        statics.append(hey(sport, review, args.duration, args.connections))
        probes.append(hey(pport, review, args.duration, args.connections))
        print(f" round {i + 1}")
        print(line("static", statics[-1]))
        print(line("probe", probes[-1]))
    s_rps = statistics.median(r.rps for r in statics)
    p_rps = statistics.median(r.rps for r in probes)
    print(f" median: static {s_rps:.1f} req/s, probe (warm) {p_rps:.1f} req/s, "
          f"ratio {p_rps / s_rps if s_rps else 0:.2f}; probe non-200/errors "
          f"{sum(r.non_200 + r.failed for r in probes)}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
