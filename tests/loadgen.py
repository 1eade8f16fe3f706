"""A paced admission load over keep-alive TLS, every request with its own uid.

Used by tests/test_load.py (a short soak in CI) and bench/load.py (``--soak``,
ten minutes).  ``hey`` sends one fixed body, so it cannot check that every
admission got exactly one audit record; this generator gives each request a
fresh ``request.uid`` (a byte substitution in a pre-encoded review, so the
client spends little CPU on the shared cores), checks that the answer echoes
it, and records latency and errors.  RSS of the server (master and workers,
from /proc) is sampled for the growth figure.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import ssl
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.serving import https_connection

PLACEHOLDER = "00000000-0000-4000-8000-000000000000"


@dataclass
class Soak:
    sent: int = 0
    answered: list[str] = field(default_factory=list)  # uids answered 200 with their uid
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def quantile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def rate(self) -> float:
        return len(self.answered) / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.sent} sent, {len(self.answered)} answered 200 in {self.seconds:.0f} s "
                f"({self.rate:.1f}/s), p50 {self.quantile(0.5) * 1000:.1f} ms, "
                f"p99 {self.quantile(0.99) * 1000:.1f} ms, errors {len(self.errors)}")  # fmt: skip


@dataclass
class HeyResult:
    rps: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def non_200(self) -> int:
        return sum(n for code, n in self.statuses.items() if code != "200")

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def timeouts(self) -> int:
        return sum(n for msg, n in self.errors.items() if "deadline" in msg or "imeout" in msg)


def parse_hey(text: str) -> HeyResult:
    r = HeyResult()
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        r.rps = float(m.group(1))
    if m := re.search(r"\s50%+ in ([\d.]+) secs", text):
        r.p50 = float(m.group(1))
    if m := re.search(r"\s99%+ in ([\d.]+) secs", text):
        r.p99 = float(m.group(1))
    for code, n in re.findall(r"^\s+\[(\d{3})\]\s+(\d+) responses", text, re.M):
        r.statuses[code] = int(n)
    if "Error distribution:" in text:
        for n, msg in re.findall(r"^\s+\[(\d+)\]\s+(.+)$", text.split("Error distribution:")[1],
                                 re.M):  # fmt: skip
            r.errors[msg.strip()] = r.errors.get(msg.strip(), 0) + int(n)
    return r


def hey(port: int, body: Path, seconds: int, connections: int, timeout: int = 20,
        cpus: str | None = None) -> HeyResult:  # fmt: skip
    """``hey`` with keep-alive over TLS: ``connections`` concurrent clients for ``seconds``
    (on the CPUs ``cpus`` names, ``taskset -c`` syntax, when given)."""
    argv = [
        *(["taskset", "-c", cpus] if cpus else []),
        "hey",
        "-z",
        f"{seconds}s",
        "-c",
        str(connections),
        "-t",
        str(timeout),
        "-m",
        "POST",
        "-T",
        "application/json",
        "-D",
        str(body),
        f"https://127.0.0.1:{port}/mutate",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    return parse_hey(out.stdout + out.stderr)


def body_template(review: Mapping[str, Any]) -> bytes:
    doc = json.loads(json.dumps(review))
    doc["request"]["uid"] = PLACEHOLDER
    return json.dumps(doc).encode()


def paced(port: int, ctx: ssl.SSLContext, template: bytes, *, rate: float, seconds: float,
          connections: int = 8, timeout: float = 10.0, prefix: str = "soak") -> Soak:  # fmt: skip
    """Send ``rate`` admissions per second for ``seconds`` over ``connections`` keep-alive
    connections (each paced on its own schedule; a late request is sent at once, with
    no catch-up burst)."""
    result = Soak()
    lock = threading.Lock()
    interval = connections / rate
    start = time.monotonic() + 0.2
    end = start + seconds
    marker = PLACEHOLDER.encode()

    def client(i: int) -> None:
        conn = https_connection(port, ctx, timeout=timeout)
        due = start + i * interval / connections
        n = 0
        try:
            while due < end:
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                due = max(due + interval, time.monotonic() - interval)
                uid = f"{prefix}-{i}-{n}-{uuid.uuid4().hex[:8]}"
                n += 1
                body = template.replace(marker, uid.encode(), 1)
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/mutate", body=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
                    resp = conn.getresponse()
                    raw = resp.read()
                    took = time.perf_counter() - t0
                    ok = resp.status == 200 and f'"uid":"{uid}"'.encode() in raw
                    error = None if ok else f"HTTP {resp.status}: {raw[:200]!r}"
                except (OSError, http.client.HTTPException) as exc:
                    took, error = time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
                    conn.close()
                    conn = https_connection(port, ctx, timeout=timeout)
                with lock:
                    result.sent += 1
                    if error is None:
                        result.answered.append(uid)
                        result.latencies.append(took)
                    else:
                        result.errors.append(error)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 30)
    result.seconds = min(time.monotonic(), end) - max(began, start)
    return result


def _family(master: int) -> list[int]:
    pids = [master]
    children = Path(f"/proc/{master}/task/{master}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    return pids


def cpu_seconds(master: int) -> float:
    """User + system CPU time of a gunicorn master and its workers (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _family(master):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (proc(5) fields 14, 15)
    return total / ticks


def rss_kib(master: int) -> int:
    """Resident memory of a gunicorn master and its worker processes, in KiB."""
    total = 0
    for pid in _family(master):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def audit_ids(audit_log: str | os.PathLike[str]) -> list[str]:
    """Every auditID in a (rotated) audit file and its backups; every line must parse."""
    base = Path(audit_log)
    out: list[str] = []
    for f in sorted(base.parent.glob(base.name + "*")):
        if f.suffix == ".lock":
            continue
        out.extend(json.loads(line)["auditID"] for line in f.read_text().splitlines())
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
