"""Audit records: one JSON object per admission answered.  Pure.

An audit record is not a log line (STYLE.md habit 13).  It has an explicit
``kind`` and ``schemaVersion`` and mirrors the fields of Kubernetes audit events
(``auditID``, ``stage``, ``user``, ``objectRef``, timestamps, ``annotations``).
The schema is a contract: add fields, never rename or remove them without a new
``schemaVersion``.  README.md documents it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from webhook.review import Outcome

KIND = "EcrWebhookAudit"
SCHEMA_VERSION = "v1"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _owner(obj: Mapping[str, Any]) -> dict[str, str] | None:
    meta = obj.get("metadata")
    refs = meta.get("ownerReferences") if isinstance(meta, Mapping) else None
    if not isinstance(refs, list) or not refs:
        return None
    ref = next((r for r in refs if isinstance(r, Mapping) and r.get("controller")), refs[0])
    if not isinstance(ref, Mapping):
        return None
    return {"kind": str(ref.get("kind", "")), "name": str(ref.get("name", ""))}


def build_record(outcome: Outcome, received: float, answered: float) -> dict[str, Any]:
    """The audit record of one admission.  ``received``/``answered`` are epoch seconds."""
    req = outcome.request
    obj = req.get("object") or {}
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    meta = meta or {}
    user = req.get("userInfo") or {}
    resource = req.get("resource") or {}
    containers = [
        {
            "container": d.container,
            "path": d.path,
            "from": d.image,
            "to": d.target,
            "action": str(d.action),
            "reason": str(d.reason),
            "rule": d.rule,
        }
        for d in outcome.plan.decisions
    ]
    return {
        "kind": KIND,
        "schemaVersion": SCHEMA_VERSION,
        "auditID": req.get("uid"),
        "stage": "ResponseComplete",
        "requestReceivedTimestamp": _iso(received),
        "stageTimestamp": _iso(answered),
        "latencySeconds": round(max(answered - received, 0.0), 6),
        "operation": req.get("operation"),
        "subResource": req.get("subResource", "") or "",
        "dryRun": bool(req.get("dryRun", False)),
        "user": {"username": user.get("username", ""), "groups": list(user.get("groups") or [])},
        "objectRef": {
            "resource": resource.get("resource", ""),
            "namespace": req.get("namespace") or meta.get("namespace") or "",
            "name": req.get("name") or meta.get("name") or "",
            "generateName": meta.get("generateName", ""),
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
