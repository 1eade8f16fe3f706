"""Explain image-pull failures: classify, group, name the fix.  Pure.

Input is what the kubelet and containerd leave in the API: container statuses
waiting in ``ErrImagePull`` / ``ImagePullBackOff`` and Events with reasons
``Failed`` (``Failed to pull image "X": <error>``) and ``FailedCreatePodSandBox``
(``Failed to create pod sandbox: ... failed to get sandbox image "X": <error>``).
``webhook.scan`` reads them from a cluster and turns them into ``Observation``s;
everything after that happens here.

Classification uses the error text (the real texts, with their upstream issues,
are the fixtures in ``tests/fixtures/pull_errors.yaml``) together with the
registry facts the planner uses: a registry of another partition than the
node's region, or an EKS account that does not serve the image's region, is
known to fail whatever the text says.

The sandbox (pause) image is node configuration: containerd pulls it itself,
without the kubelet's ECR credential provider, and it is in no pod spec.  The
webhook cannot fix it; the fix is ``ecr-webhook node-config``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from webhook.core import ecr, nodeconfig
from webhook.core.errors import ConfigError
from webhook.core.imageref import try_parse
from webhook.core.plan import Action, PlanContext, plan_pod
from webhook.core.policy import Policy

SCHEMA_VERSION = "v1"


class FailureClass(StrEnum):
    """Failure classes.  Stable: they appear in the JSON report."""

    WRONG_ACCOUNT = "wrong-account"
    WRONG_PARTITION = "wrong-partition"
    SANDBOX_NO_CREDENTIALS = "sandbox-no-credentials"
    NOT_FOUND = "not-found"
    UNREACHABLE = "unreachable"
    ACCESS_DENIED = "access-denied"
    NO_CREDENTIALS = "no-credentials"
    UNCLASSIFIED = "unclassified"


# Error texts, lower-cased.  Sources: tests/fixtures/pull_errors.yaml.
_UNREACHABLE = re.compile(
    r"i/o timeout|dial tcp|client\.timeout exceeded|request canceled while waiting for connection"
    r"|deadlineexceeded|context deadline exceeded|no such host|connection refused"
    r"|network is unreachable|no route to host|tls handshake timeout|connection reset by peer"
)
_NOT_FOUND = re.compile(
    r"code = notfound|: not found\b|manifest unknown|name unknown"
    r"|does not exist in the registry|\bimage \S+ not found|404 not found"
)
_NO_AUTH = re.compile(
    r"no basic auth credentials|401 unauthorized|authorization failed"
    r"|status code \[manifests [^\]]*\]: 401"
)
_FORBIDDEN = re.compile(
    r"403 forbidden|\b403\b|not authorized to perform|<code>accessdenied</code>"
)
_SANDBOX_IMAGE = re.compile(r'failed to get sandbox image \\?"([^"\\]+)\\?"')
_PULL_IMAGE = re.compile(
    r'(?:failed to pull(?: and unpack)? image|back-off pulling image|pullimage) \\?"([^"\\]+)\\?"',
    re.I,
)
_NODE_REGION = re.compile(r"\.([a-z]{2,4}(?:-[a-z]+)+-\d+)\.compute\.internal$")


@dataclass(frozen=True, slots=True)
class Observation:
    """One failed pull as the API shows it (a container status or an Event)."""

    namespace: str
    pod: str
    node: str | None
    image: str
    message: str
    sandbox: bool
    source: str  # "status" or "event"
    reason: str
    container: str | None = None


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the scan knows about a node: region and OS, for the node-config command."""

    name: str
    region: str | None = None
    os_image: str = ""
    runtime: str = ""

    @property
    def node_os(self) -> str:
        """``bottlerocket``, ``al2023``, ``al2`` or ``containerd`` (``--os`` of node-config)."""
        img = self.os_image.lower()
        if "bottlerocket" in img:
            return "bottlerocket"
        if "amazon linux 2023" in img:
            # The NodeConfig of node-config carries the containerd 1.x form; a node
            # on containerd 2.x needs the 2.x (pinned_images) form of --os containerd.
            return "containerd" if self.runtime.startswith("containerd://2.") else "al2023"
        if "amazon linux 2" in img:
            return "al2"
        return "containerd"

    @property
    def bottlerocket_version(self) -> tuple[int, ...] | None:
        m = re.search(r"bottlerocket os (\d+)\.(\d+)\.(\d+)", self.os_image.lower())
        return tuple(int(x) for x in m.groups()) if m else None


@dataclass(frozen=True, slots=True)
class Diagnosis:
    cls: FailureClass
    why: str


@dataclass(frozen=True)
class Finding:
    """One class of failure for one image, with every node and pod it hits."""

    cls: FailureClass
    image: str
    sandbox: bool
    why: str
    fix: tuple[str, ...]
    nodes: Mapping[str, int]
    pods: tuple[str, ...]
    message: str
    commands: tuple[str, ...] = ()
    webhook: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "class": str(self.cls),
            "image": self.image,
            "sandbox": self.sandbox,
            "why": self.why,
            "fix": list(self.fix),
            "commands": list(self.commands),
            "webhook": self.webhook,
            "nodes": dict(self.nodes),
            "podCount": len(self.pods),
            "pods": list(self.pods),
            "message": self.message,
        }


@dataclass(frozen=True)
class Report:
    findings: tuple[Finding, ...]
    scanned_pods: int
    ignored_non_ecr: int
    policy_source: str
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "schemaVersion": SCHEMA_VERSION,
            "scannedPods": self.scanned_pods,
            "ignoredNonEcr": self.ignored_non_ecr,
            "policy": self.policy_source,
            "notes": list(self.notes),
            "findings": [f.to_json() for f in self.findings],
        }


def image_in_message(message: str) -> str | None:
    """The image a kubelet/containerd message is about, if it names one."""
    m = _SANDBOX_IMAGE.search(message) or _PULL_IMAGE.search(message)
    return m.group(1) if m else None


def is_sandbox_failure(reason: str, message: str) -> bool:
    return reason == "FailedCreatePodSandBox" or "sandbox image" in message.lower()


def region_of_node(name: str, labels: Mapping[str, str] | None) -> str | None:
    """The node's region: its well-known topology label, else its EC2 private DNS name."""
    labels = labels or {}
    for key in ("topology.kubernetes.io/region", "failure-domain.beta.kubernetes.io/region"):
        if labels.get(key):
            return labels[key]
    m = _NODE_REGION.search(name)
    if m:
        return m.group(1)
    # us-east-1 private DNS names end in ec2.internal (Amazon VPC user guide, DNS hostnames).
    return "us-east-1" if name.endswith(".ec2.internal") else None


def is_ecr_image(image: str) -> bool:
    ref = try_parse(image)
    return ref is not None and ecr.parse_host(ref.host) is not None


def classify(
    message: str,
    image: str,
    *,
    sandbox: bool,
    node_region: str | None,
    facts: ecr.EcrFacts,
) -> Diagnosis:
    """Classify one failure.  Never raises; unknown text is ``UNCLASSIFIED``.

    Order matters: facts that make a pull impossible (another partition, an EKS
    account that does not serve the region) come before the text, except a
    network failure or a 404, which the text states plainly.
    """
    text = message.lower()
    ref = try_parse(image)
    host = ecr.parse_host(ref.host) if ref else None
    node_partition = facts.partition_of(node_region) if node_region else None
    if host is not None and (
        not host.consistent or (node_partition and host.partition != node_partition)
    ):
        return Diagnosis(
            FailureClass.WRONG_PARTITION,
            f"{host.host} is a registry of partition {host.partition or 'unknown'} but the node "
            f"is in {node_region} ({node_partition}); credentials and networks do not cross "
            "partitions (the ECR token of one partition is refused by the other).",
        )
    if _UNREACHABLE.search(text):
        where = host.host if host else "the registry"
        cross = (
            f" The image is in {host.region}, the node in {node_region}: cross-region pulls "
            "need egress to that region."
            if host and node_region and host.region != node_region
            else ""
        )
        return Diagnosis(
            FailureClass.UNREACHABLE,
            f"The node could not connect to {where}: no route (no NAT or internet egress), no "
            "VPC endpoints (com.amazonaws.<region>.ecr.dkr, ecr.api and the S3 gateway for "
            f"layers), or a firewall.{cross}",
        )
    if _NOT_FOUND.search(text):
        where = host.host if host else "the registry"
        return Diagnosis(
            FailureClass.NOT_FOUND,
            f"{where} answered 'not found': this tag or repository does not exist there. EKS "
            "images reach regions at different times (aws/amazon-vpc-cni-k8s#3526).",
        )
    if host is not None and host.account in facts.eks_accounts:
        official = facts.regions.get(host.region)
        if official is not None and official.account != host.account:
            return Diagnosis(
                FailureClass.WRONG_ACCOUNT,
                f"{host.host} names EKS account {host.account}, but {host.region} is served by "
                f"{official.account} ({official.registry_host}); ECR refuses the pull with 403 "
                "Forbidden (aws/amazon-vpc-cni-k8s#3284).",
            )
    if _FORBIDDEN.search(text):
        return Diagnosis(
            FailureClass.ACCESS_DENIED,
            "The registry refused the node's credentials (403 / not authorized to perform "
            "ecr:BatchGetImage): the node role lacks ECR read permissions, the repository "
            "policy does not allow this account, or the repository path is wrong.",
        )
    if _NO_AUTH.search(text):
        if sandbox:
            return Diagnosis(
                FailureClass.SANDBOX_NO_CREDENTIALS,
                "containerd pulls the sandbox (pause) image itself, without the kubelet's ECR "
                "credential provider, so ECR answers 401 / 'no basic auth credentials'. The "
                "node had the image cached and lost it, usually to image garbage collection: "
                "since Kubernetes 1.29 the kubelet no longer keeps the image named by "
                "--pod-infra-container-image (awslabs/amazon-eks-ami#1597, "
                "bottlerocket-os/bottlerocket#3745).",
            )
        return Diagnosis(
            FailureClass.NO_CREDENTIALS,
            "The pull carried no valid ECR credentials: the kubelet's image credential "
            "provider (ecr-credential-provider) is missing, or its matchImages does not cover "
            "this registry host.",
        )
    return Diagnosis(FailureClass.UNCLASSIFIED, "Not a known failure; the text is shown as is.")


def _node_config(
    node: NodeFacts | None, region: str | None, policy: Policy, image: str, facts: ecr.EcrFacts
) -> tuple[str, str | None]:
    """The ``node-config`` command for this node, and the image it would set.

    The tag of the failing image is kept (``--pause-tag``) so that only the
    registry changes.  The image is None when node-config cannot render it
    (a region the registry data does not know and no mirror).
    """
    os_name = node.node_os if node else "containerd"
    ref = try_parse(image)
    tag = ref.tag if ref is not None and ref.tag else None
    mirror = None
    if policy.mirrors:
        m = policy.mirrors[0]
        mirror = f"{m.registry}/{m.prefix}" if m.prefix else m.registry
    cmd = f"ecr-webhook node-config --os {os_name} --region {region or '<region>'}"
    if tag and tag != nodeconfig.DEFAULT_PAUSE_TAGS[os_name]:
        cmd += f" --pause-tag {tag}"
    if mirror:
        cmd += f" --mirror {mirror}"
    if region is None:
        return cmd, None
    try:
        rendered = nodeconfig.render(os_name, region, pause_tag=tag, mirror=mirror, facts=facts)
    except ConfigError:
        return cmd, None
    return cmd, rendered.image


def _rollout(meta: Mapping[str, Any], namespace: str) -> str | None:
    """The kubectl command that recreates the pod's siblings, from its controller."""
    owner = next(
        (
            o
            for o in meta.get("ownerReferences") or []
            if isinstance(o, Mapping) and o.get("controller")
        ),
        None,
    )
    if owner is None:
        return None
    kind, name = str(owner.get("kind", "")), str(owner.get("name", ""))
    if kind == "ReplicaSet":
        # A Deployment's ReplicaSet is named <deployment>-<pod-template-hash>.
        labels = meta.get("labels") or {}
        h = str(labels.get("pod-template-hash", "")) if isinstance(labels, Mapping) else ""
        if not (h and name.endswith("-" + h)):
            return None
        kind, name = "Deployment", name[: -len(h) - 1]
    if kind not in ("Deployment", "DaemonSet", "StatefulSet"):
        return None
    return f"kubectl -n {namespace} rollout restart {kind.lower()}/{name}"


def _webhook_verdict(
    obs: Observation, pod: Mapping[str, Any] | None, ctx: PlanContext
) -> tuple[str, str | None]:
    """What the webhook does with this pod under the policy, and the command that
    makes it act (None when it does not rewrite the image)."""
    if pod is None:
        return "the pod is gone; cannot plan it", None
    meta = pod.get("metadata") or {}
    plan = plan_pod(meta, pod.get("spec"), obs.namespace, ctx)
    if plan.skipped:
        return f"the webhook leaves this pod alone: {plan.skipped}", None
    for d in plan.decisions:
        if d.image != obs.image:
            continue
        if d.action is Action.REWRITE:
            again = (
                _rollout(meta, obs.namespace) or f"kubectl -n {obs.namespace} delete pod {obs.pod}"
            )
            return (
                f"the webhook rewrites it to {d.target} ({d.reason}) when the pod is created "
                "again: recreate the pods so that they pass through the webhook",
                again,
            )
        return f"the webhook keeps it ({d.reason}: {d.detail or 'no rule applies'})", None
    return "the image is in no container of the pod spec", None


Pull = tuple[Observation, Diagnosis, str | None]  # an observation, its diagnosis, node region


def build_report(
    observations: Iterable[Observation],
    pods: Mapping[tuple[str, str], Mapping[str, Any]],
    nodes: Mapping[str, NodeFacts],
    policy: Policy,
    *,
    region: str | None = None,
    facts: ecr.EcrFacts | None = None,
    scanned_pods: int = 0,
    notes: Sequence[str] = (),
) -> Report:
    """Classify and group observations into findings, one per class and image
    (and nodes' region; for a sandbox image, their OS).

    ``region`` is the cluster region to fall back on for nodes whose region is
    unknown.  Images not on ECR are counted, not reported.
    """
    facts = facts or ecr.default_facts()
    # Several observations tell of one failed pull (the container status, the
    # kubelet's Failed events, the sandbox event): keep, per pod and image, the
    # first one that classifies, else the longest text.
    per_pull: dict[tuple[str, str, str, bool], Pull] = {}
    ignored: set[tuple[str, str, str, bool]] = set()
    for obs in observations:
        key = (obs.namespace, obs.pod, obs.image, obs.sandbox)
        if not is_ecr_image(obs.image):
            ignored.add(key)
            continue
        node = nodes.get(obs.node or "")
        node_region = (node.region if node else None) or region
        diag = classify(
            obs.message, obs.image, sandbox=obs.sandbox, node_region=node_region, facts=facts
        )
        old = per_pull.get(key)
        if old is None or (
            old[1].cls is FailureClass.UNCLASSIFIED
            and (
                diag.cls is not FailureClass.UNCLASSIFIED or len(obs.message) > len(old[0].message)
            )
        ):
            per_pull[key] = (obs, diag, node_region)
    # One finding per class and image; split further by the nodes' region (and,
    # for the sandbox image, their OS) because the fix depends on them.
    groups: dict[tuple[FailureClass, str, bool, str, str], list[Pull]] = {}
    for obs, diag, node_region in per_pull.values():
        node = nodes.get(obs.node or "")
        os_name = node.node_os if node and obs.sandbox else ""
        group = (diag.cls, obs.image, obs.sandbox, node_region or "", os_name)
        groups.setdefault(group, []).append((obs, diag, node_region))
    contexts: dict[str | None, PlanContext] = {}
    findings = []
    for (cls, image, sandbox, _, _), members in sorted(groups.items(), key=lambda kv: kv[0]):
        obs, diag, node_region = members[0]
        node = nodes.get(obs.node or "")
        ctx = contexts.get(node_region)
        if ctx is None:
            ctx = contexts[node_region] = PlanContext.build(policy, node_region, facts)
        fix, commands, webhook = _fix(cls, obs, sandbox, node, node_region, pods, ctx, policy)
        per_node: dict[str, int] = {}
        for o, _, _ in members:
            n = o.node or "<unscheduled>"
            per_node[n] = per_node.get(n, 0) + 1
        findings.append(
            Finding(
                cls=cls,
                image=image,
                sandbox=sandbox,
                why=diag.why,
                fix=fix,
                nodes=per_node,
                pods=tuple(sorted(f"{o.namespace}/{o.pod}" for o, _, _ in members)),
                message=obs.message,
                commands=commands,
                webhook=webhook,
            )
        )
    return Report(tuple(findings), scanned_pods, len(ignored), policy.source, tuple(notes))


def _fix(
    cls: FailureClass,
    obs: Observation,
    sandbox: bool,
    node: NodeFacts | None,
    region: str | None,
    pods: Mapping[tuple[str, str], Mapping[str, Any]],
    ctx: PlanContext,
    policy: Policy,
) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    probe = f"ecr-webhook probe {obs.image}"
    if sandbox:
        return _sandbox_fix(cls, obs, node, region, policy, ctx.facts, probe)
    pod = pods.get((obs.namespace, obs.pod))
    verdict, again = _webhook_verdict(obs, pod, ctx)
    if cls in (FailureClass.WRONG_ACCOUNT, FailureClass.WRONG_PARTITION):
        if again:
            return (f"Webhook: {verdict}.",), (again,), verdict
        return (
            (
                f"Webhook: {verdict}. Point the image at the registry of the node's region by "
                "hand, or add its repository to the policy's repositories.",
            ),
            (),
            verdict,
        )
    if cls is FailureClass.UNREACHABLE:
        return (
            (
                "Check what the node can reach, then declare the registry unavailable in the "
                "policy (unavailable: [...]) so the webhook moves the image. "
                f"Webhook now: {verdict}.",
            ),
            (probe,),
            verdict,
        )
    if cls is FailureClass.NOT_FOUND:
        return (
            (
                "Check the tag exists in this region's registry; use a tag that does, or a policy "
                f"target (another region or a mirror) that holds it. Webhook now: {verdict}.",
            ),
            (probe,),
            verdict,
        )
    if cls in (FailureClass.ACCESS_DENIED, FailureClass.NO_CREDENTIALS):
        return (
            (
                "Give the node role ECR read access (AmazonEC2ContainerRegistryReadOnly) and check "
                f"the kubelet's ECR credential provider. Webhook now: {verdict}.",
            ),
            (probe,),
            verdict,
        )
    return ("Unclassified: read the message below.",), (probe,), verdict


def _sandbox_fix(
    cls: FailureClass,
    obs: Observation,
    node: NodeFacts | None,
    region: str | None,
    policy: Policy,
    facts: ecr.EcrFacts,
    probe: str,
) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    fix = [
        "The sandbox (pause) image is node configuration, in no pod spec: the webhook "
        "cannot rewrite it."
    ]
    cmd, wanted = _node_config(node, region, policy, obs.image, facts)
    version = node.bottlerocket_version if node else None
    bottlerocket = node is not None and node.node_os == "bottlerocket"
    if version is not None and version >= (1, 21, 0):
        fix.append(
            f"This node runs Bottlerocket {'.'.join(map(str, version))}, which ships the pause "
            "image in the OS and ignores pod-infra-container-image: find what overrides the "
            "sandbox image on it (a custom containerd config or bootstrap container)."
        )
    commands: tuple[str, ...] = ()
    if (
        wanted is not None
        and wanted == obs.image
        and cls is not FailureClass.SANDBOX_NO_CREDENTIALS
    ):
        fix.append(
            f"The node already names the registry that serves {region} (`{cmd}` prints this "
            "same image): changing the setting will not help; the cause is the one above."
        )
    elif wanted is not None and wanted == obs.image:
        fix.append(
            f"The node already names the registry that serves {region} (`{cmd}` prints this "
            "same image): the setting is right, the image was lost and containerd cannot pull "
            "it again without credentials."
        )
        if bottlerocket:
            fix.append(
                "Bottlerocket: 1.19.1 and later pin the pause image so it is not garbage-"
                "collected (bottlerocket-os/bottlerocket#3757), 1.21.0 and later ship it in the "
                "OS (#3940): update the nodes. Until then, restarting the kubelet (or the node) "
                "pulls it again: the kubelet unit pulls it with host-ctr, which has ECR "
                "credentials, before it starts."
            )
        else:
            fix.append(
                "EKS AMIs: use a release that keeps the pause image pinned "
                "(awslabs/amazon-eks-ami#1597); `systemctl restart sandbox-image` pulls it "
                "again with ECR credentials on AL2 (awslabs/amazon-eks-ami#1425); or replace "
                "the node. A registry containerd can pull from without credentials (--mirror) "
                "removes the dependency."
            )
    else:
        fix.append(
            "Point the nodes' sandbox image at a registry they can pull from"
            + (f" ({wanted}):" if wanted else ":")
        )
        if bottlerocket:
            fix.append(
                "Bottlerocket 1.21.0 and later ship the pause image inside the OS: updating "
                "the nodes removes this registry pull altogether."
            )
        commands = (cmd,)
    if cls in (FailureClass.UNREACHABLE, FailureClass.NOT_FOUND, FailureClass.UNCLASSIFIED):
        commands += (probe,)
    return tuple(fix), commands, None


def render_table(report: Report, *, max_pods: int = 3, max_nodes: int = 5) -> str:
    """The ``--output table`` text: one block per finding, most pods first."""
    lines = []
    if not report.findings:
        lines.append(
            f"No image-pull failures on ECR images in {report.scanned_pods} pod(s) scanned."
        )
    for i, f in enumerate(sorted(report.findings, key=lambda f: -len(f.pods)), 1):
        kind = "sandbox image" if f.sandbox else "image"
        lines.append(f"[{i}] {f.cls}  {kind} {f.image}")
        nodes = sorted(f.nodes.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{n} ({c})" for n, c in nodes[:max_nodes])
        more = f", +{len(nodes) - max_nodes} more" if len(nodes) > max_nodes else ""
        lines.append(f"    pods: {len(f.pods)} on {len(nodes)} node(s): {shown}{more}")
        extra = f", +{len(f.pods) - max_pods} more" if len(f.pods) > max_pods else ""
        lines.append(f"    e.g.: {', '.join(f.pods[:max_pods])}{extra}")
        lines.append(f"    why:  {f.why}")
        for fx in f.fix:
            lines.append(f"    fix:  {fx}")
        for c in f.commands:
            lines.append(f"    run:  {c}")
        msg = f.message if len(f.message) <= 400 else f.message[:399] + "…"
        lines.append(f"    text: {msg}")
        lines.append("")
    if report.ignored_non_ecr:
        lines.append(f"({report.ignored_non_ecr} failing pull(s) of images not on ECR not shown.)")
    lines.append(f"(policy: {report.policy_source})")
    lines.extend(f"({n})" for n in report.notes)
    return "\n".join(lines).rstrip() + "\n"
