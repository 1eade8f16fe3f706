"""Identical ``serve`` processes, measured in turn: is the speed of a server process sticky?

Run from the repository root (Debian: ``apt-get install -y hey``)::

    .venv/bin/python bench/modes.py [--servers 4] [--rounds 4] [--duration 5]

Starts ``--servers`` identical ``ecr-webhook serve`` processes (the settings
of bench/load.py's throughput part: ``--workers 2 --threads 4``, audit to a
file) and, round after round, runs ``hey`` (16 keep-alive TLS connections)
against each in turn, printing requests per second and the server's CPU time
per answer (master + workers, from /proc).  On the 2-core development machine
some processes stayed fast and others slow for their whole life, with the same
code and the same load; that is why one pair of processes (one floor, one
webhook, as bench/load.py starts) gives ratios anywhere from 0.5 to 1.5.
Figures only, nothing asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import start_webhook  # noqa: E402

from tests.loadgen import cpu_seconds, hey  # noqa: E402
from tests.serving import admission_review, aws_node_pod  # noqa: E402
from webhook import certs  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=int, default=5)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ecr-webhook-modes-"))
    certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), tmp)
    body = tmp / "review.json"
    body.write_text(json.dumps(admission_review(aws_node_pod())))
    servers = []
    try:
        for i in range(args.servers):
            d = tmp / f"s{i}"
            d.mkdir()
            for name in ("tls.crt", "tls.key", "ca.crt"):
                shutil.copy(tmp / name, d / name)
            servers.append(start_webhook(d, 2, 4))
        cpu: list[list[float]] = [[] for _ in servers]
        rps: list[list[float]] = [[] for _ in servers]
        for _, port in servers:
            hey(port, body, 2, 16)  # warm up
        for r in range(args.rounds):
            for i, (proc, port) in enumerate(servers):
                before = cpu_seconds(proc.proc.pid)
                res = hey(port, body, args.duration, 16)
                cpu[i].append((cpu_seconds(proc.proc.pid) - before) / max(res.ok, 1) * 1e6)
                rps[i].append(res.rps)
                print(f" round {r + 1} server {i + 1}: {res.rps:7.1f} req/s, server CPU "
                      f"{cpu[i][-1]:5.0f} us/answer, non-200 {res.non_200 + res.failed}",
                      flush=True)  # fmt: skip
        for i in range(len(servers)):
            print(f"server {i + 1}: median {statistics.median(rps[i]):7.1f} req/s, "
                  f"{statistics.median(cpu[i]):5.0f} us/answer "
                  f"(rounds {' '.join(f'{c:.0f}' for c in cpu[i])})")  # fmt: skip
    finally:
        for proc, _ in servers:
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
