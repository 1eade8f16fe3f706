"""``ecr-webhook scan`` against the real kube-apiserver (issue 10).

A control plane of its own (so ``--all-namespaces`` sees only what this module
writes).  No kubelet runs here, so the test writes what kubelets and containerd
would: Nodes with their region label and ``status.nodeInfo``, Pods bound to
them whose container statuses wait in ``ErrImagePull`` / ``ImagePullBackOff``
(written through the ``pods/status`` subresource, messages as the kubelet
writes them), and core/v1 Events with reasons ``Failed`` and
``FailedCreatePodSandBox`` from ``kubelet`` on that node.  The error texts are
the upstream ones of ``tests/fixtures/pull_errors.yaml``.  The scan itself runs
the real CLI in-process with the real kubernetes client: no mocked API.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from tests.e2e.controlplane import Binaries, ControlPlane
from webhook.cli import main
from webhook.scan import ScanOptions, scan

pytestmark = pytest.mark.e2e

MERGE_PATCH = "application/merge-patch+json"
FIXTURES = {
    f["id"]: f
    for f in yaml.safe_load(
        (Path(__file__).parent.parent / "fixtures" / "pull_errors.yaml").read_text()
    )
}
NS = "scan-e2e"
BR_NODE = "ip-10-0-1-10.eu-central-1.compute.internal"
A4_NODE = "ip-10-1-1-10.ap-southeast-4.compute.internal"
CN_NODE = "ip-10-0-3-136.cn-north-1.compute.internal"
USE2_NODE = "ip-10-2-0-5.us-east-2.compute.internal"
USW2_NODE = "ip-10-3-0-7.us-west-2.compute.internal"  # no labels: region from the name
PAUSE_EC1 = "602401143452.dkr.ecr.eu-central-1.amazonaws.com/eks/pause:3.1-eksbuild.1"
# terraform-aws-eks#1476 redacted its account as "REDACTED"; the test puts a
# 12-digit account back so the image is an ECR reference again.
UNREDACTED = "111122223333"
UNREACHABLE_IMAGE = f"{UNREDACTED}.dkr.ecr.us-east-2.amazonaws.com/test:latest"


def run_scan(kubeconfig: Path, *args: str) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["scan", "--kubeconfig", str(kubeconfig), *args])
    return code, buf.getvalue()


def scan_json(kubeconfig: Path, *args: str) -> dict[str, Any]:
    code, out = run_scan(kubeconfig, *args, "-o", "json")
    assert code == 0, out
    doc: dict[str, Any] = json.loads(out)
    return doc


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _node(core: client.CoreV1Api, name: str, region: str | None, os_image: str) -> None:
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
    if region:
        labels["topology.kubernetes.io/region"] = region
    core.create_node({"metadata": {"name": name, "labels": labels}}, _preload_content=False)
    info = {"osImage": os_image, "containerRuntimeVersion": "containerd://1.7.27"}
    core.patch_node_status(
        name, {"status": {"nodeInfo": info}}, _content_type=MERGE_PATCH, _preload_content=False
    )


def _pod(
    core: client.CoreV1Api,
    ns: str,
    name: str,
    node: str,
    containers: dict[str, str],
    *,
    init: dict[str, str] | None = None,
    owner: tuple[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels or {}}
    if owner:
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": owner[0],
                "name": owner[1],
                "uid": str(uuid.uuid4()),
                "controller": True,
            }
        ]
    spec: dict[str, Any] = {
        "nodeName": node,
        "containers": [{"name": n, "image": i} for n, i in containers.items()],
    }
    if init:
        spec["initContainers"] = [{"name": n, "image": i} for n, i in init.items()]
    resp = core.create_namespaced_pod(ns, {"metadata": meta, "spec": spec}, _preload_content=False)
    pod: dict[str, Any] = json.loads(resp.data)
    return pod


def _waiting(
    core: client.CoreV1Api,
    pod: dict[str, Any],
    statuses: dict[str, tuple[str, str]],
    *,
    init: bool = False,
) -> None:
    """Post container statuses as the kubelet does: waiting reason and message."""
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    images = {c["name"]: c["image"] for c in pod["spec"].get("initContainers", [])}
    images.update({c["name"]: c["image"] for c in pod["spec"]["containers"]})
    key = "initContainerStatuses" if init else "containerStatuses"
    body = {
        "status": {
            "phase": "Pending",
            key: [
                {
                    "name": c,
                    "image": images[c],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "started": False,
                    "state": {"waiting": {"reason": reason, "message": message}},
                }
                for c, (reason, message) in statuses.items()
            ],
        }
    }
    core.patch_namespaced_pod_status(
        name, ns, body, _content_type=MERGE_PATCH, _preload_content=False
    )


def _event(
    core: client.CoreV1Api,
    pod: dict[str, Any],
    reason: str,
    message: str,
    container: str | None = None,
    count: int = 1,
) -> None:
    """A core/v1 Event as the kubelet records it (source kubelet on the pod's node)."""
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": ns,
        "name": name,
        "uid": pod["metadata"]["uid"],
    }
    if container:
        obj["fieldPath"] = f"spec.containers{{{container}}}"
    node = pod["spec"]["nodeName"]
    core.create_namespaced_event(
        ns,
        {
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": ns},
            "involvedObject": obj,
            "reason": reason,
            "message": message,
            "type": "Warning",
            "source": {"component": "kubelet", "host": node},
            "reportingComponent": "kubelet",
            "reportingInstance": node,
            "count": count,
            "firstTimestamp": _now(),
            "lastTimestamp": _now(),
        },
        _preload_content=False,
    )


def _detail(event_message: str) -> str:
    """The kubelet's waiting message for ErrImagePull: the error without the
    ``Failed to pull image "X": `` prefix of its event."""
    return event_message.split('": ', 1)[1]


def _populate(core: client.CoreV1Api) -> None:
    for ns in (NS, "kube-system"):
        if ns != "kube-system":
            core.create_namespace({"metadata": {"name": ns}}, _preload_content=False)
    _node(core, BR_NODE, "eu-central-1", "Bottlerocket OS 1.20.0 (aws-k8s-1.29)")
    _node(core, A4_NODE, "ap-southeast-4", "Amazon Linux 2023.6.20241212")
    _node(core, CN_NODE, "cn-north-1", "Amazon Linux 2")
    _node(core, USE2_NODE, "us-east-2", "Amazon Linux 2023.6.20241212")
    _node(core, USW2_NODE, None, "Ubuntu 22.04.5 LTS")

    # 1. The seed scenario: a Bottlerocket node in eu-central-1 whose pause image
    #    cannot be pulled; every pod on it fails to get a sandbox.
    seed = FIXTURES["vpc-cni-2778-eu-central-1-bottlerocket-pause"]["message"]
    for i in range(6):
        pod = _pod(core, NS, f"web-{i}", BR_NODE, {"web": "public.ecr.aws/nginx/nginx:1.27"})
        _waiting(core, pod, {"web": ("ContainerCreating", "")})
        _event(core, pod, "FailedCreatePodSandBox", seed, count=8)

    # 2. Wrong account (aws/amazon-vpc-cni-k8s#3284): aws-node of a DaemonSet.
    wrong = FIXTURES["vpc-cni-3284-ap-southeast-4-wrong-account"]
    pod = _pod(
        core,
        "kube-system",
        "aws-node-a4x7k",
        A4_NODE,
        {"aws-node": "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni:v1.19.4"},
        init={"aws-vpc-cni-init": wrong["image"]},
        owner=("DaemonSet", "aws-node"),
    )
    _waiting(
        core, pod, {"aws-vpc-cni-init": ("ErrImagePull", _detail(wrong["message"]))}, init=True
    )
    _event(core, pod, "Failed", wrong["message"], "aws-vpc-cni-init")
    _event(core, pod, "Failed", "Error: ErrImagePull", "aws-vpc-cni-init")

    # 3. Tag not found in the region (aws/amazon-vpc-cni-k8s#3526): back-off status,
    #    the detail only in the event.
    nf = FIXTURES["vpc-cni-3526-eu-central-1-tag-not-found"]
    pod = _pod(core, "kube-system", "aws-node-ec1nf", BR_NODE, {"aws-vpc-cni-init": nf["image"]})
    _waiting(
        core,
        pod,
        {"aws-vpc-cni-init": ("ImagePullBackOff", f'Back-off pulling image "{nf["image"]}"')},
    )
    _event(core, pod, "Failed", nf["message"], "aws-vpc-cni-init", count=5)
    _event(core, pod, "Failed", "Error: ImagePullBackOff", "aws-vpc-cni-init", count=20)

    # 4. Registry unreachable (terraform-aws-modules/terraform-aws-eks#1476).
    un = FIXTURES["terraform-aws-eks-1476-us-east-2-io-timeout"]["message"]
    un = un.replace("REDACTED", UNREDACTED)
    pod = _pod(core, NS, "private-app", USE2_NODE, {"app": UNREACHABLE_IMAGE})
    _waiting(core, pod, {"app": ("ErrImagePull", _detail(un))})
    _event(core, pod, "Failed", un, "app")

    # 5. Wrong partition (aws/aws-cdk#28420): a commercial image on a China node.
    wp = FIXTURES["aws-cdk-28420-cn-north-1-commercial-image"]
    pod = _pod(
        core,
        "kube-system",
        "aws-load-balancer-controller-75c785bc8c-72zpg",
        CN_NODE,
        {"aws-load-balancer-controller": wp["image"]},
        owner=("ReplicaSet", "aws-load-balancer-controller-75c785bc8c"),
        labels={"pod-template-hash": "75c785bc8c"},
    )
    _waiting(core, pod, {"aws-load-balancer-controller": ("ErrImagePull", _detail(wp["message"]))})
    _event(core, pod, "Failed", wp["message"], "aws-load-balancer-controller")

    # 6. Access denied (bottlerocket-os/bottlerocket-update-operator#157).
    ad = FIXTURES["bottlerocket-update-operator-157-batchgetimage"]
    pod = _pod(core, NS, "brupop", USW2_NODE, {"brupop": ad["image"]})
    _waiting(core, pod, {"brupop": ("ErrImagePull", ad["message"])})

    # 7. A container pulled without credentials (aws/amazon-vpc-cni-k8s#2127).
    nc = FIXTURES["vpc-cni-2127-us-west-2-container-401"]
    pod = _pod(core, NS, "cni-init-selfmanaged", USW2_NODE, {"init": nc["image"]})
    _waiting(core, pod, {"init": ("ErrImagePull", nc["message"])})

    # 8. Unclassifiable (mattermost/mattermost-cloud-monitoring#891: 400 Bad Request).
    uc = FIXTURES["mattermost-cloud-monitoring-891-pause-400"]
    pod = _pod(core, NS, "batch-0", USW2_NODE, {"job": "public.ecr.aws/docker/library/busybox:1"})
    _event(core, pod, "FailedCreatePodSandBox", uc["message"])

    # 9. Not on ECR (k3s-io/k3s#10926): reported as ignored, not as a finding.
    k3 = FIXTURES["k3s-10926-sandbox-deadline-exceeded"]["message"]
    pod = _pod(core, NS, "elsewhere", USW2_NODE, {"x": "docker.io/library/nginx:1.27"})
    _event(core, pod, "FailedCreatePodSandBox", k3)


@pytest.fixture(scope="module")
def cluster(
    control_plane_binaries: Binaries, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ControlPlane, dict[str, Any], str]]:
    """(control plane, JSON report of the empty cluster, its table output)."""
    log_dir = tmp_path_factory.mktemp("scan-controlplane-logs")
    with ControlPlane(binaries=control_plane_binaries, log_dir=log_dir) as cp:
        empty = scan_json(cp.kubeconfig, "-A")
        code, empty_table = run_scan(cp.kubeconfig, "-A")
        assert code == 0
        api = config.new_client_from_config(config_file=str(cp.kubeconfig))  # type: ignore[no-untyped-call]
        with api:
            _populate(client.CoreV1Api(api))
        yield cp, empty, empty_table


def by_class(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for f in report["findings"]:
        out.setdefault(f["class"], []).append(f)
    return out


def test_empty_cluster(cluster: tuple[ControlPlane, dict[str, Any], str]) -> None:
    _, empty, table = cluster
    assert empty["findings"] == [] and empty["scannedPods"] == 0
    assert "No image-pull failures" in table
    assert "default policy used" in table  # no ecr-webhook ConfigMap in this cluster


def test_every_class_is_found_and_explained(
    cluster: tuple[ControlPlane, dict[str, Any], str],
) -> None:
    cp, _, _ = cluster
    report = scan_json(cp.kubeconfig, "--all-namespaces")
    classes = by_class(report)
    assert set(classes) == {
        "sandbox-no-credentials",
        "wrong-account",
        "not-found",
        "unreachable",
        "wrong-partition",
        "access-denied",
        "no-credentials",
        "unclassified",
    }
    assert all(len(v) == 1 for v in classes.values()), classes
    for f in report["findings"]:
        assert f["why"] and f["fix"], f

    (seed,) = classes["sandbox-no-credentials"]
    assert seed["image"] == PAUSE_EC1 and seed["sandbox"] is True
    assert seed["podCount"] == 6 and seed["nodes"] == {BR_NODE: 6}
    # The node names eu-central-1's own registry already: nothing to change in
    # its settings; the image was garbage-collected and cannot be pulled again
    # without credentials.  The finding says so and how Bottlerocket fixes it.
    assert seed["commands"] == []
    assert any(
        "`ecr-webhook node-config --os bottlerocket --region eu-central-1` prints this same image"
        in x
        for x in seed["fix"]
    )
    assert any("#3757" in x and "#3940" in x for x in seed["fix"])

    (wa,) = classes["wrong-account"]
    assert wa["pods"] == ["kube-system/aws-node-a4x7k"]
    assert (
        "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni-init:v1.19.4"
        in (wa["webhook"])
    )
    assert wa["commands"] == ["kubectl -n kube-system rollout restart daemonset/aws-node"]

    (nf,) = classes["not-found"]
    assert nf["pods"] == ["kube-system/aws-node-ec1nf"] and "3526" in nf["why"]
    assert nf["commands"] == [
        f"ecr-webhook probe {FIXTURES['vpc-cni-3526-eu-central-1-tag-not-found']['image']}"
    ]

    (un,) = classes["unreachable"]
    assert un["image"] == UNREACHABLE_IMAGE
    assert un["commands"] == [f"ecr-webhook probe {UNREACHABLE_IMAGE}"]
    assert "VPC endpoints" in un["why"]

    (wp,) = classes["wrong-partition"]
    assert "918309763551.dkr.ecr.cn-north-1.amazonaws.com.cn" in wp["webhook"]
    assert wp["commands"] == [
        "kubectl -n kube-system rollout restart deployment/aws-load-balancer-controller"
    ]

    assert classes["access-denied"][0]["pods"] == [f"{NS}/brupop"]
    assert classes["no-credentials"][0]["pods"] == [f"{NS}/cni-init-selfmanaged"]
    (uc,) = classes["unclassified"]
    assert "400 Bad Request" in uc["message"] and uc["sandbox"] is True
    # The docker.io sandbox failure is not on ECR: counted, not reported.
    assert report["ignoredNonEcr"] == 1


def test_paged_lists_give_the_same_report(
    cluster: tuple[ControlPlane, dict[str, Any], str],
) -> None:
    """Pods and Events are listed in pages (limit/continue); pages of 3 objects
    must give the same findings as one page."""
    cp, _, _ = cluster
    whole = scan(ScanOptions(kubeconfig=str(cp.kubeconfig), all_namespaces=True))
    paged = scan(ScanOptions(kubeconfig=str(cp.kubeconfig), all_namespaces=True, page_size=3))
    assert paged.scanned_pods == whole.scanned_pods == 14
    assert paged.to_json()["findings"] == whole.to_json()["findings"]


def test_table_output_names_each_fix(cluster: tuple[ControlPlane, dict[str, Any], str]) -> None:
    cp, _, _ = cluster
    code, table = run_scan(cp.kubeconfig, "-A")
    assert code == 0
    assert "[1] sandbox-no-credentials  sandbox image " + PAUSE_EC1 in table
    assert "`ecr-webhook node-config --os bottlerocket --region eu-central-1` prints" in table
    assert (
        "run:  ecr-webhook probe " + FIXTURES["vpc-cni-3526-eu-central-1-tag-not-found"]["image"]
        in table
    )
    assert f"run:  ecr-webhook probe {UNREACHABLE_IMAGE}" in table
    assert "Traceback" not in table


def test_namespace_limits_the_scan(cluster: tuple[ControlPlane, dict[str, Any], str]) -> None:
    cp, _, _ = cluster
    report = scan_json(cp.kubeconfig, "--namespace", "kube-system")
    assert set(by_class(report)) == {"wrong-account", "not-found", "wrong-partition"}
    code, _ = run_scan(cp.kubeconfig, "-n", "kube-system", "-A")
    assert code == 2  # the two flags exclude each other


def test_policy_configmap_is_the_current_policy(
    cluster: tuple[ControlPlane, dict[str, Any], str],
) -> None:
    cp, _, _ = cluster
    api = config.new_client_from_config(config_file=str(cp.kubeconfig))  # type: ignore[no-untyped-call]
    with api:
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": "ecr-webhook"}}, _preload_content=False)
        policy = (
            "exclude: {namespaces: [kube-system]}\n"
            "targets: [{type: mirror, registry: 111122223333.dkr.ecr.eu-central-1.amazonaws.com,"
            " prefix: eks-mirror}, {type: official}]\n"
        )
        core.create_namespaced_config_map(
            "ecr-webhook",
            {"metadata": {"name": "ecr-webhook-policy"}, "data": {"policy.yaml": policy}},
            _preload_content=False,
        )
        try:
            report = scan_json(cp.kubeconfig, "-A")
        finally:
            core.delete_namespaced_config_map("ecr-webhook-policy", "ecr-webhook")
    assert report["policy"] == "ConfigMap ecr-webhook/ecr-webhook-policy"
    classes = by_class(report)
    assert "leaves this pod alone" in classes["wrong-account"][0]["webhook"]
    assert classes["sandbox-no-credentials"][0]["commands"] == [
        "ecr-webhook node-config --os bottlerocket --region eu-central-1 "
        "--mirror 111122223333.dkr.ecr.eu-central-1.amazonaws.com/eks-mirror"
    ]


def test_unreachable_apiserver_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kc = tmp_path / "kc.yaml"
    kc.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "x"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    code = main(["scan", "--kubeconfig", str(kc)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: listing pods in namespace default:") and "Traceback" not in err


def test_300_pods_on_one_pause_image_are_one_finding(
    cluster: tuple[ControlPlane, dict[str, Any], str],
) -> None:
    """awslabs/amazon-eks-ami#1597 at fleet scale: 300 pods on three AL2023 nodes in
    eu-west-2 fail on the garbage-collected pause image; the scan (in pages of
    50) reports one finding naming the three nodes.  Cleans up after itself so
    the other tests of the module see their cluster unchanged."""
    cp, _, _ = cluster
    text = FIXTURES["eks-ami-1597-eu-west-2-pause-401"]["message"]
    image = FIXTURES["eks-ami-1597-eu-west-2-pause-401"]["image"]
    fleet = "fleet"
    names = [f"ip-10-9-{k}-1.eu-west-2.compute.internal" for k in range(3)]
    api = config.new_client_from_config(config_file=str(cp.kubeconfig))  # type: ignore[no-untyped-call]
    with api:
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": fleet}}, _preload_content=False)
        try:
            for n in names:
                _node(core, n, "eu-west-2", "Amazon Linux 2023.6.20241212")
            for i in range(300):
                pod = _pod(core, fleet, f"job-{i}", names[i % 3], {"job": "busybox:1.37"})
                _event(core, pod, "FailedCreatePodSandBox", text, count=3)
            report = scan(
                ScanOptions(kubeconfig=str(cp.kubeconfig), namespace=fleet, page_size=50)
            ).to_json()
        finally:
            core.delete_collection_namespaced_pod(fleet, grace_period_seconds=0)
            core.delete_collection_namespaced_event(fleet)
            for n in names:
                core.delete_node(n)
    assert report["scannedPods"] == 300
    (f,) = report["findings"]
    assert f["class"] == "sandbox-no-credentials" and f["image"] == image
    assert f["podCount"] == 300 and f["nodes"] == dict.fromkeys(names, 100)
    assert any("sandbox-image" in x for x in f["fix"])
