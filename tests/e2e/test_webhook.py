"""``ecr-webhook serve`` registered in a real kube-apiserver (issue 4, section 3).

The module starts the real server (gunicorn over TLS on 127.0.0.1, certificates
from ``ecr-webhook certs generate``) and registers the project's own
MutatingWebhookConfiguration (manifests/base) with a ``url`` clientConfig and
the generated CA as ``caBundle``; everything else in it is the manifest's.
Objects are created through the Python kubernetes client; what the webhook
did is read back from the API (the stored object, the ``Warning`` headers)
and from its audit file.

The control plane has no controller-manager or kubelet: pods are stored, never
run, and namespaces are left behind (a deleted one would hang in Terminating).

The install manifest's server-side dry run (issue scenario "Manifests") is
test_install.py::test_install_yaml_passes_server_side_dry_run; it is not
repeated here.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.e2e.controlplane import ControlPlane
from tests.e2e.webhook_support import (
    AuditFile,
    Labeler,
    all_images,
    parse_warning_headers,
    pod_from_template,
    project_configuration,
    serve_webhook,
    simple_pod,
)
from tests.serving import (
    ORIGINALS,
    SOURCE_REGISTRY,
    TARGET_REGISTRY,
    ServerProcess,
    apiserver_tls_context,
    free_port,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "aws-node-ap-southeast-4.yaml"
CORPUS_CNI = Path("corpus") / "vpc-cni" / "v1.19.6__config__master__aws-k8s-cni.yaml"
SOURCE_ACCOUNT, TARGET_ACCOUNT = SOURCE_REGISTRY.split(".")[0], TARGET_REGISTRY.split(".")[0]
WRONG_IMAGE = f"{SOURCE_REGISTRY}/eks/pause:3.10"
TEST_LABEL = "e2e.ecr-webhook.io/case"
OWN_NAMESPACE = "ecr-webhook"  # the manifest's namespaceSelector excludes it


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def raw(response: Any) -> dict[str, Any]:
    doc = json.loads(response.data)
    assert isinstance(doc, dict)
    return doc


def rewritten(image: str) -> str:
    """What the webhook must make of a wrong-account ap-southeast-4 image."""
    assert image.startswith(SOURCE_REGISTRY + "/"), image
    return TARGET_REGISTRY + image.removeprefix(SOURCE_REGISTRY)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll until ``condition()``: the apiserver loads webhook configurations asynchronously."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f}s"
        time.sleep(0.2)


@dataclass
class Cluster:
    """The running webhook, registered, and API clients as admin."""

    cp: ControlPlane
    api: client.ApiClient
    core: client.CoreV1Api
    apps: client.AppsV1Api
    batch: client.BatchV1Api
    admission: client.AdmissionregistrationV1Api
    server: ServerProcess
    port: int
    ca_pem: bytes
    audit: AuditFile
    config_name: str

    def namespace(self, prefix: str = "e2e-webhook") -> str:
        name = unique(prefix)
        self.ensure_namespace(name)
        return name

    def ensure_namespace(self, name: str) -> None:
        body = client.V1Namespace.model_validate({"metadata": {"name": name}})
        try:
            self.core.create_namespace(body, _preload_content=False)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def create_pod(self, ns: str, pod: dict[str, Any], dry_run: bool = False) -> Any:
        """POST the pod; the raw urllib3 response (status, headers, JSON body)."""
        return self.core.create_namespaced_pod(
            ns, client.V1Pod.model_validate(pod), dry_run="All" if dry_run else None,
            _preload_content=False,
        )  # fmt: skip

    def read_pod(self, ns: str, name: str) -> dict[str, Any]:
        return raw(self.core.read_namespaced_pod(name, ns, _preload_content=False))

    def register(self, doc: dict[str, Any]) -> None:
        self.admission.create_mutating_webhook_configuration(
            client.V1MutatingWebhookConfiguration.model_validate(doc), _preload_content=False
        )

    def unregister(self, name: str) -> None:
        try:
            self.admission.delete_mutating_webhook_configuration(name, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def server_alive(self) -> None:
        assert self.server.proc.poll() is None, f"ecr-webhook serve died: {self.server.stderr()}"


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:  # fmt: skip
    """``ecr-webhook serve`` on 127.0.0.1, registered from the project's manifest."""
    served = serve_webhook(tmp_path_factory.mktemp("webhook"))
    server, port, audit, ca_pem = served.server, served.port, served.audit, served.ca_pem
    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))  # type: ignore[no-untyped-call]
    # Sorts before the other configurations of this module: the apiserver
    # calls webhooks in configuration-name order (reinvocation test).
    name = unique("a-e2e-ecr-webhook")
    c = Cluster(control_plane, api, client.CoreV1Api(api), client.AppsV1Api(api),
                client.BatchV1Api(api), client.AdmissionregistrationV1Api(api), server, port,
                ca_pem, audit, name)  # fmt: skip
    try:
        server.wait_ready(port, apiserver_tls_context(served.ca_file))
        c.register(project_configuration(name, f"127.0.0.1:{port}", ca_pem))
        probe_ns = c.namespace("e2e-probe")

        def called() -> bool:
            probe = unique("probe")
            c.create_pod(probe_ns, simple_pod(probe, {"c": WRONG_IMAGE}), dry_run=True)
            c.server_alive()
            return probe in audit.names()

        wait_for(called, "the webhook configuration never took effect")
        yield c
    finally:
        try:
            c.unregister(name)
        finally:
            server.stop()
            api.close()


# ------------------------------------------------------------------------ aws-node


def check_aws_node(c: Cluster, template: dict[str, Any]) -> None:
    """Create an aws-node pod from a DaemonSet template with wrong-account images.

    The stored pod has every image rewritten and the originals annotation, and
    each warning the webhook answered reached the client as a Warning header.
    """
    ns = c.namespace("e2e-aws-node")
    name = unique("aws-node")
    pod = pod_from_template(template, name)
    originals = all_images(pod)
    assert originals and all(i.startswith(SOURCE_REGISTRY + "/") for i in originals.values())

    response = c.create_pod(ns, pod)
    assert response.status == 201
    created = raw(response)

    stored = c.read_pod(ns, name)
    assert all_images(stored) == {n: rewritten(i) for n, i in originals.items()}
    assert all_images(created) == all_images(stored)
    assert json.loads(stored["metadata"]["annotations"][ORIGINALS]) == originals
    assert stored["metadata"]["labels"] == pod["metadata"]["labels"]

    (record,) = c.audit.for_pod(ns, name)
    assert record["decision"] == "patched"
    assert record["operation"] == "CREATE" and record["dryRun"] is False
    assert {d["container"]: (d["from"], d["to"], d["reason"]) for d in record["containers"]} == {
        n: (i, rewritten(i), "wrong-account") for n, i in originals.items()
    }
    assert len(record["warnings"]) == len(originals)

    warnings = parse_warning_headers(response.headers.getlist("Warning"))
    assert all(code == 299 and agent == "-" for code, agent, _ in warnings), warnings
    texts = [text for _, _, text in warnings]
    assert texts == record["warnings"]
    for container in originals:
        assert any(container in text for text in texts), (container, texts)


def test_aws_node_from_the_example(cluster: Cluster) -> None:
    """examples/aws-node-ap-southeast-4.yaml: the DaemonSet of aws/amazon-vpc-cni-k8s#3284."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert doc["kind"] == "DaemonSet"
    check_aws_node(cluster, doc["spec"]["template"])


def test_aws_node_from_the_upstream_daemonset(cluster: Cluster, shared_dir: Path) -> None:
    """The upstream VPC CNI v1.19.6 manifest, its images moved to the wrong account.

    Upstream renders us-west-2; the registry host is replaced by the
    default-account host of ap-southeast-4 (an opt-in region served by another
    account), which is what a copy-pasted manifest looks like there.
    """
    docs = [d for d in yaml.safe_load_all((shared_dir / CORPUS_CNI).read_text()) if d]
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    template = daemonset["spec"]["template"]
    upstream = f"{SOURCE_ACCOUNT}.dkr.ecr.us-west-2.amazonaws.com/"
    spec = template["spec"]
    for kind in ("initContainers", "containers"):
        for container in spec.get(kind) or []:
            assert container["image"].startswith(upstream), container["image"]
            container["image"] = SOURCE_REGISTRY + "/" + container["image"].removeprefix(upstream)
    check_aws_node(cluster, template)


# ------------------------------------------------------------------------- dry run


def test_server_side_dry_run_mutates_stores_nothing_and_is_audited(cluster: Cluster) -> None:
    c = cluster
    ns = c.namespace("e2e-dry-run")
    name = unique("dry")
    images = {"app": WRONG_IMAGE, "sidecar": f"{SOURCE_REGISTRY}/eks/coredns:v1.11.4"}
    response = c.create_pod(ns, simple_pod(name, images), dry_run=True)
    returned = raw(response)
    assert all_images(returned) == {n: rewritten(i) for n, i in images.items()}
    assert json.loads(returned["metadata"]["annotations"][ORIGINALS]) == images

    with pytest.raises(ApiException) as missing:
        c.core.read_namespaced_pod(name, ns, _preload_content=False)
    assert missing.value.status == 404

    (record,) = c.audit.for_pod(ns, name)
    assert record["dryRun"] is True
    assert record["decision"] == "patched"
    assert record["auditID"]


# ------------------------------------------------------------------------- scoping


def test_pods_in_the_webhooks_own_namespace_are_never_sent(cluster: Cluster) -> None:
    c = cluster
    c.ensure_namespace(OWN_NAMESPACE)
    name = unique("own-ns")
    c.create_pod(OWN_NAMESPACE, simple_pod(name, {"c": WRONG_IMAGE}))
    stored = c.read_pod(OWN_NAMESPACE, name)
    assert all_images(stored) == {"c": WRONG_IMAGE}
    assert ORIGINALS not in (stored["metadata"].get("annotations") or {})
    assert name not in c.audit.names()

    # Control: the same pod anywhere else is sent and rewritten.
    ns = c.namespace("e2e-scope")
    c.create_pod(ns, simple_pod(name, {"c": WRONG_IMAGE}))
    assert all_images(c.read_pod(ns, name)) == {"c": rewritten(WRONG_IMAGE)}
    assert [r["objectRef"]["namespace"] for r in c.audit.records()
            if r["objectRef"]["name"] == name] == [ns]  # fmt: skip


def test_pods_without_an_ecr_image_are_filtered_by_match_conditions(cluster: Cluster) -> None:
    c = cluster
    ns = c.namespace("e2e-scope")
    plain = unique("nginx")
    c.create_pod(ns, simple_pod(plain, {"web": "nginx:1.27", "tail": "docker.io/library/busybox"}))
    assert all_images(c.read_pod(ns, plain)) == {"web": "nginx:1.27",
                                                 "tail": "docker.io/library/busybox"}  # fmt: skip
    assert c.audit.for_pod(ns, plain) == []

    # Control: one ECR image next to nginx is enough to be sent.
    mixed = unique("mixed")
    c.create_pod(ns, simple_pod(mixed, {"web": "nginx:1.27", "c": WRONG_IMAGE}))
    (record,) = c.audit.for_pod(ns, mixed)
    assert record["decision"] == "patched"
    assert all_images(c.read_pod(ns, mixed)) == {"web": "nginx:1.27",
                                                 "c": rewritten(WRONG_IMAGE)}  # fmt: skip


def test_workload_objects_are_not_sent(cluster: Cluster) -> None:
    """Only pods are: a Deployment's or CronJob's template is left to its pods."""
    c = cluster
    ns = c.namespace("e2e-workloads")
    name = unique("workload")
    labels = {"app": name}
    template: dict[str, Any] = {"metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": WRONG_IMAGE}]}}  # fmt: skip
    c.apps.create_namespaced_deployment(ns, client.V1Deployment.model_validate({
        "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": labels}, "template": template},
    }), _preload_content=False)  # fmt: skip
    job_template = {"spec": {"template": {
        "metadata": {"labels": labels},
        "spec": {**template["spec"], "restartPolicy": "Never"}}}}  # fmt: skip
    c.batch.create_namespaced_cron_job(ns, client.V1CronJob.model_validate({
        "metadata": {"name": name},
        "spec": {"schedule": "0 0 * * *", "jobTemplate": job_template},
    }), _preload_content=False)  # fmt: skip

    deployment = raw(c.apps.read_namespaced_deployment(name, ns, _preload_content=False))
    cron = raw(c.batch.read_namespaced_cron_job(name, ns, _preload_content=False))
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == WRONG_IMAGE
    job_spec = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert job_spec["containers"][0]["image"] == WRONG_IMAGE
    assert [r for r in c.audit.records() if r["objectRef"]["namespace"] == ns] == []


# -------------------------------------------------------------------- webhook down


@pytest.fixture
def unreachable(cluster: Cluster) -> Iterator[tuple[str, str]]:
    """A copy of the project's configuration calling a closed port, for one test label.

    Yields ``(label value, url)``.  The apiserver logs every failed call of a
    webhook with ``failurePolicy: Ignore`` ("failing open") with the URL.
    """
    name, value = unique("b-e2e-down"), unique("down")
    host_port = f"127.0.0.1:{free_port()}"  # nothing listens there
    doc = project_configuration(name, host_port, cluster.ca_pem, {TEST_LABEL: value})
    assert doc["webhooks"][0]["failurePolicy"] == "Ignore"
    cluster.register(doc)
    try:
        yield value, doc["webhooks"][0]["clientConfig"]["url"]
    finally:
        cluster.unregister(name)


def failed_open(cp: ControlPlane, url: str) -> int:
    """How many calls to ``url`` the kube-apiserver logged as failed open."""
    lines = cp.apiserver_log.read_text(errors="replace").splitlines()
    return sum(1 for line in lines if "failing open" in line and url in line)


def test_pods_are_created_while_a_webhook_is_down(
    cluster: Cluster, unreachable: tuple[str, str]
) -> None:
    c = cluster
    value, url = unreachable
    ns = c.namespace("e2e-down")
    labels = {TEST_LABEL: value}

    def attempted() -> bool:
        c.create_pod(ns, simple_pod(unique("probe"), {"c": WRONG_IMAGE}, labels), dry_run=True)
        return failed_open(c.cp, url) > 0

    wait_for(attempted, "the unreachable webhook was never called")
    before = failed_open(c.cp, url)
    name = unique("down")
    response = c.create_pod(ns, simple_pod(name, {"c": WRONG_IMAGE}, labels))
    assert response.status == 201
    # Stored, and still rewritten by the webhook that is up.
    assert all_images(c.read_pod(ns, name)) == {"c": rewritten(WRONG_IMAGE)}
    # The apiserver's log is written asynchronously to the response.
    wait_for(lambda: failed_open(c.cp, url) > before, "no failed call logged for the pod", 10)


# ---------------------------------------------------------------- ephemeral containers


def test_ephemeral_container_added_through_the_subresource_is_rewritten(
    cluster: Cluster,
) -> None:
    c = cluster
    ns = c.namespace("e2e-ephemeral")
    name = unique("debugged")
    good = rewritten(WRONG_IMAGE)
    c.create_pod(ns, simple_pod(name, {"app": good}))
    (created,) = c.audit.for_pod(ns, name)
    assert created["decision"] == "unchanged"  # already the right account

    debug_image = f"{SOURCE_REGISTRY}/eks/debug:1.0"
    patch = {"spec": {"ephemeralContainers": [
        {"name": "debugger", "image": debug_image, "stdin": True, "tty": True}]}}  # fmt: skip
    response: Any = c.core.patch_namespaced_pod_ephemeralcontainers(
        name, ns, patch, _content_type="application/strategic-merge-patch+json",
        _preload_content=False,
    )  # fmt: skip

    stored = c.read_pod(ns, name)
    assert all_images(stored) == {"app": good, "debugger": rewritten(debug_image)}
    # The subresource stores only spec.ephemeralContainers (the apiserver's
    # podEphemeralContainersStrategy drops every other change), so the
    # originals annotation the webhook adds is not kept: the audit record is
    # the only trace of the debug container's original image.
    assert ORIGINALS not in (stored["metadata"].get("annotations") or {})
    records = c.audit.for_pod(ns, name)
    assert [(r["operation"], r["subResource"], r["decision"]) for r in records] == [
        ("CREATE", "", "unchanged"), ("UPDATE", "ephemeralcontainers", "patched")]  # fmt: skip
    assert [(d["container"], d["to"]) for d in records[1]["containers"]] == [
        ("debugger", rewritten(debug_image))
    ]
    texts = [t for _, _, t in parse_warning_headers(response.headers.getlist("Warning"))]
    assert texts == records[1]["warnings"] and "debugger" in texts[0]


def test_a_second_ephemeral_container_leaves_the_first_as_it_is(cluster: Cluster) -> None:
    """An ephemeral container admitted unrewritten (here: while the pod was opted
    out) may never be changed: apiserver validation rejects the whole update.
    Adding a second one must rewrite only the new one, and succeed."""
    c = cluster
    ns = c.namespace("e2e-ephemeral2")
    name = unique("debugged")
    good = rewritten(WRONG_IMAGE)
    pod = simple_pod(name, {"app": good})
    pod["metadata"].setdefault("labels", {})["ecr-webhook.io/skip"] = "true"
    c.create_pod(ns, pod)
    first_image = f"{SOURCE_REGISTRY}/eks/debug:1.0"
    second_image = f"{SOURCE_REGISTRY}/eks/debug:2.0"

    def add(debugger: str, image: str) -> None:
        patch = {"spec": {"ephemeralContainers": [{"name": debugger, "image": image}]}}
        c.core.patch_namespaced_pod_ephemeralcontainers(
            name, ns, patch, _content_type="application/strategic-merge-patch+json"
        )

    add("first", first_image)  # opted out: not sent, stays wrong
    c.core.patch_namespaced_pod(name, ns, {"metadata": {"labels": {"ecr-webhook.io/skip": None}}})
    add("second", second_image)  # sent: only "second" may change

    stored = c.read_pod(ns, name)
    assert all_images(stored) == {
        "app": good, "first": first_image, "second": rewritten(second_image)}  # fmt: skip
    (record,) = [r for r in c.audit.for_pod(ns, name) if r["subResource"] == "ephemeralcontainers"]
    assert [d["container"] for d in record["containers"]] == ["second"]


# -------------------------------------------------------------------- reinvocation


@pytest.fixture
def labeler(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Labeler, str]]:
    """A second mutating webhook (reinvocationPolicy IfNeeded) that adds a label.

    Its configuration name sorts after ours, so the apiserver calls ours first,
    then the labeler, whose change makes it call ours again.  Scoped to one
    test label; yields ``(labeler, label value)``.
    """
    value = unique("reinvoke")
    server = Labeler(tmp_path, "e2e.ecr-webhook.io/labelled", "yes")
    name = unique("z-e2e-labeler")
    assert name > cluster.config_name
    try:
        cluster.register({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{
                "name": "labeler.e2e.ecr-webhook.io",
                "admissionReviewVersions": ["v1"],
                "clientConfig": {"url": server.url,
                                 "caBundle": base64.b64encode(server.ca_pem).decode()},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                           "resources": ["pods"], "scope": "Namespaced"}],
                "objectSelector": {"matchLabels": {TEST_LABEL: value}},
                # Fail: if the labeler is not called, the test must not pass quietly.
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "timeoutSeconds": 5,
                "reinvocationPolicy": "IfNeeded",
            }],
        })  # fmt: skip
        yield server, value
    finally:
        cluster.unregister(name)
        server.close()


def test_reinvocation_rewrites_nothing_twice(
    cluster: Cluster, labeler: tuple[Labeler, str]
) -> None:
    c = cluster
    server, value = labeler
    ns = c.namespace("e2e-reinvoke")
    labels = {TEST_LABEL: value}

    def labelled() -> bool:
        probe = unique("probe")
        c.create_pod(ns, simple_pod(probe, {"c": WRONG_IMAGE}, labels), dry_run=True)
        return bool(server.calls_for(probe))

    wait_for(labelled, "the labeler configuration never took effect")

    name = unique("reinvoked")
    images = {"aws-node": f"{SOURCE_REGISTRY}/amazon-k8s-cni:v1.19.6",
              "nodeagent": f"{SOURCE_REGISTRY}/amazon/aws-network-policy-agent:v1.2.2"}  # fmt: skip
    c.create_pod(ns, simple_pod(name, images, labels))

    stored = c.read_pod(ns, name)
    assert stored["metadata"]["labels"]["e2e.ecr-webhook.io/labelled"] == "yes"
    assert all_images(stored) == {n: rewritten(i) for n, i in images.items()}
    assert all(i.count(TARGET_ACCOUNT) == 1 and SOURCE_ACCOUNT not in i
               for i in all_images(stored).values())  # fmt: skip
    assert json.loads(stored["metadata"]["annotations"][ORIGINALS]) == images

    # The labeler ran after our first call (it saw our rewrite), exactly once:
    # our second call changed nothing, so nobody is reinvoked again.
    (labelled_call,) = server.calls_for(name)
    assert labelled_call["images"] == {n: rewritten(i) for n, i in images.items()}

    first, second = c.audit.for_pod(ns, name)
    assert first["decision"] == "patched" and first["patchOperations"] > 0
    assert {d["container"]: d["from"] for d in first["containers"]} == images
    # Reinvoked with the labelled, already rewritten pod: no rewrite planned.
    assert second["decision"] == "unchanged" and second["patchOperations"] == 0
    assert {d["container"]: d["from"] for d in second["containers"]} == {
        n: rewritten(i) for n, i in images.items()
    }
    assert all(d["action"] != "rewrite" for d in second["containers"])
    assert second["warnings"] == []
    # Each call to a webhook is its own AdmissionReview with a fresh uid
    # (k8s.io/apiserver webhook/request.CreateAdmissionObjects).
    assert first["auditID"] != second["auditID"]
