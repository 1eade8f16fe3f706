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
knows the registry facts and the policy's declared-unavailable list.  Probing
(issue 8) extends the seam without I/O in the core: the shell asks
``probe_requests`` which references a pod's decisions may consult, probes them
all concurrently within its budget, and plans with
``ctx.with_evidence(answers)``, whose oracle (``probing.EvidenceOracle``) also
answers ``probe(ref)``.  The decision rules over that evidence are stated in
``webhook.core.probing``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property, lru_cache
from typing import Any, Protocol

from webhook.core import ecr, jsonc
from webhook.core.errors import InvalidReferenceError
from webhook.core.imageref import ImageRef, parse
from webhook.core.policy import MirrorTarget, Policy, RegionTarget
from webhook.core.probing import (
    EvidenceOracle,
    Probe,
    none_available,
    upstream_of,
    usable,
)

CONTAINER_KINDS: tuple[str, ...] = ("initContainers", "containers", "ephemeralContainers")


# Bound of each memo below: a long-running server cannot grow them without limit.
MEMO_MAX = 4096
# Entries of one PodPlan's ``derived`` memo: a few annotation states, the audit entries.
DERIVED_MAX = 8


def _remember(memo: dict[Any, Any], key: object, value: object, limit: int = MEMO_MAX) -> None:
    """``memo[key] = value``, emptying ``memo`` first when it holds ``limit`` entries."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value


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
    # ... because a probe of the original answered (probing.Outcome values)
    NOT_FOUND = "not-found"
    UNAUTHORIZED = "unauthorized"
    THROTTLED = "throttled"
    SERVER_ERROR = "server-error"
    UNREACHABLE = "unreachable"
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
    # With probe evidence: image -> what to probe and which evidence to read
    # (static per policy), and (image, evidence fingerprint) -> judgement.
    # Shared by every ``with_evidence`` copy of this context; bounded likewise.
    facts_memo: dict[str, ImageFacts | None] = field(default_factory=dict, compare=False,
                                                      repr=False)  # fmt: skip
    evidence_memo: dict[tuple[str, tuple[object, ...]], Decision] = field(
        default_factory=dict, compare=False, repr=False)  # fmt: skip
    # Static oracle: (container name, path, image) -> the whole Decision, so a
    # pod shape seen before (every replica of a Deployment, every pod of a
    # DaemonSet) costs a lookup per container, not a construction.
    decisions: dict[tuple[str, str, str], Decision] = field(
        default_factory=dict, compare=False, repr=False)  # fmt: skip
    # Static oracle: (skip set, ((container, path, image), ...)) -> the whole
    # PodPlan of a pod of that shape (plan_pod).
    plans: dict[tuple[frozenset[str], tuple[tuple[str, str, Any], ...]], PodPlan] = field(
        default_factory=dict, compare=False, repr=False)  # fmt: skip

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

    def with_evidence(self, evidence: Mapping[str, Probe]) -> PlanContext:
        """This context, deciding also from probe answers (``str(ref)`` -> Probe).

        Cheap (no copy of the policy); made per admission.  The result never
        memoises decisions: evidence changes from one admission to the next.
        """
        base = self.oracle.base if isinstance(self.oracle, EvidenceOracle) else self.oracle
        oracle = EvidenceOracle(base, evidence, self.policy, self.cluster.region, self.facts)
        return PlanContext(self.policy, self.cluster, oracle, self.facts, self.memo,
                           self.facts_memo, self.evidence_memo, self.decisions,
                           self.plans)  # fmt: skip


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
    # The probe evidence behind the decision (the original first, then each
    # candidate in policy order); empty when probing is off.
    probes: tuple[Probe, ...] = ()

    @property
    def message(self) -> str:
        """A one-line human message, for reports and logs."""
        return _message(self.action, self.container, self.target, self.detail)

    def short_message(self, limit: int = 120) -> str:
        """``message`` within ``limit`` characters, keeping the reason readable.

        kubectl shows admission warnings verbatim; when the full target does not
        fit, name only its registry host (the path, tag and digest are unchanged
        by construction), and only then cut.  Memoised on what the text depends
        on: every admission of a known pod shape asks for the same lines.
        """
        return _short_message(self.action, self.container, self.target, self.detail, limit)


def _message(action: Action, container: str, target: str | None, detail: str) -> str:
    if action is Action.REWRITE:
        return f"image of container {container} rewritten to {target} ({detail})"
    if action is Action.WARN:
        return f"image of container {container} not rewritten: {detail}"
    return f"image of container {container} kept: {detail}"


@lru_cache(maxsize=MEMO_MAX)
def _short_message(action: Action, container: str, target: str | None, detail: str,
                   limit: int) -> str:  # fmt: skip
    text = _message(action, container, target, detail)
    if len(text) > limit and action is Action.REWRITE and target:
        host = target.split("/", 1)[0]
        for short in (
            f"image of container {container} rewritten to {host}/… ({detail})",
            f"container {container}: image moved to {host} ({detail})",
            f"container {container} → {host} ({detail})",
            f"image of container {container} rewritten ({detail})",
        ):
            if len(short) <= limit:
                return short
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class PodPlan:
    decisions: tuple[Decision, ...] = ()
    skipped: str | None = None
    # What is derived from this plan, memoised by whoever derives it (the
    # envelope: the patch, its base64 and the warnings, per annotation state;
    # the audit record: its container entries).  A static oracle hands every
    # pod of one shape the same PodPlan, so this memo is what makes a
    # DaemonSet's hundredth pod cost a few lookups.  Not part of the value;
    # use ``remember_derived`` to add to it (bounded).
    # init=False: dataclasses.replace() (review._only_new) gives a fresh one.
    derived: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def remember_derived(self, key: object, value: object) -> None:
        """``derived[key] = value``, bounded by DERIVED_MAX (``_remember``)."""
        _remember(self.derived, key, value, DERIVED_MAX)

    # Computed once: the admission path reads them three times (patch,
    # warnings, metrics).  cached_property writes the instance __dict__
    # directly, which a frozen (not slotted) dataclass allows.
    @cached_property
    def rewrites(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action is Action.REWRITE)

    @cached_property
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
    meta = meta if isinstance(meta, jsonc.OBJECT) else {}
    if namespace and namespace in policy.exclude_namespaces:
        return PodPlan(skipped=f"namespace {namespace} is excluded by the policy")
    if _opted_out(meta, policy.opt_out_label):
        return PodPlan(skipped=f"label {policy.opt_out_label}=true opts the pod out")
    skip = _skip_set(meta.get("annotations"), policy.skip_annotation)
    if not isinstance(spec, jsonc.OBJECT):
        return PodPlan()
    shape: list[tuple[str, str, Any]] = []  # (container name, path, image)
    all_str = True
    for kind in kinds:
        containers = spec.get(kind)
        if not isinstance(containers, list):
            continue
        for i, c in enumerate(containers):
            if not isinstance(c, jsonc.OBJECT):
                continue
            image = c.get("image")
            all_str = all_str and type(image) is str
            shape.append((str(c.get("name", f"{kind}[{i}]")), f"{kind}/{i}/image", image))
    oracle = ctx.oracle
    if not all_str or isinstance(oracle, EvidenceOracle) or not getattr(oracle, "static", False):
        return PodPlan(decisions=tuple(_decide(n, p, image, skip, ctx) for n, p, image in shape))
    # A static oracle: the whole plan is a function of the pod's shape, so every
    # pod of a DaemonSet or a Deployment gets the same PodPlan object, and with
    # it what is derived from it (PodPlan.derived).  Only str images are keyed:
    # anything else may be unhashable, or equal to another type's value (1 ==
    # True == 1.0) while the Decision keeps its own text.
    key = (skip, tuple(shape))
    planned = ctx.plans.get(key)
    if planned is None:
        planned = PodPlan(decisions=tuple(_decide(n, p, image, skip, ctx) for n, p, image in shape))
        _remember(ctx.plans, key, planned)
    return planned


def _opted_out(meta: Mapping[str, Any], label: str) -> bool:
    """Whether the pod's labels carry ``label=true`` (any case)."""
    labels = meta.get("labels")
    return isinstance(labels, jsonc.OBJECT) and str(labels.get(label, "")).lower() == "true"


def _skip_set(annotations: object, key: str) -> frozenset[str]:
    if not isinstance(annotations, jsonc.OBJECT):
        return frozenset()
    value = annotations.get(key)
    if not isinstance(value, str):
        return frozenset()
    return frozenset(n.strip() for n in value.split(",") if n.strip())



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
    oracle = ctx.oracle
    if isinstance(oracle, EvidenceOracle):
        return _decide_with_evidence(name, path, image, ctx, oracle)
    if not getattr(oracle, "static", False):
        return _judge(name, path, image, ctx)
    key = (name, path, image)
    decided = ctx.decisions.get(key)
    if decided is not None:
        return decided
    judged = ctx.memo.get(image)
    if judged is None:
        judged = _judge("", "", image, ctx)
        _remember(ctx.memo, image, judged)
    # Not dataclasses.replace: this is the admission hot path, and replace()
    # costs several times a direct construction.
    j = judged
    decided = Decision(name, path, j.image, j.action, j.reason, j.target, j.rule, j.detail)
    _remember(ctx.decisions, key, decided)
    return decided


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What probing needs to know about one managed image; depends on the policy only.

    ``requests``: the references to probe (the original unless static facts
    rule it out, each candidate, the upstream of each pull-through cache).
    ``consulted``: the original and the candidates, in policy order, whose
    evidence a decision shows.  ``keys``: ``str`` of every reference whose
    answer can change the decision (the memo fingerprint).
    """

    requests: tuple[ImageRef, ...]
    consulted: tuple[ImageRef, ...]
    keys: tuple[str, ...]


def image_facts(image: str, ctx: PlanContext) -> ImageFacts | None:
    """``ImageFacts`` of ``image`` (memoised), or None when it is invalid or not managed."""
    if image in ctx.facts_memo:
        return ctx.facts_memo[image]
    facts = _image_facts(image, ctx)
    _remember(ctx.facts_memo, image, facts)
    return facts


def _image_facts(image: str, ctx: PlanContext) -> ImageFacts | None:
    try:
        ref = parse(image)
    except InvalidReferenceError:
        return None
    policy = ctx.policy
    mirror, upstream = _source(ref, policy)
    if not policy.manages(upstream) or not (mirror or ecr.looks_like_ecr(ref.host)):
        return None
    base = ctx.oracle.base if isinstance(ctx.oracle, EvidenceOracle) else ctx.oracle
    requests: dict[str, ImageRef] = {}
    consulted: dict[str, ImageRef] = {ref.name: ref}

    def add(r: ImageRef) -> None:
        requests.setdefault(str(r), r)
        for m in policy.mirrors:
            up = upstream_of(r, m, ctx.cluster.region, ctx.facts)
            if up is not None:
                requests.setdefault(str(up), up)

    if base.check(ref).availability is not Availability.UNAVAILABLE:
        add(ref)
    for t in _probe_targets(policy):
        cand = _candidate(ref, upstream, t, ctx)
        if cand is not None and cand.name != ref.name:
            add(cand)
            consulted.setdefault(cand.name, cand)
    keys = dict.fromkeys([*requests, *(str(r) for r in consulted.values())])
    return ImageFacts(tuple(requests.values()), tuple(consulted.values()), tuple(keys))


def _probe_targets(policy: Policy) -> tuple[MirrorTarget | RegionTarget, ...]:
    targets = policy.candidates
    if policy.prefer_cluster_region and RegionTarget() not in targets:
        targets = (*targets, RegionTarget())
    return targets


def _decide_with_evidence(
    name: str, path: str, image: str, ctx: PlanContext, oracle: EvidenceOracle
) -> Decision:
    """``_judge`` over evidence, memoised on what the evidence says (not when or how fast)."""
    facts = image_facts(image, ctx)
    if facts is None:
        return _judge(name, path, image, ctx)
    ev = oracle.evidence
    fingerprint = tuple((p.outcome, p.detail) if (p := ev.get(k)) else None for k in facts.keys)
    key = (image, fingerprint)
    j = ctx.evidence_memo.get(key)
    if j is None:
        j = _judge("", "", image, ctx)
        _remember(ctx.evidence_memo, key, j)
    probes = tuple(p for r in facts.consulted if (p := oracle.probe(r)) is not None)
    return Decision(name, path, j.image, j.action, j.reason, j.target, j.rule, j.detail, probes)


def _source(ref: ImageRef, policy: Policy) -> tuple[MirrorTarget | None, str]:
    """The policy mirror that holds ``ref`` (if any) and its upstream repository path."""
    mirror = next((m for m in policy.mirrors if m.holds(ref.host, ref.path)), None)
    return mirror, mirror.strip(ref.path) if mirror else ref.path


def _judge(name: str, path: str, image: str, ctx: PlanContext) -> Decision:
    """The decision for one image, whatever container holds it."""
    try:
        ref = parse(image)
    except InvalidReferenceError as exc:
        return Decision(name, path, image, Action.WARN, Reason.INVALID_REFERENCE, None, "", exc.why)
    policy = ctx.policy
    mirror, upstream = _source(ref, policy)
    if not policy.manages(upstream) or not (mirror or ecr.looks_like_ecr(ref.host)):
        return Decision(name, path, image, Action.KEEP, Reason.NOT_MANAGED, None, "",
                        "not a managed repository")  # fmt: skip
    oracle = ctx.oracle
    probes: tuple[Probe, ...] = ()
    own: Probe | None = None
    if isinstance(oracle, EvidenceOracle):
        own = oracle.probe(ref)
        probes = _evidence(ref, upstream, ctx, oracle, own)

    def decided(action: Action, reason: Reason, target: ImageRef | None = None, rule: str = "",
                detail: str = "") -> Decision:  # fmt: skip
        return Decision(name, path, image, action, reason, None if target is None else str(target),
                        rule, detail, probes)  # fmt: skip

    verdict = oracle.check(ref)
    if verdict.availability is Availability.UNAVAILABLE:
        chosen = _choose(ref, upstream, ctx, policy.candidates)
        if chosen is None:
            said = f"; {none_available(own, probes[1 if own else 0:])}" if probes else ""
            return decided(Action.WARN, Reason.NO_TARGET, None, "",
                           f"{verdict.detail}; no target in the policy can serve it{said}")
        assert verdict.reason is not None  # nosec B101  # a rewrite verdict has a reason; mypy narrowing
        return decided(Action.REWRITE, verdict.reason, chosen[0], chosen[1], verdict.detail)
    if own is not None and own.unavailable:
        # Probing proved the original unusable: only a candidate proven
        # available replaces it (probing.py rule 2), else keep and warn (rule 5).
        chosen = _choose(ref, upstream, ctx, policy.candidates, proof=True)
        if chosen is None:
            return decided(Action.WARN, Reason.NO_TARGET, None, "",
                           none_available(own, probes[1:]))
        why = f"{ref.host}: {own.outcome}" + (f" ({own.detail})" if own.detail else "")
        return decided(Action.REWRITE, Reason(str(own.outcome)), chosen[0], chosen[1], why)

    at_target = mirror is not None or _at_region_target(ref, ctx)
    if policy.prefer_mirror and mirror is None:
        chosen = _choose(ref, upstream, ctx, policy.mirrors, policy.targets, optional=True)
        if chosen is not None:
            return decided(Action.REWRITE, Reason.MIRROR_PREFERRED, chosen[0], chosen[1],
                           "mirror preferred")  # fmt: skip
    if policy.prefer_cluster_region and mirror is None and ctx.cluster.region is not None:
        h = ecr.parse_host(ref.host)
        if h is not None and h.region != ctx.cluster.region and ctx.facts.is_official(h):
            cluster_target = (RegionTarget(),)
            chosen = _choose(ref, upstream, ctx, cluster_target, optional=True)
            if chosen is not None:
                why = f"{ctx.cluster.region} preferred"
                return decided(Action.REWRITE, Reason.CLUSTER_REGION_PREFERRED, chosen[0],
                               "preferClusterRegion", why)  # fmt: skip
    if at_target:
        return decided(Action.KEEP, Reason.AT_TARGET, None, "", "already at a target")
    if own is not None and own.available:
        return decided(Action.KEEP, Reason.AVAILABLE, None, "", "pullable (probed)")
    if verdict.availability is Availability.AVAILABLE:
        return decided(Action.KEEP, Reason.AVAILABLE, None, "", "pullable")
    return decided(Action.KEEP, Reason.NOT_JUDGED, None, "",
                   "registry not known to be unavailable")  # fmt: skip


def _evidence(
    ref: ImageRef, upstream: str, ctx: PlanContext, oracle: EvidenceOracle, own: Probe | None
) -> tuple[Probe, ...]:
    """The probes a decision rests on: the original's, then each candidate's, in order."""
    out = [own] if own is not None else []
    seen = {ref.name}
    for t in _probe_targets(ctx.policy):
        cand = _candidate(ref, upstream, t, ctx)
        if cand is None or cand.name in seen:
            continue
        seen.add(cand.name)
        p = oracle.probe(cand)
        if p is not None:
            out.append(p)
    return tuple(out)


def candidates_of(image: str, ctx: PlanContext) -> tuple[tuple[ImageRef, str], ...]:
    """The rewrite candidates of ``image`` with the policy entry of each, in order.

    For ``ecr-webhook probe``; empty for an invalid or unmanaged reference.
    """
    try:
        ref = parse(image)
    except InvalidReferenceError:
        return ()
    policy = ctx.policy
    _, upstream = _source(ref, policy)
    out: dict[str, tuple[ImageRef, str]] = {}
    for t in _probe_targets(policy):
        cand = _candidate(ref, upstream, t, ctx)
        if cand is not None and cand.name != ref.name:
            rule = "preferClusterRegion" if t not in policy.candidates else policy.rule_of(t)
            out.setdefault(cand.name, (cand, rule))
    return tuple(out.values())


def probe_requests(
    meta: Mapping[str, Any] | None,
    spec: Mapping[str, Any] | None,
    namespace: str | None,
    ctx: PlanContext,
    kinds: Sequence[str] = CONTAINER_KINDS,
) -> tuple[ImageRef, ...]:
    """Every reference the decisions of this pod may consult, for the shell to probe.

    The original of each managed image (unless static facts already rule it
    out, which no probe can overturn), each candidate the policy offers for
    it, and the upstream of each pull-through cache among them.  Pods and
    containers the planner skips are not probed.  Ordered, without repeats.
    """
    policy = ctx.policy
    meta = meta if isinstance(meta, jsonc.OBJECT) else {}
    if not isinstance(spec, jsonc.OBJECT) or (namespace and namespace in policy.exclude_namespaces):
        return ()
    if _opted_out(meta, policy.opt_out_label):
        return ()
    skip = _skip_set(meta.get("annotations"), policy.skip_annotation)
    if "*" in skip:
        return ()
    out: dict[str, ImageRef] = {}
    for kind in kinds:
        containers = spec.get(kind)
        if not isinstance(containers, list):
            continue
        for c in containers:
            if not isinstance(c, jsonc.OBJECT) or str(c.get("name", "")) in skip:
                continue
            image = c.get("image")
            facts = image_facts(image, ctx) if isinstance(image, str) else None
            if facts is not None:
                for r in facts.requests:
                    out.setdefault(str(r), r)
    return tuple(out.values())


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
        # No cluster region, or one the registry data does not list (a region
        # launched after this release: its EKS account is unknown): fall back to
        # the image's own region, which is what fixes a wrong-account reference
        # without any configuration.  The partition check below still holds.
        home = cluster.region if cluster.region in ctx.facts.regions else None
        region = target.region or home or (h.region if h else None)
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
    proof: bool = False,
) -> tuple[ImageRef, str] | None:
    """The first target that differs from ``ref`` and is not known unavailable.

    ``optional`` marks a rewrite the policy merely prefers (``preferMirror``,
    ``preferClusterRegion``): such a rewrite must not move a working FIPS
    reference to a host without a FIPS endpoint.

    With probe evidence (probing.py rules 2-4): a candidate found unavailable
    is never chosen; the first one proven available wins; only without such
    a one, and only when ``proof`` is not required, the first candidate with
    no answer (the static rule).
    """
    source = ecr.parse_host(ref.host)
    keep_fips = optional and source is not None and source.fips
    oracle = ctx.oracle
    evidence = oracle if isinstance(oracle, EvidenceOracle) else None
    fallback: tuple[ImageRef, str] | None = None
    for t in targets:
        cand = _candidate(ref, upstream, t, ctx)
        if cand is None or cand.name == ref.name:
            continue
        if keep_fips and not _is_fips(cand):
            continue
        if oracle.check(cand).availability is Availability.UNAVAILABLE:
            continue
        if numbering is not None and t in numbering:
            rule = f"targets[{list(numbering).index(t)}]"
        else:
            rule = ctx.policy.rule_of(t)
        if evidence is None:
            return cand, rule
        p = evidence.probe(cand)
        if p is not None and p.available:
            return cand, rule
        if fallback is None and not proof and usable(p):
            fallback = (cand, rule)
    return fallback


def _is_fips(ref: ImageRef) -> bool:
    h = ecr.parse_host(ref.host)
    return h is not None and h.fips
