"""Audit records: the schema fields, and a record for every answered admission,
however odd the request that failed open."""

from __future__ import annotations

import json

from webhook.core.audit import KIND, SCHEMA_VERSION, build_record
from webhook.core.plan import PlanContext
from webhook.core.policy import Policy
from webhook.core.review import admit, fail_open

CTX = PlanContext.build(Policy(), "ap-southeast-4")
BAD = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni:v1.19.4"


def test_record_fields() -> None:
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u1", "operation": "CREATE", "namespace": "kube-system", "dryRun": True,
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "userInfo": {"username": "system:serviceaccount:kube-system:daemon-set-controller",
                     "groups": ["system:serviceaccounts"]},
        "object": {"metadata": {"generateName": "aws-node-", "ownerReferences": [
            {"kind": "DaemonSet", "name": "aws-node", "controller": True}]},
            "spec": {"containers": [{"name": "aws-node", "image": BAD}]}}}}  # fmt: skip
    rec = build_record(admit(body, CTX), 100.0, 100.25)
    assert (rec["kind"], rec["schemaVersion"], rec["auditID"]) == (KIND, SCHEMA_VERSION, "u1")
    assert rec["dryRun"] is True and rec["decision"] == "patched"
    assert rec["objectRef"] == {"resource": "pods", "namespace": "kube-system", "name": "",
                                "generateName": "aws-node-"}  # fmt: skip
    assert rec["owner"] == {"kind": "DaemonSet", "name": "aws-node"}
    assert rec["latencySeconds"] == 0.25
    assert rec["requestReceivedTimestamp"] == "1970-01-01T00:01:40.000000Z"
    (c,) = rec["containers"]
    assert (c["from"], c["reason"], c["rule"]) == (BAD, "wrong-account", "targets[0]")
    assert c["to"].startswith("491585149902.")
    json.dumps(rec)  # serialisable as is


def test_odd_request_still_gets_a_record() -> None:
    """Fields of the right outer type with odd insides (parse_review accepts them)."""
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u2", "resource": {"resource": 7}, "userInfo": {"username": 1, "groups": "g"},
        "object": {"metadata": ["not", "a", "map"]}}}  # fmt: skip
    rec = build_record(fail_open(body, RuntimeError("boom")), 1.0, 2.0)
    assert rec["decision"] == "error" and rec["error"] == "RuntimeError: boom"
    assert rec["dryRun"] is False
    assert rec["user"] == {"username": "", "groups": []}
    assert rec["objectRef"]["resource"] == ""
    json.dumps(rec)
