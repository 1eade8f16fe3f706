"""Policy validation: every error names the field and the bad value."""

from __future__ import annotations

import pytest

from webhook.core.errors import PolicyError
from webhook.core.plan import PlanContext
from webhook.core.policy import (
    DEFAULT_REPOSITORIES,
    MirrorTarget,
    Policy,
    RegionTarget,
    load_policy,
    resolve_region,
    unknown_region,
)


def test_empty_document_gives_defaults() -> None:
    p = load_policy("", source="cm")
    assert p.repositories == DEFAULT_REPOSITORIES
    assert p.targets == (RegionTarget(),)
    assert not p.prefer_cluster_region and not p.prefer_mirror
    assert p.manages("eks/pause") and p.manages("amazon-k8s-cni")
    assert p.manages("amazon/aws-network-policy-agent")
    assert not p.manages("library/nginx") and not p.manages("team/app")


def test_full_policy() -> None:
    p = load_policy(
        """
apiVersion: ecr-webhook.io/v1alpha1
kind: RewritePolicy
region: eu-central-1
additionalRepositories: ["team/*"]
exclude: {namespaces: [a, b], podLabel: example.com/off, containerAnnotation: example.com/skip}
targets:
  - {type: mirror, registry: 111122223333.dkr.ecr.eu-central-1.amazonaws.com, prefix: /mirror/}
  - {type: official}
  - {type: region, region: eu-west-1}
unavailable: [602401143452.dkr.ecr.us-east-1.amazonaws.com]
preferClusterRegion: true
""",
        source="policy.yaml",
    )
    assert p.region == "eu-central-1"
    assert p.manages("team/app") and p.manages("eks/pause")
    assert p.exclude_namespaces == frozenset({"a", "b"})
    assert p.targets[0] == MirrorTarget("111122223333.dkr.ecr.eu-central-1.amazonaws.com", "mirror")
    assert p.targets[2] == RegionTarget("eu-west-1", "region")
    assert p.declared_unavailable("602401143452.dkr.ecr.us-east-1.amazonaws.com", "eks/pause")
    assert (
        p.declared_unavailable("602401143452.dkr.ecr.us-west-2.amazonaws.com", "eks/pause") is None
    )


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("region: mars-1", "region", "mars-1"),
        ("region: moon-1", "region", "moon-1"),
        ("targets: [{type: region, region: us-west-9}]", "targets[0].region", "us-west-9"),
        ("targets: []", "targets", []),
        ("targets: [{type: cloud}]", "targets[0].type", "cloud"),
        ("targets: [{type: region, region: nowhere}]", "targets[0].region", "nowhere"),
        (
            "targets: [{type: official}, {type: mirror, registry: 'bad host'}]",
            "targets[1].registry",
            "bad host",
        ),
        (
            "targets: [{type: mirror, registry: r.example, prefix: UPPER}]",
            "targets[0].prefix",
            "UPPER",
        ),
        ("repositories: eks/*", "repositories", "eks/*"),
        ("repositories: [eks/*, 3]", "repositories[1]", 3),
        ("exclude: {namespaces: [Bad_NS]}", "exclude.namespaces[0]", "Bad_NS"),
        ("exclude: {podLabel: 'not a key'}", "exclude.podLabel", "not a key"),
        ("exclude: {nope: 1}", "exclude.nope", 1),
        ("preferMirror: yes please", "preferMirror", "yes please"),
        ("preferMirror: true", "preferMirror", True),
        ("unavailable: ['x y']", "unavailable[0]", "x y"),
        ("regoin: us-west-2", "regoin", "us-west-2"),
        ("apiVersion: v2", "apiVersion", "v2"),
        ("- a list", "(document)", ["a list"]),
    ],
)
def test_errors_name_field_and_value(text: str, field: str, value: object) -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy(text, source="my-policy.yaml")
    assert exc.value.field == field
    assert exc.value.value == value
    assert str(exc.value).startswith(f"my-policy.yaml: {field}: ")
    assert repr(value) in str(exc.value)


def test_bad_yaml_names_the_line() -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy("region: [unclosed\n", source="p.yaml")
    assert "line" in exc.value.field and "p.yaml" in str(exc.value)


def test_region_resolution_order() -> None:
    env = {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-2"}
    pol = Policy(region="eu-central-1")
    assert resolve_region("ap-southeast-4", pol, env) == "ap-southeast-4"
    assert resolve_region(None, pol, env) == "eu-central-1"
    assert resolve_region(None, Policy(), env) == "eu-west-1"
    assert resolve_region(None, Policy(), {"AWS_DEFAULT_REGION": "eu-west-2"}) == "eu-west-2"
    assert resolve_region(None, Policy(), {}) is None
    with pytest.raises(PolicyError) as exc:
        resolve_region(None, Policy(), {"AWS_REGION": "moon-1"})
    assert exc.value.field == "AWS_REGION"


@pytest.mark.parametrize("region", ["ap-southeast-9", "us-gov-north-3", "cn-southwest-7"])
def test_a_well_formed_region_missing_from_the_data_is_a_cluster_region(region: str) -> None:
    """Issue 11: a region AWS launched after this release must not stop the webhook.

    The cluster region is accepted from every source; its partition follows the
    name; ``unknown_region`` tells the shells to warn and count it.
    """
    assert load_policy(f"region: {region}").region == region
    assert resolve_region(region, Policy(), {}) == region
    assert resolve_region(None, Policy(), {"AWS_REGION": region}) == region
    assert unknown_region(region)
    assert not unknown_region("ap-southeast-4") and not unknown_region(None)
    want = {"ap": "aws", "us": "aws-us-gov", "cn": "aws-cn"}[region[:2]]
    assert PlanContext.build(Policy(), region).cluster.partition == want
    # A target region must be known: there would be no account to rewrite to.
    with pytest.raises(PolicyError) as exc:
        load_policy(f"targets: [{{type: region, region: {region}}}]")
    assert exc.value.field == "targets[0].region"


def test_targets_outside_the_policy_regions_partition_are_refused() -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy(
            "region: us-west-2\ntargets: [{type: official}, {type: region, region: cn-north-1}]"
        )
    assert exc.value.field == "targets[1]" and "aws-cn" in str(exc.value)
    with pytest.raises(PolicyError) as exc:
        load_policy(
            "region: cn-north-1\ntargets: [{type: mirror, "
            "registry: 111122223333.dkr.ecr.us-east-1.amazonaws.com}]"
        )
    assert exc.value.field == "targets[0]"


def test_an_empty_repository_list_manages_nothing() -> None:
    p = load_policy("repositories: []")
    assert not p.manages("eks/pause") and not p.manages("amazon-k8s-cni")
