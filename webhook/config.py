"""Server configuration: one immutable object, read once, injected into the app.

Never read settings from module globals at import time (STYLE.md habit 8; the
counter-example is imageswap-webhook).  ``create_app(config)`` and the gunicorn
launcher take a ``ServeConfig``; the CLI builds it from flags and environment.
"""

from __future__ import annotations

from dataclasses import dataclass

# The kube-apiserver refuses request bodies over 3 MiB (apiserver
# maxRequestBodyBytes default); an AdmissionReview can carry both object and
# oldObject plus its envelope, so 7 MiB bounds every genuine review.
MAX_BODY = 7 * 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    host: str = "0.0.0.0"  # nosec B104  # hostNetwork; the apiserver dials the node's address
    port: int = 8443
    metrics_port: int = 9090
    cert_file: str = "/etc/ecr-webhook/tls/tls.crt"
    key_file: str = "/etc/ecr-webhook/tls/tls.key"
    policy_file: str | None = None
    region: str | None = None
    audit_log: str = "-"
    audit_max_bytes: int = 100 * 1024 * 1024
    audit_backups: int = 5
    workers: int = 2
    threads: int = 8
    dev: bool = False
    log_verbosity: int = 0
    # A request (headers and body) must arrive within this many seconds of its
    # first byte, or its connection is closed (webhook.server.WebhookWorker).
    # The kube-apiserver sends a whole review at once; 5 s is what its own
    # webhook timeout (timeoutSeconds, 5 in our configuration) allows anyway.
    read_timeout: float = 5.0
    # PEM CA bundle: when set, clients must present a certificate it signed.
    client_ca: str | None = None
    # Time the server may spend probing registries while answering one
    # AdmissionReview, unless --probe-timeout or the policy's
    # probe.timeoutSeconds say otherwise (at most 3 s).  The
    # MutatingWebhookConfiguration's timeoutSeconds (5) must exceed it;
    # tests/test_manifests.py keeps the two in step.
    probe_budget_seconds: float = 1.0
    # Availability probing (issue 8): --probe, --fallback-region,
    # --registry-endpoint HOST=URL, --registry-ca, --probe-timeout.
    probe: bool = False
    fallback_regions: tuple[str, ...] = ()
    registry_endpoints: tuple[str, ...] = ()
    registry_ca: str | None = None
    probe_timeout: float | None = None
