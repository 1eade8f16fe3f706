"""The planner over every real upstream manifest in ../shared/corpus.

Skips (with the reason) only when ../shared is absent; CI has it.  For every
manifest, in a cluster of every partition and of the opt-in regions, it checks:
nothing crashes; every rewrite keeps path, tag and digest; every target is an
official EKS host (or a configured mirror) in the cluster's partition; and the
result is stable under re-planning.  The inventory of image references is run
through the same checks, one pod per image.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from webhook.core import ecr
from webhook.core.imageref import parse, try_parse
from webhook.core.plan import Action, PlanContext, plan_pod
from webhook.core.policy import MirrorTarget, Policy, RegionTarget
from webhook.dryrun import plan_documents, read_documents

pytestmark = pytest.mark.corpus
FACTS = ecr.default_facts()
# One region per partition, plus the opt-in regions with their own accounts.
REGIONS = [
    "us-west-2",
    "eu-central-1",
    "cn-north-1",
    "us-gov-west-1",
    "eusc-de-east-1",
    "us-iso-east-1",
    "ap-southeast-4",
    "af-south-1",
    "me-central-1",
    "il-central-1",
]
MIRROR = MirrorTarget("111122223333.dkr.ecr.us-east-1.amazonaws.com", "eks-mirror")
POLICIES = {
    "default": Policy(),
    "mirror-first": Policy(targets=(MIRROR, RegionTarget()), prefer_mirror=True),
    "outage": Policy(
        unavailable=("602401143452.dkr.ecr.us-west-2.amazonaws.com",),
        targets=(RegionTarget(), RegionTarget("us-east-1", "region")),
    ),
}


def _manifests(shared: Path) -> list[Path]:
    corpus = shared / "corpus"
    files = sorted(p for p in corpus.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert len(files) >= 40, f"expected the corpus manifests under {corpus}"
    return files


def _check_rewrite(image: str, target: str, region: str, policy: Policy) -> None:
    before, after = parse(image), parse(target)
    assert (after.tag, after.digest) == (before.tag, before.digest), (image, target)
    assert after.path in {before.path, f"{MIRROR.prefix}/{before.path}"}
    h = ecr.parse_host(after.host)
    assert h is not None, target
    assert h.partition == FACTS.partition_of(region), (image, target, region)
    is_mirror = any(m.holds(after.host, after.path) for m in policy.mirrors)
    assert FACTS.is_official(h) or is_mirror, target


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
@pytest.mark.parametrize("region", REGIONS)
def test_corpus_manifests(shared_dir: Path, region: str, policy_name: str) -> None:
    policy = POLICIES[policy_name]
    ctx = PlanContext.build(policy, region)
    planned = rewrites = 0
    for path in _manifests(shared_dir):
        docs = read_documents(str(path), path.read_text(encoding="utf-8"))
        result = plan_documents(docs, ctx)
        for obj in result.objects:
            planned += len(obj.plan.decisions)
            for d in obj.plan.rewrites:
                rewrites += 1
                assert d.target is not None
                _check_rewrite(d.image, d.target, region, policy)
        # idempotence over the rewritten documents
        again = plan_documents(
            [
                type(d)(d.source, d.index, result.rewritten.get(i, d.data), d.error)
                for i, d in enumerate(docs)
            ],
            ctx,
        )
        assert all(o.plan.rewrites == () for o in again.objects), path
    assert planned > 50
    if region in ("cn-north-1", "ap-southeast-4", "us-gov-west-1") or policy_name != "default":
        assert rewrites > 0, "these clusters cannot pull the commercial default images"


def test_corpus_untouched_in_commercial_region(shared_dir: Path) -> None:
    """The released VPC CNI manifests (us-west-2 images) work in eu-central-1: untouched."""
    ctx = PlanContext.build(Policy(), "eu-central-1")
    cni = sorted((shared_dir / "corpus" / "vpc-cni").glob("*aws-k8s-cni.yaml"))
    assert len(cni) >= 15
    for path in cni:
        result = plan_documents(read_documents(str(path), path.read_text()), ctx)
        assert result.objects, path
        assert all(o.plan.rewrites == () for o in result.objects), path


def test_inventory_images(shared_dir: Path) -> None:
    with (shared_dir / "corpus" / "images_inventory.tsv").open(newline="") as f:
        images = sorted({row["image"] for row in csv.DictReader(f, delimiter="\t")})
    assert len(images) > 100
    valid = [i for i in images if try_parse(i) is not None]
    assert len(valid) > 0.8 * len(images)
    for region in REGIONS:
        for policy in POLICIES.values():
            ctx = PlanContext.build(policy, region)
            spec = {"containers": [{"name": f"c{i}", "image": im} for i, im in enumerate(images)]}
            plan = plan_pod({}, spec, "kube-system", ctx)
            assert len(plan.decisions) == len(images)
            for d in plan.decisions:
                if try_parse(d.image) is None:
                    assert d.action is Action.WARN  # templates like %s.dkr.ecr.%s.%s/...
                elif d.action is Action.REWRITE:
                    assert d.target is not None
                    _check_rewrite(d.image, d.target, region, policy)
