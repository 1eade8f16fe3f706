"""Availability probing, the pure half: outcomes, evidence and the decision rules.

The shell (``webhook.prober``) asks registries; this module only judges what
they answered.  The planner never waits on a network: before planning an
admission the shell probes every reference the planner may consult (the
original image and each rewrite candidate, ``plan.probe_requests``),
concurrently and inside one budget, and hands the answers in as an
``EvidenceOracle``.  The planner then decides from that evidence with the rules
below, which a test states one by one (tests/test_probing.py):

1. An original proven available stays, unless the policy prefers a mirror or the
   cluster's region (``preferMirror``, ``preferClusterRegion``).
2. Otherwise the first candidate, in policy order (``targets`` then
   ``fallbackRegions``), that is *proven* available is taken.
3. The static rules still hold when probing gives no answer in time: a
   known-wrong account is still fixed (to the first candidate not found
   unavailable, as without probing).
4. Probing only adds evidence: it never rewrites to a candidate it found
   unavailable.
5. No candidate available: the original is kept, with a warning naming what
   each candidate answered.
6. A mirror marked as a pull-through cache answers 404 until its first pull;
   that 404 is replaced by what its upstream answered.

Outcomes (issue 8): a probe answers ``available`` (2xx), ``not-found`` (404),
``unauthorized`` (401/403), ``throttled`` (429), ``server-error`` (5xx and any
other unexpected status) or ``unreachable`` (timeout, refused, DNS, TLS).
``no-answer`` marks a probe still running when the admission's budget ran out:
it is no evidence at all, and the static rules decide.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from webhook.core import ecr
from webhook.core.imageref import ImageRef
from webhook.core.policy import MirrorTarget, Policy


class Outcome(StrEnum):
    """What a registry answered to ``HEAD /v2/<repository>/manifests/<reference>``.

    The values double as reason codes: an image moved because its registry
    answered ``unauthorized`` carries the reason ``unauthorized``.
    """

    AVAILABLE = "available"
    NOT_FOUND = "not-found"
    UNAUTHORIZED = "unauthorized"
    THROTTLED = "throttled"
    SERVER_ERROR = "server-error"
    UNREACHABLE = "unreachable"
    NO_ANSWER = "no-answer"


# Outcomes that are evidence against a registry (everything answered but 2xx).
UNAVAILABLE_OUTCOMES = frozenset(
    {Outcome.NOT_FOUND, Outcome.UNAUTHORIZED, Outcome.THROTTLED, Outcome.SERVER_ERROR,
     Outcome.UNREACHABLE}
)  # fmt: skip
# Outcomes cached with the negative TTL (no-answer is never cached: it says nothing).
NEGATIVE = UNAVAILABLE_OUTCOMES


def classify_status(status: int) -> Outcome:
    """The outcome of an HTTP status of the manifest HEAD (Distribution API v2 spec).

    401 and 403 both mean the credentials do not open this repository (ECR
    answers 403 to a token of the wrong partition or a denied pull, 401 to a bad
    or expired token); any status the spec does not give for a HEAD of a
    manifest counts as a server error.
    """
    if 200 <= status < 300:
        return Outcome.AVAILABLE
    if status == 404:
        return Outcome.NOT_FOUND
    if status in (401, 403):
        return Outcome.UNAUTHORIZED
    if status == 429:
        return Outcome.THROTTLED
    return Outcome.SERVER_ERROR


@dataclass(frozen=True, slots=True)
class Probe:
    """The evidence of one probe: the reference asked for and what came back.

    ``latency_ms`` is the time the probe took (for a cached answer, the time
    the original probe took); ``cached`` says the answer came from the cache.
    ``detail`` is a short human text (``HTTP 401``, ``timed out``).
    """

    candidate: str
    outcome: Outcome
    latency_ms: float = 0.0
    cached: bool = False
    detail: str = ""

    @property
    def available(self) -> bool:
        return self.outcome is Outcome.AVAILABLE

    @property
    def unavailable(self) -> bool:
        return self.outcome in UNAVAILABLE_OUTCOMES

    def as_json(self) -> dict[str, Any]:
        """The evidence as it appears in reports and audit records (a contract)."""
        return {
            "candidate": self.candidate,
            "outcome": str(self.outcome),
            "latencyMs": round(self.latency_ms, 1),
            "cached": self.cached,
        }

    def says(self) -> str:
        """``<registry host> <outcome>``, for warnings."""
        host = self.candidate.split("/", 1)[0]
        return f"{host} {self.outcome}"


def upstream_of(ref: ImageRef, mirror: MirrorTarget, region: str | None,
                facts: ecr.EcrFacts) -> ImageRef | None:  # fmt: skip
    """The upstream reference a pull-through cache ``mirror`` serves ``ref`` from.

    ECR pull-through cache rules map ``<prefix>/<repository>`` to
    ``<upstream registry>/<repository>``.  The upstream is the mirror's
    ``upstream`` host, else the official EKS registry of the mirror's region
    (an ECR host), else of ``region`` (the cluster's).
    """
    if not mirror.pull_through_cache or not mirror.holds(ref.host, ref.path):
        return None
    host = mirror.upstream
    if host is None:
        mh = ecr.parse_host(mirror.registry.split(":")[0])
        upstream_region = mh.region if mh is not None else region
        if upstream_region is None or upstream_region not in facts.regions:
            return None
        host = facts.official_host(upstream_region)
    try:
        return ref.with_name(host, mirror.strip(ref.path))
    except Exception:  # an upstream name that is not a valid reference: no judgement
        return None


def judge_mirror(own: Probe | None, upstream: Probe | None) -> Probe | None:
    """A pull-through cache's evidence: its own answer, except a 404 is its upstream's."""
    if own is not None and own.outcome is not Outcome.NOT_FOUND:
        return own
    if upstream is None or upstream.outcome is Outcome.NO_ANSWER:
        return own
    candidate = own.candidate if own is not None else upstream.candidate
    return Probe(candidate, upstream.outcome, upstream.latency_ms, upstream.cached,
                 f"judged from upstream {upstream.candidate.split('/', 1)[0]}")  # fmt: skip


@dataclass(frozen=True)
class EvidenceOracle:
    """An ``Oracle`` that adds probe evidence to a static one.  Pure: no I/O.

    ``evidence`` maps an image reference (``str(ImageRef)``) to its probe.
    ``check`` answers the static verdict; the planner reads the evidence
    through ``probe`` and applies the rules of this module.  Not static: the
    planner must not memoise its answers (``PlanContext.memo``).
    """

    base: Any  # the static Oracle (typed loosely: plan imports this module)
    evidence: Mapping[str, Probe]
    policy: Policy
    region: str | None
    facts: ecr.EcrFacts
    static: bool = False

    def check(self, ref: ImageRef) -> Any:
        return self.base.check(ref)

    def probe(self, ref: ImageRef) -> Probe | None:
        """The evidence about ``ref`` (pull-through caches judged from upstream)."""
        own = self.evidence.get(str(ref))
        for m in self.policy.mirrors:
            up = upstream_of(ref, m, self.region, self.facts)
            if up is not None:
                return judge_mirror(own, self.evidence.get(str(up)))
        return own


def usable(probe: Probe | None) -> bool:
    """Rule 4: a candidate may be used unless probing found it unavailable."""
    return probe is None or not probe.unavailable


def none_available(original: Probe | None, candidates: Iterable[Probe | None]) -> str:
    """Rule 5's warning text: what the original and each candidate answered."""
    said = [p.says() for p in candidates if p is not None]
    head = f"{original.says()}" if original is not None else "no answer from the original"
    tail = "; ".join(said) if said else "no candidate to try"
    return f"{head}; no candidate available ({tail})"
