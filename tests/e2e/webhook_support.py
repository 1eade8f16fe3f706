"""Helpers for tests/e2e/test_webhook.py (the webhook registered in a real kube-apiserver).

Real parts only: the project's own MutatingWebhookConfiguration manifest with a
``url`` clientConfig, the audit file ``ecr-webhook serve`` writes, the
``Warning`` headers exactly as the kube-apiserver sends them, and a second real
HTTPS admission webhook (``Labeler``) for the reinvocation scenario.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.serving import REGION, ServerProcess, ecr_webhook, free_port
from webhook import certs
from webhook.core.patch import escape

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "manifests" / "base" / "mutatingwebhookconfiguration.yaml"

# ------------------------------------------------------------ webhook configuration


def project_configuration(
    name: str, host_port: str, ca_pem: bytes, object_selector: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """manifests/base/mutatingwebhookconfiguration.yaml, reachable at ``https://host_port``.

    Only ``metadata.name`` and ``clientConfig`` change: ``service`` becomes a
    ``url`` with the manifest's own path (the control plane has no kubelet or
    Service routing), and ``caBundle`` is ``ca_pem``.  Rules, matchConditions,
    namespaceSelector, objectSelector, failurePolicy, reinvocationPolicy and
    timeoutSeconds stay the manifest's.  ``object_selector`` (a test label)
    is ANDed into each webhook's objectSelector when given.
    """
    doc: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    assert doc["kind"] == "MutatingWebhookConfiguration", MANIFEST
    doc["metadata"] = {"name": name}
    for hook in doc["webhooks"]:
        service = hook["clientConfig"].pop("service")
        hook["clientConfig"]["url"] = f"https://{host_port}{service.get('path', '')}"
        hook["clientConfig"]["caBundle"] = base64.b64encode(ca_pem).decode()
        if object_selector:
            selector = hook.setdefault("objectSelector", {})
            selector.setdefault("matchLabels", {}).update(object_selector)
    return doc


# --------------------------------------------------------------------- the server


@dataclass
class Served:
    """A running ``ecr-webhook serve`` and what a test needs to reach it."""

    server: ServerProcess
    port: int
    audit: AuditFile
    ca_pem: bytes
    ca_file: Path


def serve_webhook(tmp: Path) -> Served:
    """``ecr-webhook certs generate``, then ``ecr-webhook serve --region ap-southeast-4``
    on 127.0.0.1, auditing to a file.  Started, not yet ready: the caller waits
    (``server.wait_ready``) inside its own cleanup, and stops the server."""
    cert_dir = tmp / "certs"
    generated = subprocess.run(
        [*ecr_webhook(), "certs", "generate", "--out-dir", str(cert_dir),
         "--ip", "127.0.0.1", "--dns", "localhost"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert generated.returncode == 0, f"certs generate: {generated.stderr}"
    port, metrics_port = free_port(), free_port()
    audit = AuditFile(tmp / "audit.jsonl")
    server = ServerProcess(
        [*ecr_webhook(), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", str(metrics_port), "--cert-file", str(cert_dir / "tls.crt"),
         "--key-file", str(cert_dir / "tls.key"), "--region", REGION,
         "--audit-log", str(audit.path), "--workers", "1", "--threads", "4"],
        stdout=tmp / "server.out", stderr=tmp / "server.err",
    )  # fmt: skip
    ca_file = cert_dir / "ca.crt"
    return Served(server, port, audit, ca_file.read_bytes(), ca_file)


# ----------------------------------------------------------------------- audit file


class AuditFile:
    """The JSON-lines audit file of ``ecr-webhook serve --audit-log FILE``.

    A worker answering one admission at a time writes its record before it
    answers, so once an API call made alone returns, its record is in the file
    (records of concurrent admissions may follow about 50 ms later: README,
    "Audit records"; these tests make their API calls one at a time).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        text = self.path.read_text() if self.path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def for_pod(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r["objectRef"]["namespace"] == namespace and r["objectRef"]["name"] == name
        ]

    def names(self) -> set[str]:
        return {r["objectRef"]["name"] for r in self.records()}


# ------------------------------------------------------------------- Warning header

# k8s.io/apimachinery/pkg/util/net NewWarningHeader: `<code> <agent> "<text>"`,
# with `"` and `\` in the text escaped by a backslash (RFC 7234 section 5.5).
_WARNING = re.compile(r'^(\d{3}) (\S+) "((?:[^"\\]|\\.)*)"(?: "[^"]*")?$')


def parse_warning_headers(values: Iterable[str]) -> list[tuple[int, str, str]]:
    """``(code, agent, text)`` of each ``Warning`` header value.

    Go writes header values as UTF-8 bytes; Python's http.client decodes
    header bytes as Latin-1, so the text is re-decoded.
    """
    parsed = []
    for value in values:
        text = value.encode("latin-1").decode("utf-8")
        match = _WARNING.match(text)
        assert match, f"not a Warning header: {text!r}"
        code, agent, quoted = match.groups()
        parsed.append((int(code), agent, re.sub(r"\\(.)", r"\1", quoted)))
    return parsed


# ------------------------------------------------------------------------ objects


def pod_from_template(template: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A Pod as a controller creates it from ``spec.template`` (labels and spec)."""
    meta = copy.deepcopy(dict(template.get("metadata") or {}))
    meta.pop("creationTimestamp", None)
    meta["name"] = name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": copy.deepcopy(template["spec"])}  # fmt: skip


def simple_pod(name: str, images: Mapping[str, str],
               labels: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels or {})},
        "spec": {"containers": [{"name": n, "image": i} for n, i in images.items()]},
    }


def all_images(pod: Mapping[str, Any]) -> dict[str, str]:
    spec = pod["spec"]
    return {c["name"]: c["image"]
            for kind in ("initContainers", "containers", "ephemeralContainers")
            for c in spec.get(kind) or []}  # fmt: skip


# ----------------------------------------------------------- a second real webhook


class ReviewEndpoint:
    """An HTTPS AdmissionReview endpoint on 127.0.0.1, for the tests' own webhooks.

    ``respond(review)`` gets every decoded AdmissionReview and returns the
    ``response`` member (``uid`` and ``allowed`` at least); the endpoint wraps it
    in an AdmissionReview of the request's apiVersion.  Its certificate comes
    from ``webhook.certs``; ``ca_pem`` is the caBundle to register.
    """

    def __init__(self, tmp: Path, respond: Callable[[dict[str, Any]], dict[str, Any]],
                 path: str = "/mutate") -> None:  # fmt: skip
        bundle = certs.build_certificate(["localhost"], ["127.0.0.1"], days=1)
        certs.write_bundle(bundle, tmp)
        self.ca_pem = bundle.ca_pem

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = json.dumps({"apiVersion": body["apiVersion"], "kind": "AdmissionReview",
                                     "response": respond(body)}).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tmp / certs.CERT_FILE), str(tmp / certs.KEY_FILE))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Labeler:
    """A mutating admission webhook on https://127.0.0.1 that adds one label.

    It answers every AdmissionReview with ``allowed: true`` and, when the pod
    lacks ``label``, a JSONPatch adding it (so the object changes and the
    kube-apiserver reinvokes earlier webhooks with ``reinvocationPolicy:
    IfNeeded``).  Every call is recorded with the images the pod had then.
    """

    def __init__(self, tmp: Path, label: str, value: str) -> None:
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.label, self.value = label, value
        self.endpoint = ReviewEndpoint(tmp, self._respond, "/label")
        self.ca_pem, self.url = self.endpoint.ca_pem, self.endpoint.url

    def _respond(self, body: dict[str, Any]) -> dict[str, Any]:
        req = body["request"]
        pod = req["object"]
        labels = pod["metadata"].get("labels") or {}
        call = {"uid": req["uid"], "name": req.get("name"),
                "images": all_images(pod), "labels": dict(labels)}  # fmt: skip
        with self._lock:
            self.calls.append(call)
        response: dict[str, Any] = {"uid": req["uid"], "allowed": True}
        if labels.get(self.label) != self.value:
            op: dict[str, Any] = (
                {"op": "add", "path": f"/metadata/labels/{escape(self.label)}", "value": self.value}
                if labels
                else {"op": "add", "path": "/metadata/labels", "value": {self.label: self.value}}
            )
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps([op]).encode()).decode()
        return response

    def calls_for(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [c for c in self.calls if c["name"] == name]

    def close(self) -> None:
        self.endpoint.close()
