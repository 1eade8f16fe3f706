"""Prometheus metrics of the admission server.  A shell module.

Names follow the controller-runtime webhook shape under the ``ecr_webhook_``
prefix (STYLE.md habit 10).  Labels are bounded: no pod, namespace or user
label ever; ``registry`` is the host of a rewrite target, which the policy
bounds (its mirrors plus the official registries).

==========================================  =========  ====================================
name                                        type       labels
==========================================  =========  ====================================
ecr_webhook_requests_total                  counter    code, result (patched, unchanged,
                                                       skipped, error, rejected)
ecr_webhook_request_duration_seconds        histogram  -
ecr_webhook_requests_in_flight              gauge      -
ecr_webhook_rewrites_total                  counter    reason, registry
ecr_webhook_policy_reloads_total            counter    result (success, failure)
ecr_webhook_certificate_reloads_total       counter    result (success, failure)
ecr_webhook_errors_total                    counter    stage (admit, audit, record, policy,
                                                       certificate, probe)
ecr_webhook_build_info                      gauge      version
ecr_webhook_probes_total                    counter    registry, outcome (available,
                                                       not-found, unauthorized, throttled,
                                                       server-error, unreachable)
ecr_webhook_probe_duration_seconds          histogram  -
ecr_webhook_probe_cache_lookups_total       counter    result (hit, miss)
ecr_webhook_registry_token_refreshes_total  counter    result (success, failure)
ecr_webhook_probe_budget_exhausted_total    counter    -
ecr_webhook_audit_write_errors_total        counter    errno (ENOSPC, EDQUOT, EIO, EPIPE,
                                                       other): audit records lost
ecr_webhook_cluster_region_unknown          gauge      - (1: the cluster region is not in
                                                       the registry data)
==========================================  =========  ====================================

``registry`` of the probe metrics is bounded too: an official EKS registry
host (the package data lists them) or a mirror of the policy, else ``other``
(``webhook.prober.Prober._label``); a pod's own wrong registry never becomes
a label value.

Across gunicorn workers the values are correct through prometheus_client's
multiprocess mode: each worker writes its values to memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` and a scrape, answered by any worker, adds up the
files of all workers (``exposition``).  The launcher sets the variable before
prometheus_client creates any value (``webhook.server``).  Without the variable
(tests, one process) the metrics live in the registry given to ``Metrics``.

Under ``serve`` the per-request metrics (requests, their duration, rewrites,
requests in flight) are gathered in each worker and written to those files
once a second (``FLUSH_SECONDS``), and by a worker just before it answers a
scrape, so a scrape shows another worker's last second of answers late, never
wrong; the in-flight gauge is each worker's count at its last flush.  Why: see
``Metrics.begin``.  Nothing is lost at a graceful stop (written at exit).
"""

from __future__ import annotations

import bisect
import collections
import errno
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

from webhook import __version__
from webhook.background import Periodic

PREFIX = "ecr_webhook"
RESULTS = ("patched", "unchanged", "skipped", "error", "rejected")
ERROR_STAGES = ("admit", "audit", "record", "policy", "certificate", "probe")
PROBE_OUTCOMES = ("available", "not-found", "unauthorized", "throttled", "server-error",
                  "unreachable")  # fmt: skip
# Probe latency: a cache hit costs nothing, a cold probe a token call and a HEAD;
# the budget of an admission is 1 s by default (at most 3).
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
AUDIT_ERRNOS = ("ENOSPC", "EDQUOT", "EIO", "EPIPE", "other")
# Admission latency: the kube-apiserver's default webhook timeout is 10 s
# (admissionregistration.k8s.io/v1 timeoutSeconds, max 30); the buckets resolve
# the sub-millisecond answers of a healthy webhook and reach that timeout.
FLUSH_SECONDS = 1.0  # how late a scrape may see a worker's per-request metrics (serve)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """All metrics of one server, registered in ``registry`` (a fresh one by default).

    A fresh registry per app keeps several apps in one test process apart; in
    multiprocess mode the registry only matters for the names, the values are
    in the shared directory.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, flush_seconds: float = 0.0
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Admission requests answered, by HTTP code and result.",
            ["code", "result"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "Time to answer an admission request.",
            registry=r, buckets=BUCKETS,
        )  # fmt: skip
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "Admission requests being answered.",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.rewrites = Counter(
            f"{PREFIX}_rewrites", "Image references rewritten, by reason and target registry.",
            ["reason", "registry"], registry=r,
        )  # fmt: skip
        self.policy_reloads = Counter(
            f"{PREFIX}_policy_reloads", "Policy reloads after the file changed, by result.",
            ["result"], registry=r,
        )  # fmt: skip
        self.certificate_reloads = Counter(
            f"{PREFIX}_certificate_reloads", "Serving certificate reloads after the files "
            "changed, by result (a failure keeps the previous certificate).",
            ["result"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            f"{PREFIX}_errors", "Internal errors, by stage (the admission still succeeds).",
            ["stage"], registry=r,
        )  # fmt: skip
        self.build_info = Gauge(
            f"{PREFIX}_build_info", "Build information; the value is always 1.",
            ["version"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.probes = Counter(
            f"{PREFIX}_probes", "Registry availability probes, by registry and outcome.",
            ["registry", "outcome"], registry=r,
        )  # fmt: skip
        self.probe_duration = Histogram(
            f"{PREFIX}_probe_duration_seconds", "Time one registry probe took (token + HEAD).",
            registry=r, buckets=PROBE_BUCKETS,
        )  # fmt: skip
        self.probe_cache = Counter(
            f"{PREFIX}_probe_cache_lookups", "Probe cache lookups, by result (hit, miss).",
            ["result"], registry=r,
        )  # fmt: skip
        # Why audit records were lost (each is also in errors_total{stage="audit"}):
        # a full disk is the one an operator can fix, so it gets its own series.
        self.audit_write_errors = Counter(
            f"{PREFIX}_audit_write_errors", "Audit records not written, by errno.",
            ["errno"], registry=r,
        )  # fmt: skip
        # A region AWS launched after this release: the server serves, but the
        # static facts know no EKS account there (issue 11).  Alert on it.
        self.region_unknown = Gauge(
            f"{PREFIX}_cluster_region_unknown",
            "1 when the cluster region is missing from the registry data, else 0.",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.token_refreshes = Counter(
            f"{PREFIX}_registry_token_refreshes", "ECR authorization token calls, by result.",
            ["result"], registry=r,
        )  # fmt: skip
        self.budget_exhausted = Counter(
            f"{PREFIX}_probe_budget_exhausted",
            "Admissions whose probes did not all answer within the budget.", registry=r,
        )  # fmt: skip
        self.build_info.labels(__version__).set(1)
        # labels() costs a lock and a dict lookup of a tuple of strings; the
        # per-request paths keep their children here (bounded, like the labels).
        self._requests: dict[tuple[int, str], Any] = {}
        self._rewrites: dict[tuple[str, str], Any] = {}
        # Pre-initialise the bounded label values so that every series exists
        # at 0 from the first scrape (rate() over a series that appears late
        # misses its first increments).
        for result in RESULTS:
            self.requests.labels("400" if result == "rejected" else "200", result)
        for stage in ERROR_STAGES:
            self.errors.labels(stage)
        for result in ("success", "failure"):
            self.policy_reloads.labels(result)
            self.certificate_reloads.labels(result)
        for name in AUDIT_ERRNOS:
            self.audit_write_errors.labels(name)
        for outcome in PROBE_OUTCOMES:
            self.probes.labels("other", outcome)
        for result in ("hit", "miss"):
            self.probe_cache.labels(result)
        for result in ("success", "failure"):
            self.token_refreshes.labels(result)
        self._cache_children = (self.probe_cache.labels("miss"), self.probe_cache.labels("hit"))
        # The per-request metrics, gathered here and flushed every flush_seconds
        # (0: at once).  See "Per-request metrics" in the class docstring.
        self.flush_seconds = flush_seconds
        self._pending = _Pending()
        self._pending_lock = threading.Lock()
        self._active: collections.deque[None] = collections.deque()  # begin() .. end()
        # Started at the first request, so in the worker that serves it (after
        # gunicorn forked); the last values are written at exit.  A failed
        # flush loses what it had taken (counts, not answers).
        self._flusher = Periodic("metrics-flush", flush_seconds, self.flush)

    # Per-request metrics.  With ``flush_seconds`` (``serve``: FLUSH_SECONDS) they
    # are gathered in plain counters under one lock and written to the
    # prometheus_client values (memory-mapped files in multiprocess mode) by a
    # thread every ``flush_seconds``, with each label set's count added once.
    # Written at once, each answer made six updates of the shared files, each
    # with prometheus_client's lock and a getpid(), and the server answered
    # 0.13-0.15 of the floor's throughput less than without them
    # (bench/ablate.py).  A scrape then sees a worker's requests up to
    # flush_seconds late; Prometheus scrapes every 15 s or more.  The in-flight
    # gauge becomes a sample taken at each flush.

    def begin(self) -> None:
        """An admission request is being answered (the in-flight gauge)."""
        if not self.flush_seconds:
            self.in_flight.inc()
            return
        # One entry per request in progress, without a lock: deque appends and
        # pops are thread-safe (Python docs, collections.deque).
        self._active.append(None)
        self._flusher.ensure()

    def end(self) -> None:
        if not self.flush_seconds:
            self.in_flight.dec()
            return
        self._active.pop()

    def observe(self, code: int, result: str, seconds: float) -> None:
        """One answer without rewrites (``answered``)."""
        self.answered(code, result, seconds)

    def answered(self, code: int, result: str, seconds: float,
                 rewrites: Iterable[tuple[str, str]] = ()) -> None:  # fmt: skip
        """One answer: the requests counter, the duration histogram, and the
        rewrites it made, as (reason, target image) pairs (the rewrites counter,
        by target registry).  Gathered under one lock (``flush_seconds``)."""
        keys = [(reason, registry_of(target)) for reason, target in rewrites]
        if self.flush_seconds:
            with self._pending_lock:
                self._pending.add(code, result, seconds)
                counts = self._pending.rewrites
                for key in keys:
                    counts[key] = counts.get(key, 0) + 1
            self._flusher.ensure()
            return
        self._request_child(code, result).inc()
        self.duration.observe(seconds)
        counted: dict[tuple[str, str], int] = {}
        for key in keys:
            counted[key] = counted.get(key, 0) + 1
        self._count_rewrites(counted)

    def flush(self) -> None:
        """Write what has been gathered to the metric values (``flush_seconds`` mode)."""
        with self._pending_lock:
            pending, self._pending = self._pending, _Pending()
        in_flight = len(self._active)
        for (code, result), n in pending.requests.items():
            self._request_child(code, result).inc(n)
        self._count_rewrites(pending.rewrites)
        pending.write_histogram(self.duration)
        if self.flush_seconds:
            self.in_flight.set(in_flight)

    def _request_child(self, code: int, result: str) -> Any:
        key = (code, result)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(str(code), result)
        return child

    def _count_rewrites(self, counts: Mapping[tuple[str, str], int]) -> None:
        for key, n in counts.items():  # one file write per label set, not per image
            child = self._rewrites.get(key)
            if child is None:
                child = self._rewrites[key] = self.rewrites.labels(*key)
            child.inc(n)

    # ProbeObserver (webhook.prober): called from probe threads.

    def probed(self, registry: str, outcome: str, seconds: float) -> None:
        self.probes.labels(registry, outcome).inc()
        self.probe_duration.observe(seconds)

    def cache_lookup(self, hit: bool) -> None:
        self._cache_children[hit].inc()

    def token_refresh(self, ok: bool) -> None:
        self.token_refreshes.labels("success" if ok else "failure").inc()

    def out_of_budget(self) -> None:
        self.budget_exhausted.inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition and its content type.

        In multiprocess mode a fresh registry with a ``MultiProcessCollector``
        is built per scrape, as the prometheus_client documentation requires.
        What this ``Metrics`` has gathered is written first, so the worker
        answering a scrape shows its own answers up to now.
        """
        self.flush()
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        return multiprocess_exposition(path)


class _Pending:
    """Per-request values gathered since the last flush (guarded by the caller's lock)."""

    __slots__ = ("buckets", "requests", "rewrites", "sum")

    def __init__(self) -> None:
        self.requests: dict[tuple[int, str], int] = {}
        self.rewrites: dict[tuple[str, str], int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def add(self, code: int, result: str, seconds: float) -> None:
        key = (code, result)
        self.requests[key] = self.requests.get(key, 0) + 1
        # Histogram.observe counts a value in the first bucket whose upper
        # bound is >= the value (le): bisect_left finds that bucket.
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def write_histogram(self, histogram: Histogram) -> None:
        """Add the gathered observations to ``histogram``: one update per bucket used.

        Through the histogram's own values (``_buckets``, ``_sum``: the
        non-cumulative bucket counts and the sum that ``observe`` updates, in
        every prometheus_client release since 0.1); tests/test_metrics.py
        checks the result against ``observe``.  A histogram without them gets
        the observations one by one, at the upper bound of their bucket.
        """
        if not any(self.buckets):
            return
        values = getattr(histogram, "_buckets", None)
        total = getattr(histogram, "_sum", None)
        if values is None or total is None or len(values) != len(self.buckets):
            bounds = (*BUCKETS, BUCKETS[-1] * 2)
            for bound, n in zip(bounds, self.buckets, strict=True):
                for _ in range(n):
                    histogram.observe(bound)
            return
        for value, n in zip(values, self.buckets, strict=True):
            if n:
                value.inc(n)
        total.inc(self.sum)


def errno_label(exc: BaseException) -> str:
    """The bounded ``errno`` label of a failed audit write."""
    code = getattr(exc, "errno", None)
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    return name if name in AUDIT_ERRNOS else "other"


def multiprocess_exposition(path: str) -> tuple[bytes, str]:
    """All workers' values, added up from the files in ``path``."""
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Drop the live gauges (requests in flight) of a worker that exited."""
    _multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def registry_of(image: str) -> str:
    """The registry host of an image reference (first path component)."""
    return image.split("/", 1)[0] if "/" in image else "docker.io"
