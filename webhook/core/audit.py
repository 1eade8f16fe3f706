"""Audit records: one JSON object per admission answered.  Pure.

An audit record is not a log line (STYLE.md habit 13).  It has an explicit
``kind`` and ``schemaVersion`` and mirrors the fields of Kubernetes audit events
(``auditID``, ``stage``, ``user``, ``objectRef``, timestamps, ``annotations``).
The schema is a contract: add fields, never rename or remove them without a new
``schemaVersion``.  README.md documents it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from webhook.core import jsonc
from webhook.core.plan import PodPlan
from webhook.core.review import Outcome

KIND = "EcrWebhookAudit"
SCHEMA_VERSION = "v1"


def _iso(ts: float) -> str:
    """RFC 3339 UTC with microseconds, as Kubernetes audit events write them."""
    seconds = int(ts)
    micros = round((ts - seconds) * 1e6)
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    return f"{_second(seconds)}.{micros:06d}Z"


@lru_cache(maxsize=8)
def _second(seconds: int) -> str:
    # Two timestamps per record, nearly always in the same second: formatting
    # the date once per second saves most of the cost (strftime + gmtime).
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _owner(obj: Mapping[str, Any]) -> dict[str, str] | None:
    meta = obj.get("metadata")
    refs = meta.get("ownerReferences") if isinstance(meta, jsonc.OBJECT) else None
    if not isinstance(refs, list) or not refs:
        return None
    ref = next((r for r in refs if isinstance(r, jsonc.OBJECT) and r.get("controller")), refs[0])
    if not isinstance(ref, jsonc.OBJECT):
        return None
    return {"kind": str(ref.get("kind", "")), "name": str(ref.get("name", ""))}


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, jsonc.OBJECT) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


_CONTAINERS = "audit.containers"  # this module's key in PodPlan.derived


def _containers(plan: PodPlan) -> list[dict[str, Any]]:
    """The record's ``containers`` entries, one per decision, memoised on the plan.

    The pods of one shape share a plan (plan_pod), so their records share these
    entries: a record is encoded and dropped, never changed after it is built.
    """
    entries = plan.derived.get(_CONTAINERS)
    if entries is None:
        entries = tuple(
            {
                "container": d.container,
                "path": d.path,
                "from": d.image,
                "to": d.target,
                "action": str(d.action),
                "reason": str(d.reason),
                "rule": d.rule,
                # probe evidence (issue 8): [{candidate, outcome, latencyMs, cached}]
                "probes": [p.as_json() for p in d.probes],
            }
            for d in plan.decisions
        )
        plan.remember_derived(_CONTAINERS, entries)
    return list(entries)


def build_record(outcome: Outcome, received: float, answered: float) -> dict[str, Any]:
    """The audit record of one admission.  ``received``/``answered`` are epoch seconds.

    Never raises on odd request content (a review that failed open may carry
    anything): every admission answered must have its record.
    """
    req: Mapping[str, Any] = outcome.request
    obj = _mapping(req.get("object"))
    meta = _mapping(obj.get("metadata"))
    user = _mapping(req.get("userInfo"))
    resource = _mapping(req.get("resource"))
    groups = user.get("groups")
    containers = _containers(outcome.plan)
    return {
        "kind": KIND,
        "schemaVersion": SCHEMA_VERSION,
        "auditID": _text(req.get("uid")),
        "stage": "ResponseComplete",
        "requestReceivedTimestamp": _iso(received),
        "stageTimestamp": _iso(answered),
        "latencySeconds": round(max(answered - received, 0.0), 6),
        "operation": _text(req.get("operation")) or None,
        "subResource": _text(req.get("subResource")),
        # the field is a boolean in the API; anything else is not a dry run
        "dryRun": req.get("dryRun") is True,
        "user": {
            "username": _text(user.get("username")),
            "groups": [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else [],
        },
        "objectRef": {
            "resource": _text(resource.get("resource")),
            "namespace": _text(req.get("namespace")) or _text(meta.get("namespace")),
            "name": _text(req.get("name")) or _text(meta.get("name")),
            "generateName": _text(meta.get("generateName")),
        },
        "owner": _owner(obj),
        "decision": outcome.decision,
        "containers": containers,
        "patchOperations": len(outcome.patch),
        "warnings": list(outcome.warnings),
        "skipped": outcome.skipped,
        "error": outcome.error,
        "annotations": {},
    }
