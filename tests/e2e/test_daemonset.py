"""The aws-node DaemonSet's Pods, made by the real DaemonSet controller (issue 4, stretch).

Here nobody creates a Pod by hand: kube-controller-manager's DaemonSet
controller creates one aws-node Pod per Node, as
``system:serviceaccount:kube-system:daemon-set-controller``, and the
kube-apiserver sends each to ``ecr-webhook serve`` (registered with the
project's own MutatingWebhookConfiguration).  The stored Pods must carry the
ap-southeast-4 account's images and the originals annotation, and the audit
file a ``patched``/``wrong-account`` record for each.

The control plane is this module's own (with kube-controller-manager and the
ServiceAccount admission plugin on); the session's ``control_plane`` fixture
is left as it is.  The Nodes are API objects only (no kubelet runs here):
the Pods are created and stored, never scheduled or run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, utils

from tests.e2e.controlplane import Binaries, ControlPlane
from tests.e2e.daemonset_support import (
    Webhook,
    controlled_pods,
    create_ready_node,
    is_ready,
    raw,
    registered_webhook,
    retarget_images,
    target_node,
    unique,
    wait_for,
)
from tests.e2e.webhook_support import all_images
from tests.serving import ORIGINALS, SOURCE_REGISTRY, TARGET_REGISTRY

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "aws-node-ap-southeast-4.yaml"
CORPUS_CNI = Path("corpus") / "vpc-cni" / "HEAD-v1.23.1__config__master__aws-k8s-cni.yaml"
# Where upstream's rendered manifest points (config/master is rendered for us-west-2).
UPSTREAM_REGISTRY = "602401143452.dkr.ecr.us-west-2.amazonaws.com"
DAEMON_SET_CONTROLLER = "system:serviceaccount:kube-system:daemon-set-controller"
NODES = 2


def rewritten(image: str) -> str:
    """What the webhook must make of a wrong-account ap-southeast-4 image."""
    assert image.startswith(SOURCE_REGISTRY + "/"), image
    return TARGET_REGISTRY + image.removeprefix(SOURCE_REGISTRY)


@pytest.fixture(scope="module")
def control_plane_with_controller_manager(
    control_plane_binaries: Binaries, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    """This module's own control plane: etcd, kube-apiserver, kube-controller-manager.

    With the controller-manager's ServiceAccount controller creating the
    ``default`` ServiceAccounts, the ServiceAccount admission plugin is on
    (``disable_admission_plugins=()``), as in a real cluster: the Pods reach
    the webhook with their token volume added.  Logs are kept under pytest's
    basetemp (``controlplane-kcm-logs*``).
    """
    log_dir = tmp_path_factory.mktemp("controlplane-kcm-logs")
    with ControlPlane(
        binaries=control_plane_binaries,
        log_dir=log_dir,
        controller_manager=True,
        disable_admission_plugins=(),
    ) as cp:
        yield cp


@dataclass
class Cluster:
    cp: ControlPlane
    api: client.ApiClient
    core: client.CoreV1Api
    apps: client.AppsV1Api
    webhook: Webhook
    nodes: list[str]


@pytest.fixture(scope="module")
def cluster(
    control_plane_with_controller_manager: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The webhook registered, and ``NODES`` Ready Nodes for the DaemonSets."""
    cp = control_plane_with_controller_manager
    api = config.new_client_from_config(config_file=str(cp.kubeconfig))  # type: ignore[no-untyped-call]
    core = client.CoreV1Api(api)
    tmp = tmp_path_factory.mktemp("webhook-daemonset")
    try:
        with registered_webhook(cp, tmp, f"{SOURCE_REGISTRY}/eks/pause:3.10") as webhook:
            nodes = [create_ready_node(core, unique("e2e-node")) for _ in range(NODES)]
            assert all(is_ready(n) and not n["spec"].get("taints") for n in nodes), nodes
            names = [n["metadata"]["name"] for n in nodes]
            yield Cluster(cp, api, core, client.AppsV1Api(api), webhook, names)
    finally:
        api.close()


def check_daemonset_pods(c: Cluster, namespace: str, name: str, images: dict[str, str]) -> None:
    """The DaemonSet's Pods, one per Node, are stored rewritten and audited.

    ``images`` are the template's (wrong-account) images by container name.
    """
    ds = raw(c.apps.read_namespaced_daemon_set(name, namespace, _preload_content=False))
    uid = ds["metadata"]["uid"]
    pods: list[dict[str, Any]] = []

    def one_per_node() -> bool:
        c.cp.check_running()
        c.webhook.alive()
        pods[:] = controlled_pods(c.core, namespace, uid)
        return len(pods) >= len(c.nodes)

    wait_for(one_per_node, f"the DaemonSet controller never created {len(c.nodes)} pods")
    assert sorted(target_node(p) for p in pods) == sorted(c.nodes)

    expected = {n: rewritten(i) for n, i in images.items()}
    for pod in pods:
        stored = raw(c.core.read_namespaced_pod(pod["metadata"]["name"], namespace,
                                                _preload_content=False))  # fmt: skip
        assert all_images(stored) == expected
        assert json.loads(stored["metadata"]["annotations"][ORIGINALS]) == images
        assert stored["metadata"]["generateName"] == f"{name}-"

    # One admission per Pod, by the controller, under its own ServiceAccount.
    records = [
        r
        for r in c.webhook.audit.records()
        if r["objectRef"]["namespace"] == namespace
        and r["owner"] == {"kind": "DaemonSet", "name": name}
    ]
    assert len(records) == len(pods), records
    for record in records:
        assert record["operation"] == "CREATE" and record["dryRun"] is False
        assert record["user"]["username"] == DAEMON_SET_CONTROLLER
        assert record["objectRef"]["generateName"] == f"{name}-"
        assert record["decision"] == "patched"
        assert {d["container"]: (d["from"], d["to"], d["reason"]) for d in record["containers"]
                } == {n: (i, rewritten(i), "wrong-account") for n, i in images.items()}  # fmt: skip
        assert len(record["warnings"]) == len(images)


def test_upstream_vpc_cni_manifest(cluster: Cluster, shared_dir: Path) -> None:
    """The upstream VPC CNI v1.23.1 manifest, rendered for ap-southeast-4 with the default account.

    Every object of it is created (CRD, ServiceAccount, ConfigMap, RBAC,
    DaemonSet) with the kubernetes client's ``create_from_yaml``; only the
    DaemonSet's registry host changes, from upstream's us-west-2 to
    ``602401143452.dkr.ecr.ap-southeast-4.amazonaws.com``, which is what an
    operator substituting the region gets (ap-southeast-4 is an opt-in
    region served by account 491585149902).
    """
    docs = [d for d in yaml.safe_load_all((shared_dir / CORPUS_CNI).read_text()) if d]
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    images = retarget_images(daemonset, UPSTREAM_REGISTRY, SOURCE_REGISTRY)
    assert set(images) == {"aws-vpc-cni-init", "aws-node", "aws-eks-nodeagent"}
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["CustomResourceDefinition", "ServiceAccount", "ConfigMap",
                            "ClusterRole", "ClusterRoleBinding", "DaemonSet"])  # fmt: skip

    utils.create_from_yaml(cluster.api, yaml_objects=docs, _preload_content=False)  # type: ignore[no-untyped-call]

    namespace, name = daemonset["metadata"]["namespace"], daemonset["metadata"]["name"]
    assert (namespace, name) == ("kube-system", "aws-node")
    check_daemonset_pods(cluster, namespace, name, images)


def test_example_daemonset(cluster: Cluster) -> None:
    """examples/aws-node-ap-southeast-4.yaml (aws/amazon-vpc-cni-k8s#3284), DaemonSet only.

    Needs no ../shared.  Applied in a namespace of its own, so that it does not
    meet the upstream manifest's aws-node in kube-system, with the
    ServiceAccount its Pods name (the ServiceAccount admission plugin is on).
    """
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert doc["kind"] == "DaemonSet"
    images = all_images(doc["spec"]["template"])
    assert images and all(i.startswith(SOURCE_REGISTRY + "/") for i in images.values())

    namespace = unique("e2e-daemonset")
    doc["metadata"]["namespace"] = namespace
    service_account = doc["spec"]["template"]["spec"]["serviceAccountName"]
    utils.create_from_yaml(cluster.api, yaml_objects=[  # type: ignore[no-untyped-call]
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": service_account, "namespace": namespace}},
        doc,
    ], _preload_content=False)  # fmt: skip

    check_daemonset_pods(cluster, namespace, doc["metadata"]["name"], images)
