"""The Grafana dashboard queries only what the server exports.

The exported series come from the real ``webhook.metrics.Metrics`` (a fresh
registry, with one admission and one rewrite recorded so that the labelled
series without pre-initialised values exist too), not from a copy of the
names; so renaming a metric or a label in the server fails here.
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
def exported() -> dict[str, frozenset[str]]:
    """Sample name -> label names, as a scrape of the server would show them."""
    m = server_metrics.Metrics(CollectorRegistry())
    m.observe(200, "patched", 0.003)
    m.rewritten([("wrong-account", "602401143452.dkr.ecr.af-south-1.amazonaws.com/eks/pause:3.9")])
    out: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in out.items()}


@cache
def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def targets() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def problems(expr: str) -> list[str]:
    """What in ``expr`` the server does not export (metric names, labels, values)."""
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


def test_every_dashboard_query_uses_exported_metrics_and_labels() -> None:
    assert len(targets()) >= 9
    for title, expr in targets():
        assert problems(expr) == [], f"panel {title!r}: {expr}"


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
])  # fmt: skip
def test_dashboard_shows(what: str, metric: str, by: str | None) -> None:
    assert _queries(metric, by), f"no panel shows {what}"


def test_dashboard_shows_p99_latency() -> None:
    p99 = [expr for _, expr in targets()
           if expr.startswith("histogram_quantile(0.99,")
           and "ecr_webhook_request_duration_seconds_bucket" in expr
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
