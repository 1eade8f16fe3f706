"""Planner properties over generated pods (hypothesis): the partition rule, the
path/tag/digest rule, and idempotence, for every region and policy shape."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.core import ecr
from webhook.core.imageref import parse
from webhook.core.plan import Action, PlanContext, Reason, plan_pod
from webhook.core.policy import MirrorTarget, Policy, RegionTarget

FACTS = ecr.default_facts()
REGIONS = sorted(FACTS.regions)
ACCOUNTS = [*sorted(FACTS.eks_accounts), "111122223333"]
REPOS = [
    "amazon-k8s-cni",
    "amazon-k8s-cni-init",
    "eks/pause",
    "eks/coredns",
    "amazon/aws-network-policy-agent",
    "team/app",
]
DIGEST = "@sha256:" + "0123456789abcdef" * 4
# Well-formed cluster regions missing from the data (a release older than the
# region, issue 11): the same rules must hold, the partition taken from the name.
UNKNOWN_REGIONS = ["ap-southeast-9", "cn-southwest-7", "us-gov-north-3", "eusc-de-south-2"]


@st.composite
def ecr_image(draw: st.DrawFn) -> str:
    region = draw(st.sampled_from(REGIONS))
    account = draw(st.sampled_from(ACCOUNTS))
    p = ecr.partition(FACTS.regions[region].partition)
    fips = draw(st.booleans())
    dual = draw(st.booleans()) and p.dualstack_suffix is not None
    host = ecr.EcrHost(
        account, region, fips, dual, p.dualstack_suffix if dual else p.dns_suffix, p.id
    ).host
    repo = draw(st.sampled_from(REPOS))
    tag = draw(st.sampled_from([":v1.19.4", "", ":latest"]))
    digest = draw(st.sampled_from(["", DIGEST]))
    return f"{host}/{repo}{tag}{digest}" if (tag or digest) else f"{host}/{repo}"


policies = st.builds(
    lambda unavailable, fallback, mirror, pcr: Policy(
        targets=(
            (MirrorTarget("111122223333.dkr.ecr.us-east-1.amazonaws.com", "m"),) if mirror else ()
        )
        + (RegionTarget(),)
        + ((RegionTarget(fallback, "region"),) if fallback else ()),
        unavailable=tuple(unavailable),
        prefer_cluster_region=pcr,
    ),
    st.lists(st.sampled_from([FACTS.official_host(r) for r in REGIONS[:10]]), max_size=2),
    st.one_of(st.none(), st.sampled_from(REGIONS)),
    st.booleans(),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([*REGIONS, *UNKNOWN_REGIONS, None]),
    policies,
    st.lists(ecr_image(), min_size=1, max_size=4),
)
def test_planner_properties(region: str | None, policy: Policy, images: list[str]) -> None:
    ctx = PlanContext.build(policy, region)
    spec = {"containers": [{"name": f"c{i}", "image": im} for i, im in enumerate(images)]}
    plan = plan_pod({}, spec, "kube-system", ctx)
    assert len(plan.decisions) == len(images)
    new_images = []
    for d in plan.decisions:
        if d.action is not Action.REWRITE:
            new_images.append(d.image)
            continue
        before, after = parse(d.image), parse(d.target or "")
        # tag and digest are kept exactly
        assert (after.tag, after.digest) == (before.tag, before.digest)
        # the path is kept (a mirror may only prefix it)
        assert after.path == before.path or after.path.endswith("/" + before.path)
        # never a target in another partition than the cluster's
        h = ecr.parse_host(after.host)
        src = ecr.parse_host(before.host)
        # without a cluster region, the image's own partition is the bound
        want = FACTS.partition_of(region) if region is not None else (src and src.partition)
        if h is not None:
            assert h.partition == want, (d.image, d.target, region)
        # an optional rewrite never gives up a working FIPS endpoint
        if (
            d.reason in (Reason.MIRROR_PREFERRED, Reason.CLUSTER_REGION_PREFERRED)
            and src
            and src.fips
        ):
            assert h is not None and h.fips, (d.image, d.target)
        if h is not None and FACTS.is_official(h):
            # FIPS / dual-stack kept where the target region has them
            if src is not None and src.fips and FACTS.regions[h.region].fips_host:
                assert h.fips
            if (
                src is not None
                and src.dualstack
                and ecr.partition(h.partition or "aws").dualstack_suffix
            ):
                assert h.dualstack
        new_images.append(d.target)
    # idempotence: planning over the planner's own output yields nothing
    spec2 = {"containers": [{"name": f"c{i}", "image": im} for i, im in enumerate(new_images)]}
    assert plan_pod({}, spec2, "kube-system", ctx).rewrites == ()
