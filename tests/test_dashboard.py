"""The Grafana dashboard queries only what the server exports, and all of it.

The exported series come from the real ``webhook.metrics.Metrics`` (a fresh
registry, with one admission and one rewrite recorded so that the labelled
series without pre-initialised values exist too), not from a copy of the
names; so renaming a metric or a label in the server fails here, and so does
a metric added to the server without a panel.  Each query must also read its
metric the way its type allows: a counter through ``rate()`` or
``increase()``, a histogram through ``histogram_quantile`` over its buckets
summed ``by (le)``.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from webhook import metrics as server_metrics

DASHBOARD = (
    Path(__file__).resolve().parent.parent
    / "manifests" / "components" / "monitoring" / "dashboards" / "ecr-webhook.json"
)  # fmt: skip
METRIC = re.compile(r"\b(ecr_webhook_[a-z0-9_]+)\b")
# Labels Prometheus itself adds to every scraped series, and the histogram's.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}


@cache
def families() -> dict[str, tuple[str, frozenset[str]]]:
    """Metric family name -> (type, sample names), as the server registers them."""
    m = server_metrics.Metrics(CollectorRegistry())
    m.answered(200, "patched", 0.003,
               [("wrong-account", "602401143452.dkr.ecr.af-south-1.amazonaws.com/eks/pause:3.9")])
    return {family.name: (family.type, frozenset(s.name for s in family.samples))
            for family in m.registry.collect()}  # fmt: skip


@cache
def exported() -> dict[str, frozenset[str]]:
    """Sample name -> label names, as a scrape of the server would show them."""
    m = server_metrics.Metrics(CollectorRegistry())
    m.answered(200, "patched", 0.003,
               [("wrong-account", "602401143452.dkr.ecr.af-south-1.amazonaws.com/eks/pause:3.9")])
    out: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in out.items()}


def _counted(sample: str) -> bool:
    """A sample that only ever grows: read through rate() or increase()."""
    kinds = {name: kind for kind, samples in families().values() for name in samples}
    kind = kinds.get(sample)
    return kind == "counter" or (kind == "histogram" and not sample.endswith("_created"))


@cache
def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def targets() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def problems(expr: str) -> list[str]:
    """What in ``expr`` the server does not export (metric names, labels, values),
    and samples read against their type (a counter's outside rate() or
    increase(), a histogram's buckets outside histogram_quantile by le)."""
    found: list[str] = []
    names = METRIC.findall(expr)
    if not names:
        found.append("queries no ecr_webhook_ metric")
    labels: set[str] = set()
    for name in names:
        if name not in exported():
            found.append(f"metric {name} is not exported")
        else:
            labels |= exported()[name]
    for name in sorted(set(names)):
        if name in exported() and _counted(name):
            for at in re.finditer(rf"\b{name}\b", expr):
                if not re.search(r"\b(rate|irate|increase)\(\s*$", expr[: at.start()]):
                    found.append(f"{name} read outside rate() or increase()")
        by_le = any("le" in (x.strip() for x in g.split(","))
                    for g in re.findall(r"\bby \(([^)]*)\)", expr))  # fmt: skip
        quantile = expr.startswith("histogram_quantile(") and by_le
        if name.endswith("_bucket") and name in exported() and not quantile:
            found.append(f"{name} outside histogram_quantile(..., sum by (le) (...))")
    usable = labels | TARGET_LABELS
    for group in re.findall(r"\bby \(([^)]*)\)", expr):
        for label in (x.strip() for x in group.split(",")):
            if label not in usable:
                found.append(f"groups by {label!r}, a label of none of {names}")
    for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', expr):
        if label not in usable:
            found.append(f"matches on {label!r}, a label of none of {names}")
        if label == "result" and op == "=~":
            for v in value.split("|"):
                if v not in server_metrics.RESULTS:
                    found.append(f"result {v!r} is never recorded")
    return found


def unshown(exprs: list[str]) -> list[str]:
    """The server's metric families that no query in ``exprs`` reads in the way its
    type allows (a counter through rate() or increase(), a histogram's buckets
    through histogram_quantile, a gauge by its name)."""
    missing = []
    for family, (kind, _) in sorted(families().items()):
        if kind == "counter":
            pattern = rf"\b(rate|increase)\(\s*{family}_total\b"
        elif kind == "histogram":
            pattern = rf"^histogram_quantile\(.*\b(rate|increase)\(\s*{family}_bucket\b"
        else:
            pattern = rf"\b{family}\b(?!_)"
        if not any(re.search(pattern, expr) for expr in exprs):
            missing.append(f"{kind} {family}")
    return missing


def test_every_dashboard_query_uses_exported_metrics_and_labels() -> None:
    assert len(targets()) >= 9
    for title, expr in targets():
        assert problems(expr) == [], f"panel {title!r}: {expr}"
    for variable in dashboard()["templating"]["list"]:
        for name in METRIC.findall(json.dumps(variable.get("query", ""))):
            assert name in exported(), f"variable {variable['name']!r}: {name}"


def test_every_metric_the_server_exports_has_a_panel() -> None:
    assert len(families()) >= 15  # the registry was read, not an empty one
    assert unshown([expr for _, expr in targets()]) == []


def test_the_check_catches_what_the_server_does_not_export() -> None:
    """Control: a renamed metric, an unknown label and an unknown value are all caught."""
    assert problems("rate(ecr_webhook_request_total[5m])") == [
        "metric ecr_webhook_request_total is not exported"
    ]
    assert problems("sum by (pod_name) (rate(ecr_webhook_rewrites_total[5m]))") == [
        "groups by 'pod_name', a label of none of ['ecr_webhook_rewrites_total']"
    ]
    assert problems('rate(ecr_webhook_requests_total{result=~"error|failed"}[5m])') == [
        "result 'failed' is never recorded"
    ]
    assert problems("up") == ["queries no ecr_webhook_ metric"]
    assert problems("sum(ecr_webhook_rewrites_total)") == [
        "ecr_webhook_rewrites_total read outside rate() or increase()"
    ]
    assert problems("histogram_quantile(0.99, rate(ecr_webhook_probe_duration_seconds_bucket[5m]))"
                    ) == ["ecr_webhook_probe_duration_seconds_bucket outside "
                          "histogram_quantile(..., sum by (le) (...))"]  # fmt: skip
    assert problems("ecr_webhook_cluster_region_unknown") == []  # a gauge, read as it is
    # Coverage, over queries made here from the server's own families (not the
    # dashboard's): all of them shown; then one left out, or a histogram's
    # count read instead of its buckets, or a counter read raw.
    read = {"counter": "sum(rate({}_total[5m]))", "gauge": "max({})",
            "histogram": "histogram_quantile(0.99, sum by (le) (rate({}_bucket[5m])))"}  # fmt: skip
    every = {f: read[kind].format(f) for f, (kind, _) in families().items()}
    assert unshown(list(every.values())) == []
    without = dict(every, ecr_webhook_certificate_reloads="up")
    assert unshown(list(without.values())) == ["counter ecr_webhook_certificate_reloads"]
    count_only = "sum(rate(ecr_webhook_probe_duration_seconds_count[5m]))"
    without = dict(every, ecr_webhook_probe_duration_seconds=count_only)
    assert unshown(list(without.values())) == ["histogram ecr_webhook_probe_duration_seconds"]
    without = dict(every, ecr_webhook_rewrites="sum(ecr_webhook_rewrites_total)")
    assert unshown(list(without.values())) == ["counter ecr_webhook_rewrites"]


def _queries(metric: str, by: str | None = None) -> list[str]:
    found = []
    for title, expr in targets():
        if metric in expr and (by is None or re.search(rf"\bby \([^)]*\b{by}\b", expr)):
            found.append(title)
    return found


@pytest.mark.parametrize(("what", "metric", "by"), [
    ("admissions per second", "ecr_webhook_requests_total", "result"),
    ("errors", "ecr_webhook_errors_total", "stage"),
    ("rewrites by reason", "ecr_webhook_rewrites_total", "reason"),
    ("rewrites by route (target registry)", "ecr_webhook_rewrites_total", "registry"),
    ("probe outcomes", "ecr_webhook_probes_total", "outcome"),
    ("requests in flight", "ecr_webhook_requests_in_flight", None),
    ("policy reloads", "ecr_webhook_policy_reloads_total", "result"),
    ("certificate reloads", "ecr_webhook_certificate_reloads_total", "result"),
    ("audit records lost by errno", "ecr_webhook_audit_write_errors_total", "errno"),
    ("probe cache hits and misses", "ecr_webhook_probe_cache_lookups_total", "result"),
    ("ECR token calls", "ecr_webhook_registry_token_refreshes_total", "result"),
    ("admissions out of probe budget", "ecr_webhook_probe_budget_exhausted_total", None),
    ("an unknown cluster region", "ecr_webhook_cluster_region_unknown", None),
])  # fmt: skip
def test_dashboard_shows(what: str, metric: str, by: str | None) -> None:
    assert _queries(metric, by), f"no panel shows {what}"


@pytest.mark.parametrize("histogram", ["ecr_webhook_request_duration_seconds",
                                       "ecr_webhook_probe_duration_seconds"])  # fmt: skip
def test_dashboard_shows_p99_latency(histogram: str) -> None:
    p99 = [expr for _, expr in targets()
           if expr.startswith("histogram_quantile(0.99,")
           and f"{histogram}_bucket" in expr
           and re.search(r"\bby \(le\)", expr)]  # fmt: skip
    assert p99


def test_dashboard_is_importable() -> None:
    doc = dashboard()
    assert doc["uid"] == "ecr-webhook" and doc["title"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    for panel in doc["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"], panel["title"]
