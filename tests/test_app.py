"""The Flask app through its test client: envelope, errors, fail-open, audit, reload.

Real collaborators throughout: a real audit file (``AuditLog``), real metrics
in a private registry, a real certificate pair on disk, a policy directory laid
out like a ConfigMap volume.  The TLS server itself is tested in test_server.py.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.serving import (
    ORIGINALS,
    REGION,
    SOURCE_REGISTRY,
    TARGET_REGISTRY,
    ConfigMapDir,
    admission_review,
    aws_node_pod,
    decode_patch,
    images,
    wait_until,
)
from webhook import certs
from webhook.app import MAX_BODY, create_app
from webhook.auditlog import AuditLog
from webhook.config import ServeConfig
from webhook.core.errors import PolicyError
from webhook.core.imageref import ImageRef
from webhook.core.plan import Verdict
from webhook.logs import Log
from webhook.metrics import Metrics
from webhook.reload import CertificateHolder

MIRROR = "111122223333.dkr.ecr.ap-southeast-4.amazonaws.com"
MIRROR_POLICY = f"""\
apiVersion: ecr-webhook.io/v1alpha1
kind: RewritePolicy
targets:
  - {{type: mirror, registry: {MIRROR}, prefix: eks-mirror}}
  - {{type: official}}
unavailable: [{SOURCE_REGISTRY}]
"""


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls")
    certs.write_bundle(certs.build_certificate(["localhost"], ["127.0.0.1"]), out)
    return out


class Harness:
    def __init__(self, app: Flask, metrics: Metrics, audit_file: Path, policy: ConfigMapDir):
        self.app = app
        self.client: FlaskClient = app.test_client()
        self.metrics = metrics
        self.audit_file = audit_file
        self.policy = policy

    def post(self, body: object, content_type: str = "application/json") -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post("/mutate", data=data, content_type=content_type)

    def records(self) -> list[dict[str, Any]]:
        if not self.audit_file.exists():
            return []
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]

    def count(self, code: str, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "ecr_webhook_requests_total", {"code": code, "result": result}
        )
        return value or 0.0

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def make(tmp_path: Path, tls_dir: Path, policy_text: str = "", **kw: Any) -> Harness:
    policy = ConfigMapDir(tmp_path / "policy")
    policy.update(policy_text or "apiVersion: ecr-webhook.io/v1alpha1\nkind: RewritePolicy\n")
    audit_file = tmp_path / "audit.log"
    config = ServeConfig(
        cert_file=str(tls_dir / "tls.crt"),
        key_file=str(tls_dir / "tls.key"),
        policy_file=str(policy.path),
        region=REGION,
        audit_log=str(audit_file),
    )
    metrics = Metrics()
    audit = kw.pop("audit", None) or AuditLog(str(audit_file))
    app = create_app(config, metrics=metrics, audit=audit, env={}, **kw)
    return Harness(app, metrics, audit_file, policy)


@pytest.fixture
def h(tmp_path: Path, tls_dir: Path) -> Iterator[Harness]:
    yield make(tmp_path, tls_dir)


# ----------------------------------------------------------------- envelope


def test_v1_review_is_echoed_as_v1(h: Harness) -> None:
    """Regression: a v1 request gets a v1 answer with its uid (never assume a version)."""
    body = admission_review(api_version="admission.k8s.io/v1", uid="uid-v1")
    resp = h.post(body)
    assert resp.status_code == 200
    doc = resp.get_json()
    assert doc["apiVersion"] == "admission.k8s.io/v1"
    assert doc["kind"] == "AdmissionReview"
    assert doc["response"]["uid"] == "uid-v1"
    assert doc["response"]["allowed"] is True


def test_v1beta1_review_is_echoed_as_v1beta1(h: Harness) -> None:
    """Regression: a v1beta1 request gets a v1beta1 answer (pre-1.16 style clients)."""
    body = admission_review(api_version="admission.k8s.io/v1beta1", uid="uid-v1beta1")
    doc = h.post(body).get_json()
    assert doc["apiVersion"] == "admission.k8s.io/v1beta1"
    assert doc["kind"] == "AdmissionReview"
    assert doc["response"]["uid"] == "uid-v1beta1"


def test_rewrite_gives_jsonpatch_annotation_and_warnings(h: Harness) -> None:
    pod = aws_node_pod()
    doc = h.post(admission_review(pod)).get_json()["response"]
    assert doc["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(pod, decode_patch(doc))
    for name, image in images(patched).items():
        assert image.startswith(TARGET_REGISTRY + "/"), name
    originals = json.loads(patched["metadata"]["annotations"][ORIGINALS])
    assert originals == images(pod)
    assert len(doc["warnings"]) == 3
    for warning, name in zip(doc["warnings"], images(pod), strict=True):
        assert len(warning) <= 120
        assert f"container {name}" in warning
        assert "491585149902.dkr.ecr.ap-southeast-4" in warning


def test_no_change_means_no_patch_field(h: Harness) -> None:
    doc = h.post(admission_review(aws_node_pod(TARGET_REGISTRY))).get_json()["response"]
    assert doc == {"uid": doc["uid"], "allowed": True}
    assert h.records()[-1]["decision"] == "unchanged"


def test_patched_pod_sent_back_gives_no_image_operation(h: Harness) -> None:
    """Idempotence: reinvocation (reinvocationPolicy: IfNeeded) changes nothing more."""
    pod = aws_node_pod()
    first = h.post(admission_review(pod)).get_json()["response"]
    patched = jsonpatch.apply_patch(pod, decode_patch(first))
    second = h.post(admission_review(patched)).get_json()["response"]
    ops = decode_patch(second)
    assert not [op for op in ops if op["path"].endswith("/image")]
    assert "patch" not in second
    assert h.records()[-1]["decision"] == "unchanged"


@pytest.mark.parametrize(
    ("operation", "sub_resource", "resource"),
    [("DELETE", None, "pods"), ("UPDATE", None, "pods"), ("UPDATE", "status", "pods"),
     ("CREATE", None, "configmaps")],
)  # fmt: skip
def test_out_of_scope_requests_are_allowed_untouched(
    h: Harness, operation: str, sub_resource: str | None, resource: str
) -> None:
    body = admission_review(operation=operation, sub_resource=sub_resource, resource=resource)
    doc = h.post(body).get_json()["response"]
    assert doc["allowed"] is True
    assert "patch" not in doc
    assert h.records()[-1]["decision"] == "skipped"


def test_ephemeral_container_update_is_rewritten(h: Harness) -> None:
    pod = aws_node_pod(TARGET_REGISTRY)
    pod["spec"]["ephemeralContainers"] = [
        {"name": "debug", "image": f"{SOURCE_REGISTRY}/eks/pause:3.10"}
    ]
    body = admission_review(pod, operation="UPDATE", sub_resource="ephemeralcontainers")
    doc = h.post(body).get_json()["response"]
    patched = jsonpatch.apply_patch(pod, decode_patch(doc))
    assert images(patched)["debug"] == f"{TARGET_REGISTRY}/eks/pause:3.10"


def test_dry_run_is_answered_as_real_and_recorded_as_dry_run(h: Harness) -> None:
    pod = aws_node_pod()
    real = h.post(admission_review(pod, uid="real")).get_json()["response"]
    dry = h.post(admission_review(pod, uid="dry", dry_run=True)).get_json()["response"]
    assert dry["patch"] == real["patch"]
    assert dry["warnings"] == real["warnings"]
    by_id = {r["auditID"]: r for r in h.records()}
    assert by_id["dry"]["dryRun"] is True
    assert by_id["real"]["dryRun"] is False


# ----------------------------------------------------------------- audit and metrics


def test_audit_record_has_the_documented_fields(h: Harness) -> None:
    h.post(admission_review(uid="audit-1"))
    rec = h.records()[-1]
    assert rec["kind"] == "EcrWebhookAudit"
    assert rec["schemaVersion"] == "v1"
    assert rec["auditID"] == "audit-1"
    assert rec["operation"] == "CREATE"
    assert rec["dryRun"] is False
    assert rec["user"]["username"] == "system:serviceaccount:kube-system:daemon-set-controller"
    assert rec["objectRef"]["namespace"] == "kube-system"
    assert rec["objectRef"]["generateName"] == "aws-node-"
    assert rec["owner"] == {"kind": "DaemonSet", "name": "aws-node"}
    assert rec["decision"] == "patched"
    assert {c["container"] for c in rec["containers"]} == {
        "aws-vpc-cni-init",
        "aws-node",
        "aws-eks-nodeagent",
    }
    for c in rec["containers"]:
        assert c["from"].startswith(SOURCE_REGISTRY)
        assert c["to"].startswith(TARGET_REGISTRY)
        assert c["reason"] == "wrong-account"
        assert c["rule"] == "targets[0]"
        assert {"path", "from", "to", "reason", "rule"} <= set(c)
    assert len(rec["warnings"]) == 3
    assert rec["error"] is None
    assert rec["latencySeconds"] >= 0
    assert rec["requestReceivedTimestamp"] <= rec["stageTimestamp"]


def test_one_audit_record_and_one_count_per_admission(h: Harness) -> None:
    bodies = [admission_review(uid=f"n-{i}") for i in range(5)]
    bodies += [admission_review(aws_node_pod(TARGET_REGISTRY), uid=f"u-{i}") for i in range(3)]
    for b in bodies:
        assert h.post(b).status_code == 200
    assert [r["auditID"] for r in h.records()] == [b["request"]["uid"] for b in bodies]
    assert h.count("200", "patched") == 5
    assert h.count("200", "unchanged") == 3
    assert h.sample("ecr_webhook_request_duration_seconds_count") == 8
    assert (
        h.sample("ecr_webhook_rewrites_total", reason="wrong-account", registry=TARGET_REGISTRY)
        == 15
    )
    assert h.sample("ecr_webhook_requests_in_flight") == 0


def test_metric_names_are_exported_and_preinitialised(h: Harness) -> None:
    text = h.metrics.exposition()[0].decode()
    for name in ("ecr_webhook_requests_total", "ecr_webhook_request_duration_seconds_bucket",
                 "ecr_webhook_requests_in_flight", "ecr_webhook_policy_reloads_total",
                 "ecr_webhook_errors_total", "ecr_webhook_build_info",
                 "ecr_webhook_probes_total"):  # fmt: skip
        assert f"\n{name}" in text, name
    assert 'ecr_webhook_probes_total{outcome="unauthorized",registry="other"} 0.0' in text
    assert 'ecr_webhook_errors_total{stage="admit"} 0.0' in text


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"null", "JSON object"),
        (json.dumps({"apiVersion": "admission.k8s.io/v2", "kind": "AdmissionReview",
                     "request": {"uid": "x"}}).encode(), "unsupported apiVersion"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "Pod",
                     "request": {"uid": "x"}}).encode(), "kind must be AdmissionReview"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
         "request is missing"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                     "request": {"operation": "CREATE"}}).encode(), "request.uid"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                     "request": {"uid": ""}}).encode(), "request.uid"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
    ids=["bad-json", "not-utf8", "array", "null", "unknown-apiversion", "wrong-kind",
         "no-request", "no-uid", "empty-uid", "deep-nesting"],
)  # fmt: skip
def test_malformed_review_is_400_with_a_clear_message(h: Harness, body: bytes, needle: str) -> None:
    resp = h.post(body)
    assert resp.status_code == 400
    doc = resp.get_json()
    assert doc["kind"] == "Status"
    assert doc["code"] == 400
    assert needle in doc["message"]
    assert "Traceback" not in resp.get_data(as_text=True)
    assert h.count("400", "rejected") == 1
    assert h.records() == []


def test_pod_review_without_object_is_400(h: Harness) -> None:
    body = admission_review()
    del body["request"]["object"]
    resp = h.post(body)
    assert resp.status_code == 400
    assert "request.object" in resp.get_json()["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/yaml", ""])
def test_wrong_content_type_is_415(h: Harness, content_type: str) -> None:
    resp = h.post(admission_review(), content_type=content_type)
    assert resp.status_code == 415
    assert "Content-Type must be application/json" in resp.get_json()["message"]
    assert h.count("415", "rejected") == 1


def test_json_with_charset_is_accepted(h: Harness) -> None:
    resp = h.post(admission_review(), content_type="application/json; charset=utf-8")
    assert resp.status_code == 200


def test_body_over_7_mib_is_413(h: Harness) -> None:
    body = admission_review()
    body["request"]["object"]["metadata"]["annotations"] = {"big": "x" * MAX_BODY}
    resp = h.post(body)
    assert resp.status_code == 413
    assert resp.get_json()["code"] == 413
    assert h.count("413", "rejected") == 1


def test_body_just_under_the_limit_is_admitted(h: Harness) -> None:
    body = admission_review()
    body["request"]["object"]["metadata"]["annotations"] = {"big": "x" * (MAX_BODY - 20_000)}
    assert h.post(body).status_code == 200


def test_get_on_mutate_is_405(h: Harness) -> None:
    assert h.client.get("/mutate").status_code == 405


# ----------------------------------------------------------------- fail open


class FailingOracle:
    """An oracle that raises, standing in for a probe that breaks (a bug, a timeout).

    A stand-in because no real failing registry prober exists yet; the rest of
    the path (planner, review, view, audit, metrics) is real.
    """

    def check(self, ref: ImageRef) -> Verdict:
        raise RuntimeError(f"probe of {ref.host} blew up")


def test_internal_error_fails_open_counted_and_audited(
    tmp_path: Path, tls_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = make(tmp_path, tls_dir, oracle=FailingOracle())
    with caplog.at_level(logging.ERROR, logger="ecr_webhook"):
        resp = h.post(admission_review(uid="boom"))
    assert resp.status_code == 200
    doc = resp.get_json()
    assert doc["response"]["uid"] == "boom"
    assert doc["response"]["allowed"] is True
    assert "patch" not in doc["response"]
    assert len(doc["response"]["warnings"]) == 1
    assert "internal error" in doc["response"]["warnings"][0]
    assert "Traceback" not in resp.get_data(as_text=True)
    assert h.count("200", "error") == 1
    assert h.sample("ecr_webhook_errors_total", stage="admit") == 1
    rec = h.records()[-1]
    assert rec["decision"] == "error"
    assert "RuntimeError: probe of" in rec["error"]
    assert any("probe of" in str(getattr(r, "err", "")) for r in caplog.records)
    # The worker lives on: the next request is served too.
    assert h.post(admission_review()).status_code == 200


def test_audit_write_failure_still_answers_and_is_counted(tmp_path: Path, tls_dir: Path) -> None:
    """A sink that raises stands in for a full disk, which cannot be produced here."""

    class BrokenSink:
        def write(self, record: object, *, defer: bool = False) -> None:
            raise OSError(28, "No space left on device")

        def flush(self, wait: bool = False) -> None:
            return None

        def pending(self) -> bool:
            return False

    policy = ConfigMapDir(tmp_path / "policy")
    policy.update("kind: RewritePolicy\n")
    metrics = Metrics()
    config = ServeConfig(
        cert_file=str(tls_dir / "tls.crt"),
        key_file=str(tls_dir / "tls.key"),
        policy_file=str(policy.path),
        region=REGION,
    )
    app = create_app(config, metrics=metrics, audit=BrokenSink(), env={})
    resp = app.test_client().post("/mutate", json=admission_review())
    assert resp.status_code == 200
    assert resp.get_json()["response"]["patchType"] == "JSONPatch"
    assert metrics.registry.get_sample_value("ecr_webhook_errors_total", {"stage": "audit"}) == 1


# ----------------------------------------------------------------- health and readiness


def test_healthz_and_readyz(h: Harness) -> None:
    assert h.client.get("/healthz").status_code == 200
    resp = h.client.get("/readyz")
    assert resp.status_code == 200, resp.get_data(as_text=True)


def test_not_ready_with_an_expired_certificate(tmp_path: Path, tls_dir: Path) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    holder = CertificateHolder(
        str(tls_dir / "tls.crt"), str(tls_dir / "tls.key"), now=lambda: later
    )
    h = make(tmp_path, tls_dir, certificate=holder)
    resp = h.client.get("/readyz")
    assert resp.status_code == 503
    assert "expired" in resp.get_data(as_text=True)


def test_not_ready_without_a_certificate(tmp_path: Path, tls_dir: Path) -> None:
    holder = CertificateHolder(str(tmp_path / "missing.crt"), str(tmp_path / "missing.key"))
    h = make(tmp_path, tls_dir, certificate=holder)
    resp = h.client.get("/readyz")
    assert resp.status_code == 503
    assert "missing.crt" in resp.get_data(as_text=True)
    # Admissions are still answered: readiness only steers the Service.
    assert h.post(admission_review()).status_code == 200


# ----------------------------------------------------------------- policy hot reload


def test_policy_swap_is_picked_up_by_the_next_request(h: Harness) -> None:
    first = h.post(admission_review()).get_json()["response"]
    assert all(TARGET_REGISTRY in w for w in first["warnings"])
    h.policy.update(MIRROR_POLICY)
    pod = aws_node_pod()
    doc = h.post(admission_review(pod)).get_json()["response"]
    patched = jsonpatch.apply_patch(pod, decode_patch(doc))
    assert images(patched)["aws-node"] == \
        f"{MIRROR}/eks-mirror/amazon-k8s-cni:v1.19.2-eksbuild.1"  # fmt: skip
    assert h.sample("ecr_webhook_policy_reloads_total", result="success") == 1


def test_invalid_policy_keeps_the_last_good_one(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.policy.update(MIRROR_POLICY)
    assert h.post(admission_review()).status_code == 200
    with caplog.at_level(logging.ERROR, logger="ecr_webhook"):
        h.policy.update("kind: RewritePolicy\ntargets: [{type: mirror, registry: 'not a host'}]\n")
        pod = aws_node_pod()
        for _ in range(3):
            doc = h.post(admission_review(pod)).get_json()["response"]
    patched = jsonpatch.apply_patch(pod, decode_patch(doc))
    assert images(patched)["aws-node"].startswith(f"{MIRROR}/eks-mirror/")
    # Logged and counted once per change, not once per request.
    assert h.sample("ecr_webhook_policy_reloads_total", result="failure") == 1
    rejected = [r for r in caplog.records if "policy rejected" in r.getMessage()]
    assert len(rejected) == 1
    assert "targets[0].registry" in rejected[0].err  # type: ignore[attr-defined]
    # A later valid policy is taken again.
    h.policy.update("kind: RewritePolicy\n")
    doc = h.post(admission_review(pod)).get_json()["response"]
    assert TARGET_REGISTRY in decode_patch(doc)[0]["value"]
    assert h.sample("ecr_webhook_policy_reloads_total", result="success") == 2


def test_invalid_initial_policy_refuses_to_start(tmp_path: Path, tls_dir: Path) -> None:
    with pytest.raises(PolicyError, match="preferMirror"):
        make(tmp_path, tls_dir, policy_text="kind: RewritePolicy\npreferMirror: true\n")


def test_log_lines_are_klog_json(capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from webhook import logs

    stream = io.StringIO()
    log = logs.configure(verbosity=1, stream=stream)
    try:
        log.info("shown", v=1, uid="a")
        log.info("hidden", v=2)
        log.error("failed", err=ValueError("bad"), uid="b")
    finally:
        logs.attach(logging.getLogger(logs.LOGGER_NAME), 0, io.StringIO())
        logging.getLogger(logs.LOGGER_NAME).setLevel(logging.NOTSET)
        logging.getLogger(logs.LOGGER_NAME).propagate = True
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == ["shown", "failed"]
    assert lines[0]["v"] == 1 and lines[0]["uid"] == "a" and isinstance(lines[0]["ts"], float)
    assert lines[1]["err"] == "ValueError: bad" and "v" not in lines[1]
    assert isinstance(Log().verbosity, int)


# ----------------------------------------------------------------- deferred audit writes


class SpySink(AuditLog):
    """A real AuditLog that remembers each write's ``defer``."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.deferred: list[bool] = []

    def write(self, record: Mapping[str, Any], *, defer: bool = False) -> None:
        self.deferred.append(defer)
        super().write(record, defer=defer)


def test_records_wait_only_while_the_worker_has_other_requests(
    tmp_path: Path, tls_dir: Path
) -> None:
    """The worker's backlog (server.WebhookWorker.backlog, handed over through the
    "backlog" hook) decides: a record waits while other requests are pending, and
    the last admission out writes them all before it answers."""
    sink = SpySink(str(tmp_path / "audit.log"))
    h = make(tmp_path, tls_dir, audit=sink)
    backlog: collections.deque[None] = collections.deque([None, None, None])
    h.app.extensions["ecr_webhook"]["backlog"](backlog)  # this request and two others
    for n in range(3):
        assert h.post(admission_review(uid=f"busy-{n}")).status_code == 200
    assert sink.deferred == [True, True, True]
    backlog.clear()
    backlog.append(None)  # only the request itself
    assert h.post(admission_review(uid="last")).status_code == 200
    assert sink.deferred[-1] is False
    # All four are written before the last answer: nothing left waiting.
    assert [r["auditID"] for r in h.records()] == ["busy-0", "busy-1", "busy-2", "last"]
    assert not sink.pending()


def test_records_left_waiting_by_a_busy_worker_are_written_by_the_flusher(
    tmp_path: Path, tls_dir: Path
) -> None:
    """Other requests stay pending (a long admission): the flusher writes the records."""
    h = make(tmp_path, tls_dir)
    backlog: collections.deque[None] = collections.deque([None, None])
    h.app.extensions["ecr_webhook"]["backlog"](backlog)
    for n in range(3):
        assert h.post(admission_review(uid=f"waiting-{n}")).status_code == 200
    wait_until(lambda: len(h.records()) == 3, 5, "the deferred records written by the flusher")
    assert sorted(r["auditID"] for r in h.records()) == ["waiting-0", "waiting-1", "waiting-2"]


class Shrinking:
    """A backlog whose length is read from ``lengths``, one per ``len()``: the
    other requests finish while this one is being answered."""

    def __init__(self, *lengths: int) -> None:
        self.lengths = list(lengths)

    def __len__(self) -> int:
        return self.lengths.pop(0) if len(self.lengths) > 1 else self.lengths[0]


def test_the_last_admission_out_writes_its_own_deferred_record(
    tmp_path: Path, tls_dir: Path
) -> None:
    """Deferred while another request was pending, which then finished first: the
    record is written when this admission ends, before its answer."""
    sink = SpySink(str(tmp_path / "audit.log"))
    h = make(tmp_path, tls_dir, audit=sink)
    h.app.extensions["ecr_webhook"]["backlog"](Shrinking(2, 1))  # at the record, at the end
    assert h.post(admission_review(uid="deferred-then-alone")).status_code == 200
    assert sink.deferred == [True]
    assert [r["auditID"] for r in h.records()] == ["deferred-then-alone"]
