"""The pure half of ``scan``: classification of real pull-error texts, grouping,
and the fix each finding names.  The texts are the upstream ones in
``tests/fixtures/pull_errors.yaml`` (each with its source URL)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from webhook.cli import main
from webhook.core import diagnose, ecr
from webhook.core.diagnose import FailureClass, NodeFacts, Observation
from webhook.core.policy import Policy, load_policy

FIXTURES = yaml.safe_load(
    (Path(__file__).parent / "fixtures" / "pull_errors.yaml").read_text(encoding="utf-8")
)
FACTS = ecr.default_facts()
PAUSE_EC1 = "602401143452.dkr.ecr.eu-central-1.amazonaws.com/eks/pause:3.1-eksbuild.1"
CNI_A4 = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni:v1.19.4"
SEED = next(f for f in FIXTURES if f["id"] == "vpc-cni-2778-eu-central-1-bottlerocket-pause")
WRONG_ACCOUNT = next(f for f in FIXTURES if f["id"].startswith("vpc-cni-3284"))


def test_fixtures_cover_every_class_with_sources() -> None:
    assert {f["class"] for f in FIXTURES} == {c.value for c in FailureClass}
    for f in FIXTURES:
        assert re.match(r"^https://github\.com/[\w.-]+/[\w.-]+/(issues|pull)/\d+$", f["source"])


@pytest.mark.parametrize("case", FIXTURES, ids=[f["id"] for f in FIXTURES])
def test_upstream_text_is_classified(case: dict[str, Any]) -> None:
    d = diagnose.classify(
        case["message"],
        case["image"] or "",
        sandbox=case["sandbox"],
        node_region=case["node_region"],
        facts=FACTS,
    )
    assert d.cls == case["class"]
    assert d.why
    assert diagnose.is_sandbox_failure(case["reason"], case["message"]) == case["sandbox"]
    if case["image"] and re.search(
        r'(image|PullImage) "' + re.escape(case["image"]), case["message"]
    ):
        assert diagnose.image_in_message(case["message"]) == case["image"]


def test_the_facts_decide_over_the_text() -> None:
    """A 401 on a commercial image from a China node is a partition problem, and an
    EKS account outside its region is a wrong account even when the text is vague."""
    d = diagnose.classify("401 Unauthorized", CNI_A4, sandbox=False, node_region=None, facts=FACTS)
    assert d.cls is FailureClass.WRONG_ACCOUNT
    assert "491585149902" in d.why
    d = diagnose.classify(
        "401 Unauthorized", PAUSE_EC1, sandbox=True, node_region="cn-north-1", facts=FACTS
    )
    assert d.cls is FailureClass.WRONG_PARTITION


def test_node_region_and_os() -> None:
    assert diagnose.region_of_node("n", {"topology.kubernetes.io/region": "eu-central-1"}) == (
        "eu-central-1"
    )
    assert diagnose.region_of_node("ip-10-0-3-136.cn-north-1.compute.internal", {}) == "cn-north-1"
    assert diagnose.region_of_node("ip-10-34-46-213.ec2.internal", None) == "us-east-1"
    assert diagnose.region_of_node("kind-worker", {}) is None
    br = NodeFacts("n", os_image="Bottlerocket OS 1.20.5 (aws-k8s-1.29)")
    assert br.node_os == "bottlerocket" and br.bottlerocket_version == (1, 20, 5)
    assert NodeFacts("n", os_image="Amazon Linux 2023.6.20250115").node_os == "al2023"
    on_containerd_2 = NodeFacts("n", os_image="Amazon Linux 2023.7", runtime="containerd://2.1.4")
    assert on_containerd_2.node_os == "containerd"
    assert NodeFacts("n", os_image="Amazon Linux 2").node_os == "al2"
    assert NodeFacts("n", os_image="Ubuntu 22.04.4 LTS").node_os == "containerd"


def _pod(ns: str, name: str, node: str, image: str, owner: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": ns, "name": name}
    if owner:
        meta["ownerReferences"] = [{"kind": "DaemonSet", "name": owner, "controller": True}]
    return {
        "metadata": meta,
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": image}]},
    }


def _sandbox_obs(i: int, node: str) -> Observation:
    return Observation(
        namespace="team",
        pod=f"web-{i}",
        node=node,
        image=PAUSE_EC1,
        message=SEED["message"],
        sandbox=True,
        source="event",
        reason="FailedCreatePodSandBox",
    )


def test_300_pods_on_one_pause_image_are_one_finding(capsys: pytest.CaptureFixture[str]) -> None:
    nodes = {
        f"ip-10-0-{k}-1.eu-central-1.compute.internal": NodeFacts(
            f"ip-10-0-{k}-1.eu-central-1.compute.internal",
            region="eu-central-1",
            os_image="Bottlerocket OS 1.20.0 (aws-k8s-1.29)",
        )
        for k in range(3)
    }
    names = sorted(nodes)
    obs = [_sandbox_obs(i, names[i % 3]) for i in range(300)]
    report = diagnose.build_report(obs + obs[:10], {}, nodes, Policy(), scanned_pods=300)
    (f,) = report.findings
    assert f.cls is FailureClass.SANDBOX_NO_CREDENTIALS and f.sandbox
    assert len(f.pods) == 300 and sum(f.nodes.values()) == 300 and len(f.nodes) == 3
    assert f.webhook is None
    assert any("cannot rewrite" in x for x in f.fix)
    # The node already names eu-central-1's registry: no command to run, but the
    # finding says which node-config command prints that same image, and why
    # the image is gone (garbage collection; Bottlerocket pins it from 1.19.1).
    assert f.commands == ()
    assert any("#3757" in x and "restarting the kubelet" in x for x in f.fix)
    (cmd,) = {m for x in f.fix for m in re.findall(r"`(ecr-webhook node-config[^`]*)`", x)}
    assert cmd == "ecr-webhook node-config --os bottlerocket --region eu-central-1"
    assert main(cmd.split()[1:]) == 0
    out = capsys.readouterr().out
    image = tomllib.loads(out)["settings"]["kubernetes"]["pod-infra-container-image"]
    assert image == PAUSE_EC1
    table = diagnose.render_table(report)
    assert table.count("sandbox-no-credentials") == 1
    assert "pods: 300 on 3 node(s)" in table and "+297 more" in table


def test_mirror_in_policy_goes_into_the_node_config_command() -> None:
    policy = load_policy(
        "targets: [{type: mirror, registry: 111122223333.dkr.ecr.eu-central-1.amazonaws.com,"
        " prefix: eks-mirror}, {type: official}]"
    )
    report = diagnose.build_report([_sandbox_obs(0, "n1")], {}, {}, policy, region="eu-central-1")
    assert report.findings[0].commands == (
        "ecr-webhook node-config --os containerd --region eu-central-1 --pause-tag 3.1-eksbuild.1 "
        "--mirror 111122223333.dkr.ecr.eu-central-1.amazonaws.com/eks-mirror",
    )


def test_sandbox_image_in_a_wrong_registry_gets_the_node_config_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A node whose pause image names an account that does not serve its region
    (the aws/amazon-vpc-cni-k8s#3284 text, with the pause image in place of
    amazon-k8s-cni-init): running the command the finding names sets the right one."""
    wrong = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/eks/pause:3.10"
    text = WRONG_ACCOUNT["message"].replace(WRONG_ACCOUNT["image"], wrong)
    text = text.replace("/v2/amazon-k8s-cni-init/manifests/v1.19.4", "/v2/eks/pause/manifests/3.10")
    obs = Observation("ns", "p", "n1", wrong, text, True, "event", "FailedCreatePodSandBox")
    nodes = {"n1": NodeFacts("n1", "ap-southeast-4", "Amazon Linux 2023.6.20241212")}
    (f,) = diagnose.build_report([obs], {}, nodes, Policy()).findings
    assert f.cls is FailureClass.WRONG_ACCOUNT and f.sandbox
    (cmd,) = f.commands
    assert cmd == "ecr-webhook node-config --os al2023 --region ap-southeast-4 --pause-tag 3.10"
    assert main(cmd.split()[1:]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    config = tomllib.loads(doc["spec"]["containerd"]["config"])
    assert config["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"] == (
        "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com/eks/pause:3.10"
    )


def test_wrong_account_names_what_the_webhook_does() -> None:
    pod = _pod("kube-system", "aws-node-x", "n1", WRONG_ACCOUNT["image"], owner="aws-node")
    obs = Observation(
        "kube-system", "aws-node-x", "n1", WRONG_ACCOUNT["image"], WRONG_ACCOUNT["message"],
        False, "event", "Failed", "c",
    )  # fmt: skip
    nodes = {"n1": NodeFacts("n1", region="ap-southeast-4")}
    report = diagnose.build_report([obs], {("kube-system", "aws-node-x"): pod}, nodes, Policy())
    (f,) = report.findings
    assert f.cls is FailureClass.WRONG_ACCOUNT
    assert f.webhook is not None
    assert "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni-init:v1.19.4" in (
        f.webhook
    )
    assert f.commands == ("kubectl -n kube-system rollout restart daemonset/aws-node",)
    # Excluded namespace: the webhook leaves it, and the finding says so.
    excluded = load_policy("exclude: {namespaces: [kube-system]}")
    (f,) = diagnose.build_report(
        [obs], {("kube-system", "aws-node-x"): pod}, nodes, excluded
    ).findings
    assert f.webhook is not None and "leaves this pod alone" in f.webhook


def test_status_backoff_and_event_make_one_classified_finding() -> None:
    """The container status says only "Back-off pulling image"; the event explains."""
    image = "602401143452.dkr.ecr.eu-central-1.amazonaws.com/amazon-k8s-cni-init:v1.20.5"
    text = next(f for f in FIXTURES if f["id"].startswith("vpc-cni-3526"))["message"]
    obs = [
        Observation("kube-system", "p", "n", image, f'Back-off pulling image "{image}"', False,
                    "status", "ImagePullBackOff", "c"),
        Observation("kube-system", "p", "n", image, text, False, "event", "Failed", "c"),
    ]  # fmt: skip
    (f,) = diagnose.build_report(obs, {}, {}, Policy(), region="eu-central-1").findings
    assert f.cls is FailureClass.NOT_FOUND
    assert f.commands == (f"ecr-webhook probe {image}",)


def test_unclassified_shows_the_text_and_non_ecr_is_counted() -> None:
    text = "something nobody has seen before"
    obs = [
        Observation("a", "p1", "n", PAUSE_EC1, text, True, "event", "FailedCreatePodSandBox"),
        Observation("a", "p2", "n", "docker.io/library/nginx:nope", "not found", False,
                    "status", "ErrImagePull", "c"),
    ]  # fmt: skip
    report = diagnose.build_report(obs, {}, {}, Policy(), region="eu-central-1", scanned_pods=2)
    (f,) = report.findings
    assert f.cls is FailureClass.UNCLASSIFIED and f.message == text
    # The pause image already names eu-central-1's registry: no node setting to change.
    assert any("will not help" in x for x in f.fix)
    assert f.commands == (f"ecr-webhook probe {PAUSE_EC1}",)
    assert report.ignored_non_ecr == 1
    table = diagnose.render_table(report)
    assert text in table and "1 failing pull(s) of images not on ECR not shown" in table


def test_empty_report() -> None:
    report = diagnose.build_report([], {}, {}, Policy(), scanned_pods=0)
    assert report.findings == ()
    assert report.to_json()["findings"] == []
    assert "No image-pull failures" in diagnose.render_table(report)


def test_one_image_on_two_node_oses_gives_one_finding_per_fix() -> None:
    """The same pause image failing on Bottlerocket and on AL2023 nodes: the fixes
    differ (host-ctr re-pull and pinning vs the EKS AMI's sandbox-image unit)."""
    nodes = {
        "br": NodeFacts("br", "eu-central-1", "Bottlerocket OS 1.20.0 (aws-k8s-1.29)"),
        "al": NodeFacts("al", "eu-central-1", "Amazon Linux 2023.6.20241212"),
    }
    obs = [_sandbox_obs(0, "br"), _sandbox_obs(1, "br"), _sandbox_obs(2, "al")]
    findings = diagnose.build_report(obs, {}, nodes, Policy()).findings
    assert sorted((tuple(f.nodes.items()), len(f.pods)) for f in findings) == [
        ((("al", 1),), 1),
        ((("br", 2),), 2),
    ]
    fixes = {next(iter(f.nodes)): " ".join(f.fix) for f in findings}
    assert "host-ctr" in fixes["br"] and "sandbox-image" in fixes["al"]
