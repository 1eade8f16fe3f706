"""The planner: one decision per container image.  Pure.

``plan_pod(meta, spec, namespace, ctx)`` looks at every container of a pod spec
(``initContainers``, ``containers``, ``ephemeralContainers``) and answers, for
each, keep, rewrite (with target, reason and the policy rule) or warn.

Rules the planner keeps, each of which a test asserts:

* A target is never in another partition than the cluster's: credentials and
  networks do not cross partitions (aws, aws-cn, aws-us-gov, ...).
* The repository path, tag and digest are kept exactly as written.
* FIPS and dual-stack host forms are kept where the target region has them.
* A reference that already points at a target is never rewritten, and planning
  over the planner's own output yields no rewrite (idempotence), which is what
  makes ``reinvocationPolicy: IfNeeded`` safe.
* Under the default policy only references known not to work are rewritten.

Availability comes from an *oracle* (``Oracle`` protocol).  ``StaticOracle``
knows the registry facts and the policy's declared-unavailable list; a probing
oracle (ECR token + OCI HEAD, with a budget and a cache) can wrap it later
without the planner changing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from webhook.core import ecr
from webhook.core.errors import InvalidReferenceError
from webhook.core.imageref import ImageRef, parse
from webhook.core.policy import MirrorTarget, Policy, RegionTarget

CONTAINER_KINDS: tuple[str, ...] = ("initContainers", "containers", "ephemeralContainers")


class Action(StrEnum):
    KEEP = "keep"
    REWRITE = "rewrite"
    WARN = "warn"


class Reason(StrEnum):
    """Reason codes.  Stable: they appear in audit records, metrics and reports."""

    # why an image is rewritten
    WRONG_ACCOUNT = "wrong-account"
    WRONG_PARTITION = "wrong-partition"
    NO_SUCH_ENDPOINT = "no-such-endpoint"
    REGISTRY_UNAVAILABLE = "registry-unavailable"
    MIRROR_PREFERRED = "mirror-preferred"
    CLUSTER_REGION_PREFERRED = "cluster-region-preferred"
    # why an image is kept
    NOT_MANAGED = "not-managed"
    AVAILABLE = "available"
    AT_TARGET = "at-target"
    NOT_JUDGED = "not-judged"
    SKIP_ANNOTATION = "skip-annotation"
    # why an image gets a warning
    INVALID_REFERENCE = "invalid-reference"
    NO_TARGET = "no-target"


class Availability(StrEnum):
    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Verdict:
    availability: Availability
    reason: Reason | None = None
    detail: str = ""


class Oracle(Protocol):
    """Answers whether an image reference can be pulled by the cluster."""

    def check(self, ref: ImageRef) -> Verdict: ...


@dataclass(frozen=True, slots=True)
class Cluster:
    """The cluster's region and partition (either may be unknown)."""

    region: str | None
    partition: str | None

    @classmethod
    def for_region(cls, region: str | None, facts: ecr.EcrFacts) -> Cluster:
        return cls(region, facts.partition_of(region) if region else None)


@dataclass(frozen=True)
class StaticOracle:
    """Availability from static facts only: registry data and declared outages."""

    facts: ecr.EcrFacts
    policy: Policy
    cluster: Cluster
    # Answers depend only on the reference: the planner may memoise them.
    static: bool = True

    def check(self, ref: ImageRef) -> Verdict:
        entry = self.policy.declared_unavailable(ref.host, ref.path)
        if entry is not None:
            return Verdict(
                Availability.UNAVAILABLE,
                Reason.REGISTRY_UNAVAILABLE,
                f"{entry} declared unavailable",
            )
        h = ecr.parse_host(ref.host)
        if h is None or h.region_partition is None:
            return Verdict(Availability.UNKNOWN)
        if not h.consistent:
            return Verdict(
                Availability.UNAVAILABLE,
                Reason.WRONG_PARTITION,
                f"{h.suffix} is not a registry domain of {h.region}",
            )
        if self.cluster.partition is not None and h.partition != self.cluster.partition:
            return Verdict(
                Availability.UNAVAILABLE,
                Reason.WRONG_PARTITION,
                f"{h.partition} registry, {self.cluster.partition} cluster",
            )
        if h.account not in self.facts.eks_accounts:
            return Verdict(Availability.UNKNOWN)
        facts = self.facts.regions.get(h.region)
        if facts is None:
            return Verdict(Availability.UNKNOWN)
        if facts.account != h.account:
            return Verdict(
                Availability.UNAVAILABLE, Reason.WRONG_ACCOUNT, f"wrong account for {h.region}"
            )
        if h.fips and facts.fips_host is None:
            return Verdict(
                Availability.UNAVAILABLE, Reason.NO_SUCH_ENDPOINT, f"no FIPS registry in {h.region}"
            )
        return Verdict(Availability.AVAILABLE)


@dataclass(frozen=True)
class PlanContext:
    """Everything the planner needs besides the pod: immutable, built once."""

    policy: Policy
    cluster: Cluster
    oracle: Oracle
    facts: ecr.EcrFacts
    # image -> judgement, used only when the oracle is static (its answers never
    # change); bounded so a long-running server cannot grow it without limit.
    memo: dict[str, Decision] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        policy: Policy,
        region: str | None,
        facts: ecr.EcrFacts | None = None,
        oracle: Oracle | None = None,
    ) -> PlanContext:
        facts = facts or ecr.default_facts()
        cluster = Cluster.for_region(region, facts)
        return cls(policy, cluster, oracle or StaticOracle(facts, policy, cluster), facts)


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens to one container's image.

    ``path`` is relative to the pod spec (``containers/0/image``); the patch
    builder joins it to the object's spec pointer.  ``rule`` names the policy
    entry that chose the target (``targets[0]``) or the rule that kept it.
    """

    container: str
    path: str
    image: str
    action: Action
    reason: Reason
    target: str | None = None
    rule: str = ""
    detail: str = ""

    @property
    def message(self) -> str:
        """A one-line human message, for reports and logs."""
        if self.action is Action.REWRITE:
            return f"image of container {self.container} rewritten to {self.target} ({self.detail})"
        if self.action is Action.WARN:
            return f"image of container {self.container} not rewritten: {self.detail}"
        return f"image of container {self.container} kept: {self.detail}"

    def short_message(self, limit: int = 120) -> str:
        """``message`` within ``limit`` characters, keeping the reason readable.

        kubectl shows admission warnings verbatim; when the full target does not
        fit, name only its registry host (the path, tag and digest are unchanged
        by construction), and only then cut.
        """
        text = self.message
        if len(text) > limit and self.action is Action.REWRITE and self.target:
            host = self.target.split("/", 1)[0]
            for short in (
                f"image of container {self.container} rewritten to {host}/… ({self.detail})",
                f"container {self.container}: image moved to {host} ({self.detail})",
                f"container {self.container} → {host} ({self.detail})",
                f"image of container {self.container} rewritten ({self.detail})",
            ):
                if len(short) <= limit:
                    return short
        return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class PodPlan:
    decisions: tuple[Decision, ...] = ()
    skipped: str | None = None

    @property
    def rewrites(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action is Action.REWRITE)

    @property
    def warnings(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action is Action.WARN)


def plan_pod(
    meta: Mapping[str, Any] | None,
    spec: Mapping[str, Any] | None,
    namespace: str | None,
    ctx: PlanContext,
    kinds: Sequence[str] = CONTAINER_KINDS,
) -> PodPlan:
    """Plan a pod (or pod template).  ``kinds`` limits the container lists looked at.

    Never raises on odd input: what is not a container list is skipped.
    """
    policy = ctx.policy
    meta = meta if isinstance(meta, Mapping) else {}
    if namespace and namespace in policy.exclude_namespaces:
        return PodPlan(skipped=f"namespace {namespace} is excluded by the policy")
    labels = meta.get("labels")
    if isinstance(labels, Mapping) and str(labels.get(policy.opt_out_label, "")).lower() == "true":
        return PodPlan(skipped=f"label {policy.opt_out_label}=true opts the pod out")
    skip = _skip_set(meta.get("annotations"), policy.skip_annotation)
    if not isinstance(spec, Mapping):
        return PodPlan()
    decisions: list[Decision] = []
    for kind in kinds:
        containers = spec.get(kind)
        if not isinstance(containers, list):
            continue
        for i, c in enumerate(containers):
            if not isinstance(c, Mapping):
                continue
            name = str(c.get("name", f"{kind}[{i}]"))
            decisions.append(_decide(name, f"{kind}/{i}/image", c.get("image"), skip, ctx))
    return PodPlan(decisions=tuple(decisions))


def _skip_set(annotations: object, key: str) -> frozenset[str]:
    if not isinstance(annotations, Mapping):
        return frozenset()
    value = annotations.get(key)
    if not isinstance(value, str):
        return frozenset()
    return frozenset(n.strip() for n in value.split(",") if n.strip())


MEMO_MAX = 4096


def _decide(
    name: str, path: str, image: object, skip: frozenset[str], ctx: PlanContext
) -> Decision:
    if not isinstance(image, str) or not image:
        return Decision(
            name, path, str(image), Action.KEEP, Reason.NOT_MANAGED, None, "", "no image"
        )
    if name in skip or "*" in skip:
        d = Decision(name, path, image, Action.KEEP, Reason.SKIP_ANNOTATION, None,
                     ctx.policy.skip_annotation, "skipped by annotation")  # fmt: skip
        return d
    if not getattr(ctx.oracle, "static", False):
        return _judge(name, path, image, ctx)
    judged = ctx.memo.get(image)
    if judged is None:
        judged = _judge("", "", image, ctx)
        if len(ctx.memo) >= MEMO_MAX:
            ctx.memo.clear()
        ctx.memo[image] = judged
    # Not dataclasses.replace: this is the admission hot path, and replace()
    # costs several times a direct construction.
    j = judged
    return Decision(name, path, j.image, j.action, j.reason, j.target, j.rule, j.detail)


def _judge(name: str, path: str, image: str, ctx: PlanContext) -> Decision:
    """The decision for one image, whatever container holds it."""

    def keep(reason: Reason, detail: str, rule: str = "") -> Decision:
        return Decision(name, path, image, Action.KEEP, reason, None, rule, detail)

    try:
        ref = parse(image)
    except InvalidReferenceError as exc:
        return Decision(name, path, image, Action.WARN, Reason.INVALID_REFERENCE, None, "", exc.why)
    policy = ctx.policy
    mirror = next((m for m in policy.mirrors if m.holds(ref.host, ref.path)), None)
    upstream = mirror.strip(ref.path) if mirror else ref.path
    if not policy.manages(upstream) or not (mirror or ecr.looks_like_ecr(ref.host)):
        return keep(Reason.NOT_MANAGED, "not a managed repository")

    verdict = ctx.oracle.check(ref)
    if verdict.availability is Availability.UNAVAILABLE:
        chosen = _choose(ref, upstream, ctx, policy.targets)
        if chosen is None:
            return Decision(
                name, path, image, Action.WARN, Reason.NO_TARGET, None, "",
                f"{verdict.detail}; no target in the policy can serve it",
            )  # fmt: skip
        target, rule = chosen
        assert verdict.reason is not None  # nosec B101  # a rewrite verdict has a reason; mypy narrowing
        return Decision(
            name, path, image, Action.REWRITE, verdict.reason, str(target), rule, verdict.detail
        )

    at_target = mirror is not None or _at_region_target(ref, ctx)
    if policy.prefer_mirror and mirror is None:
        chosen = _choose(ref, upstream, ctx, policy.mirrors, policy.targets, optional=True)
        if chosen is not None:
            return Decision(
                name, path, image, Action.REWRITE, Reason.MIRROR_PREFERRED, str(chosen[0]),
                chosen[1], "mirror preferred",
            )  # fmt: skip
    if policy.prefer_cluster_region and mirror is None and ctx.cluster.region is not None:
        h = ecr.parse_host(ref.host)
        if h is not None and h.region != ctx.cluster.region and ctx.facts.is_official(h):
            cluster_target = (RegionTarget(),)
            chosen = _choose(ref, upstream, ctx, cluster_target, optional=True)
            if chosen is not None:
                return Decision(
                    name, path, image, Action.REWRITE, Reason.CLUSTER_REGION_PREFERRED,
                    str(chosen[0]), "preferClusterRegion", f"{ctx.cluster.region} preferred",
                )  # fmt: skip
    if at_target:
        return keep(Reason.AT_TARGET, "already at a target")
    if verdict.availability is Availability.AVAILABLE:
        return keep(Reason.AVAILABLE, "pullable")
    return keep(Reason.NOT_JUDGED, "registry not known to be unavailable")


def _at_region_target(ref: ImageRef, ctx: PlanContext) -> bool:
    h = ecr.parse_host(ref.host)
    if h is None or not ctx.facts.is_official(h):
        return False
    for t in ctx.policy.targets:
        if isinstance(t, RegionTarget) and (t.region or ctx.cluster.region) == h.region:
            return True
    return False


def _candidate(
    ref: ImageRef, upstream: str, target: MirrorTarget | RegionTarget, ctx: PlanContext
) -> ImageRef | None:
    cluster = ctx.cluster
    h = ecr.parse_host(ref.host)
    # Never a target in another partition than the cluster's.  With no cluster
    # region the image's own partition stands in for it: without one or the
    # other nothing says a move across partitions could work.
    partition = cluster.partition or (h.partition if h is not None and h.consistent else None)
    if isinstance(target, MirrorTarget):
        mh = ecr.parse_host(target.registry.split(":")[0])
        if mh is not None and mh.partition != partition:
            return None
        domain, path = target.registry, target.path_for(upstream)
    else:
        # No cluster region: fall back to the image's own region, which is what
        # fixes a wrong-account reference without any configuration.
        region = target.region or cluster.region or (h.region if h else None)
        if region is None or region not in ctx.facts.regions:
            return None
        if ctx.facts.partition_of(region) != partition:
            return None
        domain = ctx.facts.official_host(
            region, fips=bool(h and h.fips), dualstack=bool(h and h.dualstack)
        )
        path = upstream
    try:
        return ref.with_name(domain, path)
    except InvalidReferenceError:
        return None


def _choose(
    ref: ImageRef,
    upstream: str,
    ctx: PlanContext,
    targets: Iterable[MirrorTarget | RegionTarget],
    numbering: Sequence[MirrorTarget | RegionTarget] | None = None,
    optional: bool = False,
) -> tuple[ImageRef, str] | None:
    """The first target that differs from ``ref`` and is not known unavailable.

    ``optional`` marks a rewrite the policy merely prefers (``preferMirror``,
    ``preferClusterRegion``): such a rewrite must not move a working FIPS
    reference to a host without a FIPS endpoint.
    """
    source = ecr.parse_host(ref.host)
    keep_fips = optional and source is not None and source.fips
    order = list(numbering if numbering is not None else ctx.policy.targets)
    for t in targets:
        cand = _candidate(ref, upstream, t, ctx)
        if cand is None or cand.name == ref.name:
            continue
        if keep_fips and not _is_fips(cand):
            continue
        if ctx.oracle.check(cand).availability is Availability.UNAVAILABLE:
            continue
        rule = f"targets[{order.index(t)}]" if t in order else t.describe()
        return cand, rule
    return None


def _is_fips(ref: ImageRef) -> bool:
    h = ecr.parse_host(ref.host)
    return h is not None and h.fips
