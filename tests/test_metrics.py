"""Per-request metrics gathered and flushed (``Metrics(flush_seconds=...)``, what ``serve`` uses).

A flushed ``Metrics`` must expose exactly what one updated at once exposes for
the same answers: counters, every histogram bucket, the sum and the count.
The flush adds to the histogram's own bucket values (``_buckets``, ``_sum``),
so a prometheus_client that changed them would fail here first.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from webhook.metrics import BUCKETS, Metrics, _Pending

# (code, result, seconds): on bucket bounds, between them, past the last one.
ANSWERS = [
    (200, "patched", 0.0004), (200, "patched", 0.0005), (200, "unchanged", 0.0007),
    (200, "skipped", 0.003), (400, "rejected", 0.0), (200, "patched", 10.0),
    (200, "error", 12.5), (413, "rejected", 0.0), (200, "patched", 0.0251),
]  # fmt: skip
USW2 = "602401143452.dkr.ecr.us-west-2.amazonaws.com"
REWRITES = [("wrong-account", f"{USW2}/amazon-k8s-cni:v1"),
            ("wrong-account", f"{USW2}/amazon-k8s-cni-init:v1"),
            ("unreachable", "mirror.example.com/eks/pause:3.10")]  # fmt: skip

FAMILIES = ("ecr_webhook_requests", "ecr_webhook_request_duration_seconds",
            "ecr_webhook_rewrites", "ecr_webhook_requests_in_flight")  # fmt: skip


def exposed(metrics: Metrics) -> list[str]:
    """The sample lines of the per-request families (no ``_created`` timestamps)."""
    lines = generate_latest(metrics.registry).decode().splitlines()
    return sorted(line for line in lines if line.startswith(FAMILIES) and "_created" not in line)


def answer_all(metrics: Metrics) -> None:
    for n, (code, result, seconds) in enumerate(ANSWERS):
        metrics.begin()
        if n == 0:
            metrics.answered(code, result, seconds, REWRITES)
        elif n == 1:
            metrics.answered(code, result, seconds, REWRITES[:1])
        else:
            metrics.observe(code, result, seconds)
        metrics.end()


def test_flushed_metrics_equal_metrics_updated_at_once() -> None:
    eager = Metrics(CollectorRegistry())
    lazy = Metrics(CollectorRegistry(), flush_seconds=3600)  # the thread never flushes here
    answer_all(eager)
    before = exposed(lazy)
    answer_all(lazy)
    assert exposed(lazy) == before, "nothing is written before the flush"
    lazy.flush()
    assert exposed(lazy) == exposed(eager)
    # A second flush with nothing gathered changes nothing.
    lazy.flush()
    assert exposed(lazy) == exposed(eager)
    assert 'ecr_webhook_requests_total{code="200",result="patched"} 4.0' in exposed(lazy)
    assert "ecr_webhook_request_duration_seconds_count 9.0" in exposed(lazy)
    rewrites = [line for line in exposed(lazy) if line.startswith("ecr_webhook_rewrites_total")]
    assert any(f'"{USW2}"' in line and "wrong-account" in line and line.endswith(" 3.0")
               for line in rewrites), rewrites  # fmt: skip


def test_the_in_flight_gauge_is_the_count_at_the_flush() -> None:
    lazy = Metrics(CollectorRegistry(), flush_seconds=3600)
    lazy.begin()
    lazy.begin()
    lazy.end()
    lazy.flush()
    assert "ecr_webhook_requests_in_flight 1.0" in exposed(lazy)
    lazy.end()
    lazy.flush()
    assert "ecr_webhook_requests_in_flight 0.0" in exposed(lazy)


def test_the_flush_thread_writes_within_flush_seconds() -> None:
    lazy = Metrics(CollectorRegistry(), flush_seconds=0.05)
    lazy.observe(200, "patched", 0.001)
    line = 'ecr_webhook_requests_total{code="200",result="patched"} 1.0'
    deadline = time.monotonic() + 5
    while line not in exposed(lazy) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert line in exposed(lazy)


def test_a_histogram_without_its_bucket_values_gets_the_observations_one_by_one() -> None:
    """The fallback if prometheus_client ever renames ``_buckets``: counts per bucket hold."""
    registry = CollectorRegistry()
    reference = Histogram("reference", "r", buckets=BUCKETS, registry=registry)
    pending = _Pending()
    for code, result, seconds in ANSWERS:
        pending.add(code, result, seconds)
        reference.observe(seconds)

    class Opaque:
        """Only ``observe``, like a histogram whose internals moved."""

        def __init__(self) -> None:
            self.inner = Histogram("opaque", "o", buckets=BUCKETS, registry=registry)

        def observe(self, value: float) -> None:
            self.inner.observe(value)

    opaque = Opaque()
    pending.write_histogram(opaque)  # type: ignore[arg-type]

    def buckets(name: str) -> list[tuple[str, float]]:
        return [(s.labels["le"], s.value) for m in registry.collect() if m.name == name
                for s in m.samples if s.name == f"{name}_bucket"]  # fmt: skip

    assert buckets("opaque") == buckets("reference")
