"""Helpers for tests/e2e/test_daemonset.py: a DaemonSet's Pods made by the real controller.

Real parts only: kube-controller-manager's DaemonSet controller creates the Pods
through the kube-apiserver, which sends them to ``ecr-webhook serve`` over TLS,
registered with the project's own MutatingWebhookConfiguration
(:func:`tests.e2e.webhook_support.project_configuration`).  The only stand-ins
are the Node objects: no kubelet runs here, so :func:`create_ready_node` writes
what a kubelet would (labels, a Ready condition, capacity).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.e2e.controlplane import ControlPlane
from tests.e2e.webhook_support import AuditFile, project_configuration, serve_webhook, simple_pod
from tests.serving import ServerProcess, apiserver_tls_context

MERGE_PATCH = "application/merge-patch+json"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def raw(response: Any) -> Any:
    """The JSON body of a ``_preload_content=False`` response."""
    return json.loads(response.data)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll ``condition()`` every 0.2 s; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f}s"
        time.sleep(0.2)


# --------------------------------------------------------------------------- nodes


def create_ready_node(core: client.CoreV1Api, name: str) -> dict[str, Any]:
    """Create a Node as a linux/amd64 kubelet registers it, Ready and untainted.

    Three writes, as in a real cluster: the kubelet creates the Node with its
    well-known labels (k8s.io/api core/v1 well_known_labels.go), then posts
    its status (Ready condition, capacity, allocatable).  On create the
    TaintNodesByCondition admission plugin adds ``node.kubernetes.io/not-ready:
    NoSchedule`` (k8s.io/kubernetes plugin/pkg/admission/nodetaint); the node
    lifecycle controller removes it once the kubelet reports Ready.  That
    controller is not run here (it would also mark the Node unreachable, as no
    kubelet renews its Lease), so the taint is removed directly.  DaemonSet
    Pods do not tolerate it (k8s.io/kubernetes pkg/controller/daemon/util
    AddOrUpdateDaemonPodTolerations adds only NoExecute not-ready).
    """
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
    }
    core.create_node(
        client.V1Node.model_validate({"metadata": {"name": name, "labels": labels}}),
        _preload_content=False,
    )
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    resources = {"cpu": "2", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi"}
    status = {
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "capacity": resources,
            "allocatable": resources,
            "nodeInfo": {"operatingSystem": "linux", "architecture": "amd64"},
        }
    }
    core.patch_node_status(name, status, _content_type=MERGE_PATCH, _preload_content=False)
    # A merge patch replaces the list: no taint left.
    core.patch_node(
        name, {"spec": {"taints": None}}, _content_type=MERGE_PATCH, _preload_content=False
    )
    node: dict[str, Any] = raw(core.read_node(name, _preload_content=False))
    return node


def is_ready(node: Mapping[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


# ------------------------------------------------------------------- DaemonSet pods


def retarget_images(daemonset: dict[str, Any], old: str, new: str) -> dict[str, str]:
    """Move every image of the DaemonSet's template from registry ``old`` to ``new``.

    Returns the new images by container name.  Every image must be on ``old``:
    a manifest that changed upstream must fail here, not pass unnoticed.
    """
    spec = daemonset["spec"]["template"]["spec"]
    images = {}
    for kind in ("initContainers", "containers"):
        for container in spec.get(kind) or []:
            image = container["image"]
            assert image.startswith(old + "/"), image
            container["image"] = new + image.removeprefix(old)
            images[container["name"]] = container["image"]
    return images


def controlled_pods(core: client.CoreV1Api, namespace: str, uid: str) -> list[dict[str, Any]]:
    """The stored Pods whose controller is the object with ``uid``."""
    pods = raw(core.list_namespaced_pod(namespace, _preload_content=False))["items"]
    return [
        p
        for p in pods
        if any(
            r.get("controller") and r["uid"] == uid
            for r in p["metadata"].get("ownerReferences") or []
        )
    ]


def target_node(pod: Mapping[str, Any]) -> str:
    """The node a DaemonSet Pod is for.

    The DaemonSet controller leaves ``nodeName`` to the scheduler and pins the
    Pod with a required node affinity on ``metadata.name`` (k8s.io/kubernetes
    pkg/controller/daemon/util ReplaceDaemonSetPodNodeNameNodeAffinity).
    """
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    names = [
        value
        for term in terms
        for field in term.get("matchFields") or []
        if field["key"] == "metadata.name" and field["operator"] == "In"
        for value in field["values"]
    ]
    assert len(names) == 1, terms
    return str(names[0])


# ------------------------------------------------------------------------ webhook


@dataclass
class Webhook:
    """``ecr-webhook serve`` on 127.0.0.1, registered in the cluster."""

    server: ServerProcess
    port: int
    audit: AuditFile
    config_name: str

    def alive(self) -> None:
        assert self.server.proc.poll() is None, f"ecr-webhook serve died: {self.server.stderr()}"


@contextmanager
def registered_webhook(cp: ControlPlane, tmp: Path, probe_image: str) -> Iterator[Webhook]:
    """Run ``ecr-webhook serve --region ap-southeast-4`` and register the project's config.

    Certificates come from ``ecr-webhook certs generate``; the configuration is
    manifests/base's with a ``url`` clientConfig (webhook_support).  Yields once
    the kube-apiserver actually calls the webhook (it loads configurations
    asynchronously): a server-side dry-run Pod with ``probe_image`` in
    ``default`` is repeated until the audit file has it.  The configuration is
    removed and the server stopped on exit.
    """
    served = serve_webhook(tmp)
    server, port, audit, ca_pem = served.server, served.port, served.audit, served.ca_pem
    api = config.new_client_from_config(config_file=str(cp.kubeconfig))  # type: ignore[no-untyped-call]
    admission = client.AdmissionregistrationV1Api(api)
    core = client.CoreV1Api(api)
    hook = Webhook(server, port, audit, unique("e2e-ecr-webhook"))
    try:
        server.wait_ready(port, apiserver_tls_context(served.ca_file))
        admission.create_mutating_webhook_configuration(
            client.V1MutatingWebhookConfiguration.model_validate(
                project_configuration(hook.config_name, f"127.0.0.1:{port}", ca_pem)
            ),
            _preload_content=False,
        )
        # With the ServiceAccount admission plugin on, a Pod needs its
        # ServiceAccount; the ServiceAccount controller creates `default`.
        wait_for(lambda: _exists(lambda: core.read_namespaced_service_account(
            "default", "default", _preload_content=False)),
            "the ServiceAccount controller never created default/default")  # fmt: skip

        def called() -> bool:
            probe = unique("probe")
            core.create_namespaced_pod(
                "default", client.V1Pod.model_validate(simple_pod(probe, {"c": probe_image})),
                dry_run="All", _preload_content=False,
            )  # fmt: skip
            hook.alive()
            return probe in audit.names()

        wait_for(called, "the webhook configuration never took effect")
        yield hook
    finally:
        try:
            admission.delete_mutating_webhook_configuration(
                hook.config_name, _preload_content=False
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
        finally:
            server.stop()
            api.close()


def _exists(read: Callable[[], object]) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True
