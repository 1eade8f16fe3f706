"""Issue 8, "Through the real kube-apiserver": a pod created through the API gets the
probed target.

Real parts: the kube-apiserver and etcd of tests/e2e, ``ecr-webhook serve
--probe`` under gunicorn with TLS registered from the project's own
MutatingWebhookConfiguration (``url`` clientConfig), Debian's
``docker-registry`` with TLS and htpasswd standing in for the eu-central-1 and
us-west-2 EKS registries (``--registry-endpoint``), moto's ECR API for the
tokens.  The seed case: the eu-central-1 registry refuses the token (401), the
us-west-2 one serves the VPC CNI image; the stored pod runs the us-west-2 image.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.e2e.controlplane import ControlPlane
from tests.e2e.webhook_support import (
    AuditFile,
    all_images,
    parse_warning_headers,
    project_configuration,
    simple_pod,
)
from tests.registry_conftest import CNI_TAG, ProbeWorld
from tests.registry_support import eks_registry_host
from tests.serving import ORIGINALS, ServerProcess, apiserver_tls_context, ecr_webhook, free_port
from webhook import certs

pytestmark = pytest.mark.e2e

EUC1 = eks_registry_host("eu-central-1")
USW2 = eks_registry_host("us-west-2")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class ProbeCluster:
    core: client.CoreV1Api
    audit: AuditFile
    server: ServerProcess

    def namespace(self) -> str:
        name = unique("e2e-probe")
        self.core.create_namespace(
            client.V1Namespace.model_validate({"metadata": {"name": name}}),
            _preload_content=False)  # fmt: skip
        return name

    def create_pod(self, ns: str, pod: dict[str, Any], dry_run: bool = False) -> Any:
        return self.core.create_namespaced_pod(
            ns, client.V1Pod.model_validate(pod), dry_run="All" if dry_run else None,
            _preload_content=False,
        )  # fmt: skip

    def read_pod(self, ns: str, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(
            self.core.read_namespaced_pod(name, ns, _preload_content=False).data)
        return doc


@pytest.fixture(scope="module")
def probe_cluster(control_plane: ControlPlane, probe_world: ProbeWorld,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProbeCluster]:  # fmt: skip
    """``ecr-webhook serve --probe`` for a cluster in eu-central-1, registered."""
    tmp = tmp_path_factory.mktemp("probe-webhook")
    bundle = certs.build_certificate(["localhost"], ["127.0.0.1"])
    tls = certs.write_bundle(bundle, tmp / "tls")
    port, metrics_port = free_port(), free_port()
    audit = AuditFile(tmp / "audit.jsonl")
    server = ServerProcess(
        [*ecr_webhook(), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", str(metrics_port), "--cert-file", str(tls["tls.crt"]),
         "--key-file", str(tls["tls.key"]), "--region", "eu-central-1",
         "--audit-log", str(audit.path), "--workers", "1", "--threads", "4",
         "--probe", "--fallback-region", "us-west-2",
         "--registry-ca", str(probe_world.ca_file),
         *probe_world.endpoints({EUC1: probe_world.refusing.url, USW2: probe_world.good.url})],
        env=dict(probe_world.env), stdout=tmp / "server.out", stderr=tmp / "server.err",
    )  # fmt: skip
    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))  # type: ignore[no-untyped-call]
    admission = client.AdmissionregistrationV1Api(api)
    name = unique("e2e-probe-webhook")
    c = ProbeCluster(client.CoreV1Api(api), audit, server)
    try:
        server.wait_ready(port, apiserver_tls_context(tls["ca.crt"]), timeout=60)
        admission.create_mutating_webhook_configuration(
            client.V1MutatingWebhookConfiguration.model_validate(
                project_configuration(name, f"127.0.0.1:{port}", bundle.ca_pem)),
            _preload_content=False)  # fmt: skip
        ns = c.namespace()
        deadline = time.monotonic() + 60
        while True:  # the apiserver loads webhook configurations asynchronously
            probe = unique("warmup")
            c.create_pod(ns, simple_pod(probe, {"c": f"{USW2}/eks/pause:3.10"}), dry_run=True)
            assert server.proc.poll() is None, server.stderr()
            if probe in audit.names():
                break
            assert time.monotonic() < deadline, "the webhook configuration never took effect"
            time.sleep(0.2)
        yield c
    finally:
        try:
            admission.delete_mutating_webhook_configuration(name, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise
        finally:
            server.stop()
            api.close()


def test_pod_created_through_the_api_gets_the_probed_target(probe_cluster: ProbeCluster) -> None:
    c = probe_cluster
    ns = c.namespace()
    name = unique("aws-node")
    original = f"{EUC1}/amazon-k8s-cni:{CNI_TAG}"
    response = c.create_pod(ns, simple_pod(name, {"aws-node": original}))
    assert response.status == 201
    stored = c.read_pod(ns, name)
    assert all_images(stored) == {"aws-node": f"{USW2}/amazon-k8s-cni:{CNI_TAG}"}
    assert json.loads(stored["metadata"]["annotations"][ORIGINALS]) == {"aws-node": original}

    (record,) = c.audit.for_pod(ns, name)
    assert record["decision"] == "patched"
    (container,) = record["containers"]
    assert container["from"] == original and container["to"] == f"{USW2}/amazon-k8s-cni:{CNI_TAG}"
    assert container["reason"] == "unauthorized", container
    outcomes = {p["candidate"].split("/", 1)[0]: p["outcome"] for p in container["probes"]}
    assert outcomes == {EUC1: "unauthorized", USW2: "available"}
    # What reached the client as Warning headers is what the audit record says.
    texts = [t for _, _, t in parse_warning_headers(response.headers.getlist("Warning"))]
    assert texts == record["warnings"]


def test_pod_available_at_its_own_registry_is_stored_unchanged(
    probe_cluster: ProbeCluster, probe_world: ProbeWorld,
) -> None:
    """The us-west-2 image is proven available: the stored pod keeps it."""
    c = probe_cluster
    ns = c.namespace()
    name = unique("kept")
    image = f"{USW2}/eks/pause:3.10"
    assert c.create_pod(ns, simple_pod(name, {"pause": image})).status == 201
    assert all_images(c.read_pod(ns, name)) == {"pause": image}
    (record,) = c.audit.for_pod(ns, name)
    assert record["containers"][0]["probes"][0]["outcome"] == "available"
