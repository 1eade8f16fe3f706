"""The manifests against a real kube-apiserver (tests/e2e/controlplane.py).

1. install.yaml, and the HPA component, pass a server-side dry run: the
   apiserver's own validation, including compiling the CEL matchConditions.
2. The webhook's rules, namespaceSelector, objectSelector and CEL
   matchConditions decide which requests reach a webhook as intended.  The
   webhook of install.yaml is registered under another configuration name with
   its clientConfig pointed at a small recording HTTPS server on 127.0.0.1
   (the control plane has no Service routing); every other field is the
   manifest's.  The recorder admits everything unchanged: what is under test
   is which requests the apiserver sends, not the server's answer.
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.e2e.controlplane import ControlPlane
from tests.e2e.webhook_support import ReviewEndpoint
from tests.manifests_support import build_with

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
INSTALL_YAML = ROOT / "manifests" / "install.yaml"
ECR = "602401143452.dkr.ecr.us-west-2.amazonaws.com"


def kubectl(cp: ControlPlane, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        cp.kubectl(*args), input=stdin, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def ensure_namespace(cp: ControlPlane, name: str) -> None:
    kubectl(cp, "apply", "-f", "-", stdin=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))  # fmt: skip


# ----------------------------------------------------------- server dry run


def test_install_yaml_passes_server_side_dry_run(control_plane: ControlPlane) -> None:
    # A dry run creates nothing, so the namespaced objects need the namespace
    # to exist already; it is the only object created for real.
    ensure_namespace(control_plane, "ecr-webhook")
    out = kubectl(control_plane, "apply", "--server-side", "--dry-run=server",
                  "--field-manager=e2e-dry-run", "-f", str(INSTALL_YAML))  # fmt: skip
    applied = [line.split()[0] for line in out.splitlines()]
    kinds = {d["kind"] for d in yaml.safe_load_all(INSTALL_YAML.read_text()) if d}
    assert len(applied) == len([d for d in yaml.safe_load_all(INSTALL_YAML.read_text()) if d])
    assert any(a.startswith("mutatingwebhookconfiguration") for a in applied), applied
    assert len(kinds) >= 13


def test_hpa_component_passes_server_side_dry_run(control_plane: ControlPlane) -> None:
    ensure_namespace(control_plane, "ecr-webhook")
    rendered = build_with(("self-signed", "hpa"))
    out = kubectl(control_plane, "apply", "--server-side", "--dry-run=server",
                  "--field-manager=e2e-dry-run", "-f", "-", stdin=rendered)  # fmt: skip
    assert "horizontalpodautoscaler.autoscaling/ecr-webhook serverside-applied" in out


def test_apiserver_rejects_a_broken_match_condition(control_plane: ControlPlane) -> None:
    """Control: the dry run does compile CEL (so the test above means something)."""
    doc = next(d for d in yaml.safe_load_all(INSTALL_YAML.read_text())
               if d and d["kind"] == "MutatingWebhookConfiguration")  # fmt: skip
    doc["webhooks"][0]["matchConditions"][0]["expression"] = "object.spec.containers.exists(c,"
    proc = subprocess.run(
        control_plane.kubectl("apply", "--dry-run=server", "-f", "-"),
        input=json.dumps(doc), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "compilation failed" in proc.stderr or "Syntax error" in proc.stderr, proc.stderr


# -------------------------------------------------------- who gets called


class Recorder:
    """An HTTPS AdmissionReview endpoint on 127.0.0.1 that records and allows."""

    def __init__(self, tmp: Path) -> None:
        self.calls: list[dict[str, Any]] = []
        self.endpoint = ReviewEndpoint(tmp, self._respond)
        self.ca_pem, self.url = self.endpoint.ca_pem, self.endpoint.url

    def _respond(self, body: dict[str, Any]) -> dict[str, Any]:
        req = body["request"]
        self.calls.append({
            "namespace": req.get("namespace"), "name": req.get("name"),
            "operation": req["operation"], "subResource": req.get("subResource"),
            "dryRun": req.get("dryRun"), "apiVersion": body["apiVersion"],
        })  # fmt: skip
        return {"uid": req["uid"], "allowed": True}

    def names(self) -> set[str]:
        return {c["name"] for c in self.calls}

    def close(self) -> None:
        self.endpoint.close()


def pod(name: str, *, containers: list[str] | None = None, init: list[str] | None = None,
        labels: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {
        "containers": [{"name": f"c{i}", "image": img} for i, img in enumerate(containers or [])]
    }
    if init:
        spec["initContainers"] = [{"name": f"i{i}", "image": img} for i, img in enumerate(init)]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}}, "spec": spec}  # fmt: skip


@pytest.fixture(scope="module")
def routed(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Recorder, client.CoreV1Api, str]]:  # fmt: skip
    """install.yaml's webhook, pointed at a Recorder; a fresh namespace for pods."""
    recorder = Recorder(tmp_path_factory.mktemp("recorder"))
    doc = next(d for d in yaml.safe_load_all(INSTALL_YAML.read_text())
               if d and d["kind"] == "MutatingWebhookConfiguration")  # fmt: skip
    doc = copy.deepcopy(doc)
    doc["metadata"] = {"name": f"e2e-routing-{uuid.uuid4().hex[:6]}"}
    doc["webhooks"][0]["clientConfig"] = {
        "url": recorder.url,
        "caBundle": base64.b64encode(recorder.ca_pem).decode(),
    }
    ns = f"routing-{uuid.uuid4().hex[:6]}"
    ensure_namespace(control_plane, ns)
    ensure_namespace(control_plane, "ecr-webhook")
    kubeconfig = str(control_plane.kubeconfig)
    api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    core = client.CoreV1Api(api)
    kubectl(control_plane, "create", "-f", "-", stdin=json.dumps(doc))
    try:
        # The apiserver picks up a new webhook configuration asynchronously:
        # wait until a pod that must be sent is seen (polling, not timing).
        deadline = time.monotonic() + 60
        while True:
            probe = f"probe-{uuid.uuid4().hex[:6]}"
            create(core, ns, pod(probe, containers=[f"{ECR}/eks/pause:3.9"]))
            if probe in recorder.names():
                break
            assert time.monotonic() < deadline, "the webhook configuration never took effect"
            time.sleep(0.5)
        yield recorder, core, ns
    finally:
        kubectl(control_plane, "delete", "mutatingwebhookconfiguration", doc["metadata"]["name"])
        recorder.close()
        api.close()


def create(core: client.CoreV1Api, ns: str, body: dict[str, Any], dry_run: bool = True) -> None:
    core.create_namespaced_pod(
        ns,
        client.V1Pod.model_validate(body),
        dry_run="All" if dry_run else None,
        _preload_content=False,
    )


SENT: dict[str, dict[str, Any]] = {
    "ecr-container": {"containers": [f"{ECR}/amazon-k8s-cni:v1.19.0"]},
    "ecr-init-only": {"containers": ["busybox"], "init": [f"{ECR}/amazon-k8s-cni-init:v1.19.0"]},
    "ecr-fips-port": {
        "containers": ["602401143452.dkr.ecr-fips.us-east-1.amazonaws.com:443/eks/pause:3.9"]
    },
    "ecr-dualstack": {"containers": ["602401143452.DKR-ECR.us-west-2.ON.AWS/eks/coredns:v1.11.1"]},
    "ecr-china": {"containers": ["918309763551.dkr.ecr.cn-north-1.amazonaws.com.cn/eks/pause:3.9"]},
    "ecr-eusc": {"containers": ["111122223333.dkr.ecr.eusc-de-east-1.amazonaws.eu/eks/pause:3.9"]},
}  # fmt: skip
NOT_SENT: dict[str, dict[str, Any]] = {
    "docker-hub": {"containers": ["nginx:1.27", "docker.io/library/busybox"]},
    "ecr-public": {"containers": ["public.ecr.aws/eks/aws-load-balancer-controller:v2.8.0"]},
    "ecr-in-path": {"containers": [f"quay.io/{ECR}/eks/pause:3.9"]},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SENT))
def test_pods_with_an_ecr_image_are_sent(
    routed: tuple[Recorder, client.CoreV1Api, str], name: str
) -> None:
    recorder, core, ns = routed
    pod_name = f"{name}-{uuid.uuid4().hex[:6]}"
    create(core, ns, pod(pod_name, **SENT[name]))
    calls = [c for c in recorder.calls if c["name"] == pod_name]
    assert [(c["operation"], c["namespace"], c["dryRun"]) for c in calls] == [("CREATE", ns, True)]
    assert calls[0]["apiVersion"] == "admission.k8s.io/v1"


@pytest.mark.parametrize("name", sorted(NOT_SENT))
def test_pods_without_an_ecr_image_are_not_sent(
    routed: tuple[Recorder, client.CoreV1Api, str], name: str
) -> None:
    recorder, core, ns = routed
    pod_name = f"{name}-{uuid.uuid4().hex[:6]}"
    create(core, ns, pod(pod_name, **NOT_SENT[name]))
    assert pod_name not in recorder.names()


def test_opted_out_pods_are_not_sent(routed: tuple[Recorder, client.CoreV1Api, str]) -> None:
    recorder, core, ns = routed
    name = f"opted-out-{uuid.uuid4().hex[:6]}"
    create(core, ns, pod(name, containers=[f"{ECR}/eks/pause:3.9"],
                         labels={"ecr-webhook.io/skip": "true"}))  # fmt: skip
    assert name not in recorder.names()
    other = f"label-false-{uuid.uuid4().hex[:6]}"
    create(core, ns, pod(other, containers=[f"{ECR}/eks/pause:3.9"],
                         labels={"ecr-webhook.io/skip": "false"}))  # fmt: skip
    assert other in recorder.names()


def test_the_webhooks_own_namespace_is_not_sent(
    routed: tuple[Recorder, client.CoreV1Api, str],
) -> None:
    recorder, core, _ = routed
    name = f"own-ns-{uuid.uuid4().hex[:6]}"
    create(core, "ecr-webhook", pod(name, containers=[f"{ECR}/eks/pause:3.9"]))
    assert name not in recorder.names()


def test_ephemeral_containers_are_sent_and_plain_updates_are_not(
    routed: tuple[Recorder, client.CoreV1Api, str],
) -> None:
    recorder, core, ns = routed
    name = f"debugged-{uuid.uuid4().hex[:6]}"
    create(core, ns, pod(name, containers=["busybox"]), dry_run=False)
    try:
        core.patch_namespaced_pod(name, ns, {"metadata": {"labels": {"touched": "yes"}}},
                                  _preload_content=False)  # fmt: skip
        assert name not in recorder.names()  # pods UPDATE is not a rule
        # What `kubectl debug` sends: an update of the ephemeralcontainers subresource.
        response: Any = core.read_namespaced_pod(name, ns, _preload_content=False)
        current = json.loads(response.data)
        current["spec"]["ephemeralContainers"] = [
            {"name": "debug", "image": f"{ECR}/eks/pause:3.9"}
        ]
        core.replace_namespaced_pod_ephemeralcontainers(
            name, ns, client.V1Pod.model_validate(current), _preload_content=False)  # fmt: skip
        calls = [c for c in recorder.calls if c["name"] == name]
        assert [(c["operation"], c["subResource"]) for c in calls] == [
            ("UPDATE", "ephemeralcontainers")
        ]
    finally:
        try:
            core.delete_namespaced_pod(name, ns, grace_period_seconds=0, _preload_content=False)
        except ApiException as exc:  # pragma: no cover - cleanup only
            if exc.status != 404:
                raise
