"""The rewrite policy: a validated, immutable object built from YAML.

The same YAML is the content of the ``policy.yaml`` key of the webhook's
ConfigMap.  Every validation error names the field (``targets[1].region``) and the
bad value.  Zero configuration gives ``Policy()``: the EKS system repositories,
the official registry of the cluster's region as the only target, and rewrites
only of references that are known not to work.

Example (all keys optional)::

    apiVersion: ecr-webhook.io/v1alpha1
    kind: RewritePolicy
    region: eu-central-1
    repositories: [amazon-k8s-cni, amazon-k8s-cni-init, "eks/*"]   # replaces defaults
    additionalRepositories: ["my-team/*"]                           # extends them
    exclude:
      namespaces: [ecr-webhook]
      podLabel: ecr-webhook.io/skip
      containerAnnotation: ecr-webhook.io/skip-containers
    targets:
      - {type: mirror, registry: 111122223333.dkr.ecr.eu-central-1.amazonaws.com,
         prefix: eks-mirror}
      - {type: official}              # the official registry of the cluster's region
      - {type: region, region: eu-west-1}
    unavailable: [602401143452.dkr.ecr.us-east-1.amazonaws.com]
    preferClusterRegion: false
    preferMirror: false
    fallbackRegions: [us-west-2]      # more candidates: the EKS registry of each
    probe:                            # availability probing (issue 8); off by default
      enabled: true
      timeoutSeconds: 1               # the budget of one admission, all its probes
      positiveTTLSeconds: 300
      negativeTTLSeconds: 30

A mirror target may be a pull-through cache (``pullThroughCache: true``,
optional ``upstream: <registry host>``): a pull-through cache repository answers
404 until its first pull, so probing judges it from its upstream.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from webhook.core import ecr
from webhook.core.errors import PolicyError

API_VERSION = "ecr-webhook.io/v1alpha1"
KIND = "RewritePolicy"

# The EKS system repositories, as published by the EKS account of each region
# (EKS user guide, "Amazon container image registries for Amazon EKS add-ons";
# VPC CNI config/master/aws-k8s-cni.yaml; eksctl pkg/addons/default/assets).
# "eks/*" covers pause, kube-proxy, coredns, the CSI drivers and their sidecars
# (csi-provisioner, csi-attacher, livenessprobe, ...), eks-pod-identity-agent,
# multus-cni and the device plugins.
DEFAULT_REPOSITORIES: tuple[str, ...] = (
    "amazon-k8s-cni",
    "amazon-k8s-cni-init",
    "cni-metrics-helper",
    "amazon/aws-network-policy-agent",
    "amazon/aws-load-balancer-controller",
    "eks/*",
)
DEFAULT_OPT_OUT_LABEL = "ecr-webhook.io/skip"
DEFAULT_SKIP_ANNOTATION = "ecr-webhook.io/skip-containers"
ORIGINALS_ANNOTATION = "ecr-webhook.io/original-images"
DEFAULT_EXCLUDED_NAMESPACES: tuple[str, ...] = ("ecr-webhook",)

# Kubernetes qualified names (label and annotation keys): optional DNS-subdomain
# prefix and '/', then a name of at most 63 characters (apimachinery validation).
_QUALIFIED_NAME = re.compile(
    r"^(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_NAMESPACE = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_REGISTRY = re.compile(r"^[a-zA-Z0-9.-]+(?::[0-9]+)?$")
_PREFIX = re.compile(
    r"^[a-z0-9]+(?:(?:[_.]|__|[-]+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[_.]|__|[-]+)[a-z0-9]+)*)*$"
)


@dataclass(frozen=True, slots=True)
class MirrorTarget:
    """Images copied or pull-through cached under ``registry/prefix/<repository>``.

    ``pull_through_cache``: an ECR pull-through cache repository is created on
    the first pull and answers 404 until then (ECR user guide, "Sync an upstream
    registry with an Amazon ECR private registry"), so a probe judges it from
    ``upstream`` (a registry host; default: the official EKS registry of the
    mirror's region, else of the cluster's).
    """

    registry: str
    prefix: str = ""
    type: Literal["mirror"] = "mirror"
    pull_through_cache: bool = False
    upstream: str | None = None

    def path_for(self, repository: str) -> str:
        return f"{self.prefix}/{repository}" if self.prefix else repository

    def holds(self, host: str | None, path: str) -> bool:
        if host is None or host.lower() != self.registry.lower().split(":")[0]:
            return False
        return not self.prefix or path.startswith(self.prefix + "/")

    def strip(self, path: str) -> str:
        """The upstream repository path of a path under this mirror."""
        return path[len(self.prefix) + 1 :] if self.prefix else path

    def describe(self) -> str:
        return f"mirror {self.registry}/{self.prefix}" if self.prefix else f"mirror {self.registry}"


@dataclass(frozen=True, slots=True)
class RegionTarget:
    """The official EKS registry of ``region``; ``None`` means the cluster's region."""

    region: str | None = None
    type: Literal["official", "region"] = "official"

    def describe(self) -> str:
        return f"official registry of {self.region}" if self.region else "official registry"


Target = MirrorTarget | RegionTarget

# Probing defaults (issue 8): one budget per admission, well under the
# webhook's timeoutSeconds (5); positive answers cached 5 min, negative 30 s.
DEFAULT_PROBE_BUDGET = 1.0
DEFAULT_POSITIVE_TTL = 300.0
DEFAULT_NEGATIVE_TTL = 30.0
# The budget must leave room for TLS and queueing under timeoutSeconds 5.
MAX_PROBE_BUDGET = 3.0


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    """The policy's ``probe:`` key.  ``None`` fields defer to the command line's defaults."""

    enabled: bool = False
    timeout: float | None = None
    positive_ttl: float | None = None
    negative_ttl: float | None = None


@dataclass(frozen=True)
class Policy:
    """What to rewrite, and to where.  Immutable; ``load_policy`` builds one."""

    region: str | None = None
    repositories: tuple[str, ...] = DEFAULT_REPOSITORIES
    exclude_namespaces: frozenset[str] = frozenset(DEFAULT_EXCLUDED_NAMESPACES)
    opt_out_label: str = DEFAULT_OPT_OUT_LABEL
    skip_annotation: str = DEFAULT_SKIP_ANNOTATION
    targets: tuple[Target, ...] = (RegionTarget(),)
    unavailable: tuple[str, ...] = ()
    prefer_cluster_region: bool = False
    prefer_mirror: bool = False
    fallback_regions: tuple[str, ...] = ()
    probe: ProbeSettings = ProbeSettings()
    source: str = "<defaults>"
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        pats = tuple(re.compile(fnmatch.translate(p)) for p in self.repositories)
        object.__setattr__(self, "_patterns", pats)

    def manages(self, repository: str) -> bool:
        """True when ``repository`` (a path such as ``eks/pause``) is in scope."""
        return any(p.match(repository) for p in self._patterns)

    def declared_unavailable(self, host: str | None, path: str) -> str | None:
        """The ``unavailable`` entry that covers host/path, if any."""
        if host is None:
            return None
        name = f"{host.lower()}/{path}"
        for entry in self.unavailable:
            e = entry.lower().rstrip("/")
            if name == e or name.startswith(e + "/") or host.lower() == e:
                return entry
        return None

    @property
    def mirrors(self) -> tuple[MirrorTarget, ...]:
        return tuple(t for t in self.targets if isinstance(t, MirrorTarget))

    @property
    def candidates(self) -> tuple[Target, ...]:
        """Rewrite candidates in order of preference: ``targets``, then ``fallbackRegions``.

        A fallback region is the official EKS registry of that region; one that
        is already a target is not repeated.
        """
        if not self.fallback_regions:
            return self.targets
        extra = tuple(
            t for t in (RegionTarget(r, "region") for r in self.fallback_regions)
            if t not in self.targets
        )  # fmt: skip
        return self.targets + extra

    def rule_of(self, target: Target) -> str:
        """The policy entry that names ``target`` (``targets[0]``, ``fallbackRegions[1]``)."""
        if target in self.targets:
            return f"targets[{self.targets.index(target)}]"
        if isinstance(target, RegionTarget) and target.region in self.fallback_regions:
            return f"fallbackRegions[{self.fallback_regions.index(target.region)}]"
        return target.describe()


def _fail(field_: str, value: object, why: str, source: str) -> PolicyError:
    return PolicyError(field_, value, why, source)


def _str_list(doc: Mapping[str, Any], key: str, src: str, where: str) -> tuple[str, ...] | None:
    if key not in doc or doc[key] is None:
        return None
    value = doc[key]
    if not isinstance(value, list):
        raise _fail(where + key, value, "must be a list of strings", src)
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise _fail(f"{where}{key}[{i}]", item, "must be a non-empty string", src)
    return tuple(value)


def _region(
    value: object, field_: str, src: str, facts: ecr.EcrFacts, *, cluster: bool = False
) -> str:
    """A validated region name.

    ``cluster`` marks the cluster's own region (``region:``, ``--region``,
    AWS_REGION): a well-formed name that the registry data does not list is
    accepted there, because AWS launches regions after a release and a webhook
    that refuses to start in one crash-loops (issue 11).  Its partition follows
    from the name (``ecr.partition_of_region``); the static facts then know no
    EKS account for it (see ``webhook.core.plan``), and the shells warn and
    count it.  A target region must be known: there is nothing to rewrite to.
    """
    if not isinstance(value, str) or ecr.partition_of_region(value) is None:
        raise _fail(field_, value, "not an AWS region name (e.g. us-west-2)", src)
    if value not in facts.regions and not cluster:
        raise _fail(
            field_,
            value,
            "no EKS registry is known for this region (see data/ecr_accounts.csv)",
            src,
        )
    return value


def check_region(value: object, field_: str, source: str, facts: ecr.EcrFacts | None = None) -> str:
    """``value`` if it is a region with a known EKS registry; else PolicyError naming ``field_``."""
    return _region(value, field_, source, facts or ecr.default_facts())


def _bool(doc: Mapping[str, Any], key: str, src: str) -> bool:
    value = doc.get(key, False)
    if not isinstance(value, bool):
        raise _fail(key, value, "must be true or false", src)
    return value


_TOP_KEYS = {
    "apiVersion", "kind", "region", "repositories", "additionalRepositories", "exclude",
    "targets", "unavailable", "preferClusterRegion", "preferMirror", "fallbackRegions", "probe",
}  # fmt: skip


def policy_from_mapping(
    doc: Mapping[str, Any] | None, source: str = "policy", facts: ecr.EcrFacts | None = None
) -> Policy:
    """Validate a decoded policy document and build the Policy."""
    facts = facts or ecr.default_facts()
    if doc is None:
        return Policy(source=source)
    if not isinstance(doc, Mapping):
        raise _fail("(document)", doc, "a policy must be a mapping", source)
    for key in doc:
        if key not in _TOP_KEYS:
            raise _fail(str(key), doc[key], f"unknown field; allowed: {sorted(_TOP_KEYS)}", source)
    if doc.get("apiVersion", API_VERSION) != API_VERSION:
        raise _fail("apiVersion", doc["apiVersion"], f"must be {API_VERSION}", source)
    if doc.get("kind", KIND) != KIND:
        raise _fail("kind", doc["kind"], f"must be {KIND}", source)

    region = doc.get("region")
    if region is not None:
        region = _region(region, "region", source, facts, cluster=True)

    # An explicit list replaces the defaults, even an empty one (manage nothing).
    listed = _str_list(doc, "repositories", source, "")
    repos = DEFAULT_REPOSITORIES if listed is None else listed
    repos += _str_list(doc, "additionalRepositories", source, "") or ()

    exclude = doc.get("exclude") or {}
    if not isinstance(exclude, Mapping):
        raise _fail("exclude", exclude, "must be a mapping", source)
    for key in exclude:
        if key not in {"namespaces", "podLabel", "containerAnnotation"}:
            raise _fail(f"exclude.{key}", exclude[key], "unknown field", source)
    namespaces = _str_list(exclude, "namespaces", source, "exclude.")
    if namespaces is None:
        namespaces = DEFAULT_EXCLUDED_NAMESPACES
    for i, ns in enumerate(namespaces):
        if not _NAMESPACE.match(ns):
            raise _fail(f"exclude.namespaces[{i}]", ns, "not a valid namespace name", source)
    label = exclude.get("podLabel", DEFAULT_OPT_OUT_LABEL)
    annotation = exclude.get("containerAnnotation", DEFAULT_SKIP_ANNOTATION)
    for name, value in (("podLabel", label), ("containerAnnotation", annotation)):
        if not isinstance(value, str) or not _QUALIFIED_NAME.match(value):
            raise _fail(f"exclude.{name}", value, "not a valid Kubernetes key", source)

    targets = _targets(doc.get("targets"), source, facts)
    unavailable = _str_list(doc, "unavailable", source, "") or ()
    for i, entry in enumerate(unavailable):
        host = entry.split("/", 1)[0]
        if not _REGISTRY.match(host):
            raise _fail(f"unavailable[{i}]", entry, "must be a registry host[/path]", source)

    fallback = _str_list(doc, "fallbackRegions", source, "") or ()
    fallback = tuple(
        _region(r, f"fallbackRegions[{i}]", source, facts) for i, r in enumerate(fallback)
    )
    policy = Policy(
        region=region,
        repositories=repos,
        exclude_namespaces=frozenset(namespaces),
        opt_out_label=label,
        skip_annotation=annotation,
        targets=targets,
        unavailable=unavailable,
        prefer_cluster_region=_bool(doc, "preferClusterRegion", source),
        prefer_mirror=_bool(doc, "preferMirror", source),
        fallback_regions=fallback,
        probe=_probe(doc.get("probe"), source),
        source=source,
    )
    if region is not None:
        want = facts.partition_of(region)
        for i, t in enumerate(targets):
            other = _target_partition(t, facts)
            if other is not None and other != want:
                raise _fail(
                    f"targets[{i}]", t.describe(),
                    f"is in partition {other}, the cluster region {region} in {want}; "
                    "a target is never used across partitions",
                    source,
                )  # fmt: skip
        for i, r in enumerate(fallback):
            if facts.partition_of(r) != want:
                raise _fail(
                    f"fallbackRegions[{i}]", r,
                    f"is in partition {facts.partition_of(r)}, the cluster region {region} "
                    f"in {want}; a fallback is never used across partitions",
                    source,
                )  # fmt: skip
    if policy.prefer_mirror and not policy.mirrors:
        raise _fail("preferMirror", True, "needs at least one target of type mirror", source)
    return policy


def _targets(value: object, src: str, facts: ecr.EcrFacts) -> tuple[Target, ...]:
    if value is None:
        return (RegionTarget(),)
    if not isinstance(value, list) or not value:
        raise _fail("targets", value, "must be a non-empty list", src)
    out: list[Target] = []
    for i, item in enumerate(value):
        where = f"targets[{i}]"
        if not isinstance(item, Mapping):
            raise _fail(where, item, "must be a mapping with a type", src)
        kind = item.get("type")
        if kind == "mirror":
            extra = set(item) - {"type", "registry", "prefix", "pullThroughCache", "upstream"}
            if extra:
                raise _fail(f"{where}.{sorted(extra)[0]}", item, "unknown field", src)
            registry = item.get("registry")
            if not isinstance(registry, str) or not _REGISTRY.match(registry):
                raise _fail(f"{where}.registry", registry, "must be a registry host", src)
            prefix = item.get("prefix", "") or ""
            if not isinstance(prefix, str) or (prefix and not _PREFIX.match(prefix.strip("/"))):
                raise _fail(f"{where}.prefix", prefix, "must be a lower-case repository path", src)
            ptc = item.get("pullThroughCache", False)
            if not isinstance(ptc, bool):
                raise _fail(f"{where}.pullThroughCache", ptc, "must be true or false", src)
            upstream = item.get("upstream")
            if upstream is not None and (
                not isinstance(upstream, str) or not _REGISTRY.match(upstream)
            ):
                raise _fail(f"{where}.upstream", upstream, "must be a registry host", src)
            if upstream is not None and not ptc:
                raise _fail(f"{where}.upstream", upstream, "needs pullThroughCache: true", src)
            out.append(MirrorTarget(registry=registry, prefix=prefix.strip("/"),
                                    pull_through_cache=ptc, upstream=upstream))  # fmt: skip
        elif kind == "official":
            if set(item) - {"type"}:
                raise _fail(where, item, "type official takes no other field", src)
            out.append(RegionTarget())
        elif kind == "region":
            if set(item) - {"type", "region"}:
                raise _fail(where, item, "type region takes only region", src)
            region = _region(item.get("region"), f"{where}.region", src, facts)
            out.append(RegionTarget(region=region, type="region"))
        else:
            raise _fail(f"{where}.type", kind, "must be one of mirror, official, region", src)
    return tuple(out)


def _seconds(value: object, field_: str, src: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low < value <= high:
        raise _fail(field_, value, f"must be a number of seconds in ({low:g}, {high:g}]", src)
    return float(value)


def _probe(value: object, src: str) -> ProbeSettings:
    """The ``probe:`` key: ``true``/``false`` or a mapping."""
    if value is None:
        return ProbeSettings()
    if isinstance(value, bool):
        return ProbeSettings(enabled=value)
    if not isinstance(value, Mapping):
        raise _fail("probe", value, "must be true, false or a mapping", src)
    allowed = {"enabled", "timeoutSeconds", "positiveTTLSeconds", "negativeTTLSeconds"}
    for key in value:
        if key not in allowed:
            raise _fail(f"probe.{key}", value[key], f"unknown field; allowed: {sorted(allowed)}",
                        src)  # fmt: skip
    enabled = value.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail("probe.enabled", enabled, "must be true or false", src)
    out: dict[str, float | None] = {}
    for key, name, high in (("timeoutSeconds", "timeout", MAX_PROBE_BUDGET),
                            ("positiveTTLSeconds", "positive_ttl", 86400.0),
                            ("negativeTTLSeconds", "negative_ttl", 86400.0)):  # fmt: skip
        out[name] = None if value.get(key) is None else _seconds(
            value[key], f"probe.{key}", src, 0.0, high
        )
    return ProbeSettings(enabled, out["timeout"], out["positive_ttl"], out["negative_ttl"])


def _target_partition(t: Target, facts: ecr.EcrFacts) -> str | None:
    if isinstance(t, RegionTarget):
        return facts.partition_of(t.region) if t.region else None
    h = ecr.parse_host(t.registry.split(":")[0])
    return h.partition if h is not None else None


def load_policy(text: str, source: str = "policy", facts: ecr.EcrFacts | None = None) -> Policy:
    """Parse and validate policy YAML text.  ``source`` names it in errors."""
    try:
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # nosec B506  # CSafeLoader/SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(document)"
        raise PolicyError(where, text[:40], f"not valid YAML: {exc}", source) from None
    return policy_from_mapping(doc, source, facts)


def resolve_region(
    flag: str | None, policy: Policy, env: Mapping[str, str], facts: ecr.EcrFacts | None = None
) -> str | None:
    """The cluster region: ``--region``, else the policy, else AWS_REGION/AWS_DEFAULT_REGION.

    ``env`` is passed in (not read here) so the core stays free of I/O.
    """
    facts = facts or ecr.default_facts()
    for name, value in (
        ("--region", flag),
        ("region", policy.region),
        ("AWS_REGION", env.get("AWS_REGION")),
        ("AWS_DEFAULT_REGION", env.get("AWS_DEFAULT_REGION")),
    ):
        if value:
            src = {"--region": "command line", "region": policy.source}.get(name, "environment")
            return _region(value, name, src, facts, cluster=True)
    return None


def unknown_region(region: str | None, facts: ecr.EcrFacts | None = None) -> bool:
    """True for a cluster region that is well-formed but not in the registry data."""
    facts = facts or ecr.default_facts()
    return region is not None and region not in facts.regions
