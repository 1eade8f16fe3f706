"""The pure half of availability probing: outcomes and the decision rules (issue 8).

Each rule of ``webhook.core.probing`` has its test here, over evidence handed
in as data: no network, no prober.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from webhook.core.errors import PolicyError
from webhook.core.plan import Action, Decision, PlanContext, Reason, plan_pod, probe_requests
from webhook.core.policy import MirrorTarget, policy_from_mapping
from webhook.core.probing import Outcome, Probe, classify_status

EU = "602401143452.dkr.ecr.eu-central-1.amazonaws.com"
US = "602401143452.dkr.ecr.us-west-2.amazonaws.com"
EU1 = "602401143452.dkr.ecr.eu-west-1.amazonaws.com"
WRONG = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com"  # wrong account there
AP4 = "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com"
MIRROR = "111122223333.dkr.ecr.eu-central-1.amazonaws.com"
CNI = "amazon-k8s-cni:v1.19.4"


def ctx_for(region: str, policy: Mapping[str, Any] | None = None) -> PlanContext:
    return PlanContext.build(policy_from_mapping(policy), region)


def ev(pairs: Mapping[str, Outcome]) -> dict[str, Probe]:
    return {k: Probe(k, v, 12.5) for k, v in pairs.items()}


def decide(ctx: PlanContext, image: str, answers: Mapping[str, Outcome] | None) -> Decision:
    spec = {"containers": [{"name": "c", "image": image}]}
    if answers is not None:
        ctx = ctx.with_evidence(ev(answers))
    (d,) = plan_pod({}, spec, "kube-system", ctx).decisions
    return d


@pytest.mark.parametrize(("status", "outcome"), [
    (200, Outcome.AVAILABLE), (204, Outcome.AVAILABLE), (404, Outcome.NOT_FOUND),
    (401, Outcome.UNAUTHORIZED), (403, Outcome.UNAUTHORIZED), (429, Outcome.THROTTLED),
    (500, Outcome.SERVER_ERROR), (503, Outcome.SERVER_ERROR), (302, Outcome.SERVER_ERROR),
    (400, Outcome.SERVER_ERROR),
])  # fmt: skip
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_unavailable_outcomes_double_as_reason_codes() -> None:
    for o in Outcome:
        if o not in (Outcome.AVAILABLE, Outcome.NO_ANSWER):
            assert Reason(str(o)).value == o.value


def test_seed_case_unauthorized_original_moves_to_first_available_fallback() -> None:
    ctx = ctx_for("eu-central-1", {"fallbackRegions": ["us-west-2"]})
    d = decide(ctx, f"{EU}/{CNI}", {f"{EU}/{CNI}": Outcome.UNAUTHORIZED,
                                     f"{US}/{CNI}": Outcome.AVAILABLE})  # fmt: skip
    assert (d.action, d.reason, d.target, d.rule) == (
        Action.REWRITE, Reason.UNAUTHORIZED, f"{US}/{CNI}", "fallbackRegions[0]")
    assert [(p.candidate, p.outcome) for p in d.probes] == [
        (f"{EU}/{CNI}", Outcome.UNAUTHORIZED), (f"{US}/{CNI}", Outcome.AVAILABLE)]
    assert "unauthorized" in d.detail


def test_first_proven_available_in_policy_order() -> None:
    ctx = ctx_for("eu-central-1", {"fallbackRegions": ["eu-west-1", "us-west-2"]})
    d = decide(ctx, f"{EU}/{CNI}", {f"{EU}/{CNI}": Outcome.NOT_FOUND,
                                     f"{EU1}/{CNI}": Outcome.NOT_FOUND,
                                     f"{US}/{CNI}": Outcome.AVAILABLE})  # fmt: skip
    assert (d.reason, d.target, d.rule) == (Reason.NOT_FOUND, f"{US}/{CNI}", "fallbackRegions[1]")


def test_candidate_without_answer_is_not_taken_when_original_is_proven_bad() -> None:
    ctx = ctx_for("eu-central-1", {"fallbackRegions": ["eu-west-1", "us-west-2"]})
    d = decide(ctx, f"{EU}/{CNI}", {f"{EU}/{CNI}": Outcome.SERVER_ERROR,
                                     f"{EU1}/{CNI}": Outcome.NO_ANSWER,
                                     f"{US}/{CNI}": Outcome.AVAILABLE})  # fmt: skip
    assert d.target == f"{US}/{CNI}"
    assert d.reason is Reason.SERVER_ERROR


def test_original_proven_available_stays_even_off_target() -> None:
    ctx = ctx_for("eu-central-1", {"fallbackRegions": ["eu-west-1"]})
    d = decide(ctx, f"{US}/{CNI}", {f"{US}/{CNI}": Outcome.AVAILABLE,
                                     f"{EU}/{CNI}": Outcome.AVAILABLE})  # fmt: skip
    assert (d.action, d.reason) == (Action.KEEP, Reason.AVAILABLE)
    assert d.probes[0].outcome is Outcome.AVAILABLE


def test_available_original_moves_when_cluster_region_preferred_and_proven() -> None:
    ctx = ctx_for("eu-central-1", {"preferClusterRegion": True})
    d = decide(ctx, f"{US}/{CNI}", {f"{US}/{CNI}": Outcome.AVAILABLE,
                                     f"{EU}/{CNI}": Outcome.AVAILABLE})  # fmt: skip
    assert (d.reason, d.target) == (Reason.CLUSTER_REGION_PREFERRED, f"{EU}/{CNI}")
    # ... but never to a cluster region found unavailable (rule 4).
    d = decide(ctx, f"{US}/{CNI}", {f"{US}/{CNI}": Outcome.AVAILABLE,
                                     f"{EU}/{CNI}": Outcome.UNAUTHORIZED})  # fmt: skip
    assert (d.action, d.reason) == (Action.KEEP, Reason.AVAILABLE)


def test_static_rules_hold_without_an_answer() -> None:
    ctx = ctx_for("ap-southeast-4")
    d = decide(ctx, f"{WRONG}/{CNI}", {f"{AP4}/{CNI}": Outcome.NO_ANSWER})
    assert (d.action, d.reason, d.target) == (Action.REWRITE, Reason.WRONG_ACCOUNT, f"{AP4}/{CNI}")
    # No evidence at all: exactly the static decision.
    static = decide(ctx, f"{WRONG}/{CNI}", None)
    assert (static.reason, static.target, static.probes) == (d.reason, d.target, ())


def test_static_fix_never_goes_to_a_candidate_found_unavailable() -> None:
    ctx = ctx_for("ap-southeast-4", {"fallbackRegions": ["us-west-2"]})
    d = decide(ctx, f"{WRONG}/{CNI}", {f"{AP4}/{CNI}": Outcome.NOT_FOUND,
                                        f"{US}/{CNI}": Outcome.AVAILABLE})  # fmt: skip
    assert (d.reason, d.target) == (Reason.WRONG_ACCOUNT, f"{US}/{CNI}")
    assert d.rule == "fallbackRegions[0]"
    only = ctx_for("ap-southeast-4")
    d = decide(only, f"{WRONG}/{CNI}", {f"{AP4}/{CNI}": Outcome.NOT_FOUND})
    assert (d.action, d.reason) == (Action.WARN, Reason.NO_TARGET)
    assert "not-found" in d.detail


def test_no_candidate_available_keeps_and_names_each_answer() -> None:
    ctx = ctx_for("eu-central-1", {"fallbackRegions": ["eu-west-1", "us-west-2"]})
    d = decide(ctx, f"{EU}/{CNI}", {f"{EU}/{CNI}": Outcome.NOT_FOUND,
                                     f"{EU1}/{CNI}": Outcome.THROTTLED,
                                     f"{US}/{CNI}": Outcome.UNREACHABLE})  # fmt: skip
    assert (d.action, d.reason, d.target) == (Action.WARN, Reason.NO_TARGET, None)
    for host, said in ((EU, "not-found"), (EU1, "throttled"), (US, "unreachable")):
        assert f"{host} {said}" in d.detail
    assert f"{EU1} throttled" in d.message


def test_original_without_answer_keeps_static_judgement() -> None:
    ctx = ctx_for("eu-central-1", {"fallbackRegions": ["us-west-2"]})
    d = decide(ctx, f"{EU}/{CNI}", {f"{EU}/{CNI}": Outcome.NO_ANSWER,
                                     f"{US}/{CNI}": Outcome.AVAILABLE})  # fmt: skip
    assert d.action is Action.KEEP


def test_pull_through_cache_404_is_judged_from_upstream() -> None:
    policy = {"targets": [{"type": "mirror", "registry": MIRROR, "prefix": "ecr-eks",
                           "pullThroughCache": True}, {"type": "official"}]}  # fmt: skip
    ctx = ctx_for("eu-central-1", policy)
    mirrored = f"{MIRROR}/ecr-eks/{CNI}"
    upstream = f"{EU}/{CNI}"
    # The original lives in us-west-2 and is unauthorized; the cache has not
    # pulled yet (404) but its upstream serves the image.
    d = decide(ctx, f"{US}/{CNI}", {f"{US}/{CNI}": Outcome.UNAUTHORIZED,
                                     mirrored: Outcome.NOT_FOUND, upstream: Outcome.AVAILABLE})
    assert (d.action, d.target, d.rule) == (Action.REWRITE, mirrored, "targets[0]")
    mirror_probe = next(p for p in d.probes if p.candidate == mirrored)
    assert mirror_probe.outcome is Outcome.AVAILABLE
    # A plain mirror's 404 stays a 404.
    plain = ctx_for("eu-central-1", {"targets": [
        {"type": "mirror", "registry": MIRROR, "prefix": "ecr-eks"}, {"type": "official"}]})
    d = decide(plain, f"{US}/{CNI}", {f"{US}/{CNI}": Outcome.UNAUTHORIZED,
                                       mirrored: Outcome.NOT_FOUND, upstream: Outcome.AVAILABLE})
    assert (d.target, d.rule) == (upstream, "targets[1]")


def test_idempotent_over_its_own_output() -> None:
    ctx = ctx_for("eu-central-1", {"fallbackRegions": ["us-west-2"], "preferClusterRegion": True})
    answers = {f"{EU}/{CNI}": Outcome.UNAUTHORIZED, f"{US}/{CNI}": Outcome.AVAILABLE}
    first = decide(ctx, f"{EU}/{CNI}", answers)
    assert first.target == f"{US}/{CNI}"
    again = decide(ctx, first.target, answers)
    assert again.action is Action.KEEP


def test_probe_requests_lists_original_and_candidates_once() -> None:
    ctx = ctx_for("eu-central-1", {"fallbackRegions": ["us-west-2"]})
    spec = {"initContainers": [{"name": "i", "image": f"{EU}/amazon-k8s-cni-init:v1"}],
            "containers": [{"name": "a", "image": f"{EU}/{CNI}"},
                           {"name": "b", "image": f"{EU}/{CNI}"},
                           {"name": "n", "image": "nginx:1.27"},
                           {"name": "bad", "image": "Not A Ref"}]}  # fmt: skip
    refs = [str(r) for r in probe_requests({}, spec, "kube-system", ctx)]
    assert refs == [f"{EU}/amazon-k8s-cni-init:v1", f"{US}/amazon-k8s-cni-init:v1",
                    f"{EU}/{CNI}", f"{US}/{CNI}"]  # fmt: skip


def test_probe_requests_skips_what_the_planner_skips() -> None:
    ctx = ctx_for("eu-central-1")
    spec = {"containers": [{"name": "a", "image": f"{EU}/{CNI}"}]}
    assert probe_requests({}, spec, "ecr-webhook", ctx) == ()
    assert probe_requests({"labels": {"ecr-webhook.io/skip": "true"}}, spec, "x", ctx) == ()
    skip = {"annotations": {"ecr-webhook.io/skip-containers": "a"}}
    assert probe_requests(skip, spec, "x", ctx) == ()


def test_probe_requests_skips_an_original_static_facts_rule_out() -> None:
    ctx = ctx_for("ap-southeast-4")
    spec = {"containers": [{"name": "a", "image": f"{WRONG}/{CNI}"}]}
    assert [str(r) for r in probe_requests({}, spec, "x", ctx)] == [f"{AP4}/{CNI}"]


def test_probe_requests_include_pull_through_upstream() -> None:
    ctx = ctx_for("eu-central-1", {"targets": [
        {"type": "mirror", "registry": MIRROR, "prefix": "ecr-eks", "pullThroughCache": True,
         "upstream": US}]})  # fmt: skip
    spec = {"containers": [{"name": "a", "image": f"{EU}/{CNI}"}]}
    refs = [str(r) for r in probe_requests({}, spec, "x", ctx)]
    assert refs == [f"{EU}/{CNI}", f"{MIRROR}/ecr-eks/{CNI}", f"{US}/{CNI}"]


def test_probe_as_json_is_the_report_contract() -> None:
    p = Probe("x/y:1", Outcome.NOT_FOUND, 12.345, True, "HTTP 404")
    assert p.as_json() == {"candidate": "x/y:1", "outcome": "not-found", "latencyMs": 12.3,
                           "cached": True}  # fmt: skip


def test_policy_probe_keys() -> None:
    p = policy_from_mapping({"region": "eu-central-1", "fallbackRegions": ["us-west-2"],
                             "probe": {"timeoutSeconds": 0.5, "negativeTTLSeconds": 10}})
    assert p.fallback_regions == ("us-west-2",)
    assert (p.probe.enabled, p.probe.timeout, p.probe.negative_ttl) == (True, 0.5, 10.0)
    assert policy_from_mapping({"probe": False}).probe.enabled is False
    t = policy_from_mapping({"targets": [{"type": "mirror", "registry": MIRROR,
                                          "pullThroughCache": True}]}).targets[0]  # fmt: skip
    assert isinstance(t, MirrorTarget) and t.pull_through_cache


@pytest.mark.parametrize(("doc", "field"), [
    ({"fallbackRegions": ["atlantis-1"]}, "fallbackRegions[0]"),
    ({"region": "eu-central-1", "fallbackRegions": ["cn-north-1"]}, "fallbackRegions[0]"),
    ({"probe": {"timeoutSeconds": 9}}, "probe.timeoutSeconds"),
    ({"probe": {"timeoutSeconds": "fast"}}, "probe.timeoutSeconds"),
    ({"probe": {"budget": 1}}, "probe.budget"),
    ({"probe": "yes"}, "probe"),
    ({"targets": [{"type": "mirror", "registry": MIRROR, "upstream": US}]}, "targets[0].upstream"),
    ({"targets": [{"type": "mirror", "registry": MIRROR, "pullThroughCache": "y"}]},
     "targets[0].pullThroughCache"),
])  # fmt: skip
def test_policy_probe_key_errors_name_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_mapping(doc)
    assert info.value.field == field


def test_same_context_follows_changing_evidence() -> None:
    """Decisions are memoised on what the evidence says, never across different answers."""
    ctx = ctx_for("eu-central-1", {"fallbackRegions": ["us-west-2"]})
    spec = {"containers": [{"name": "c", "image": f"{EU}/{CNI}"}]}
    seq = [
        ({f"{EU}/{CNI}": Outcome.UNAUTHORIZED, f"{US}/{CNI}": Outcome.AVAILABLE}, Action.REWRITE),
        ({f"{EU}/{CNI}": Outcome.AVAILABLE, f"{US}/{CNI}": Outcome.AVAILABLE}, Action.KEEP),
        ({f"{EU}/{CNI}": Outcome.UNAUTHORIZED, f"{US}/{CNI}": Outcome.NOT_FOUND}, Action.WARN),
        ({f"{EU}/{CNI}": Outcome.UNAUTHORIZED, f"{US}/{CNI}": Outcome.AVAILABLE}, Action.REWRITE),
    ]
    for answers, action in seq:
        probes = {k: Probe(k, v, 1.0, cached=True) for k, v in answers.items()}
        (d,) = plan_pod({}, spec, "x", ctx.with_evidence(probes)).decisions
        assert d.action is action
        assert [p.outcome for p in d.probes] == list(answers.values())
        assert all(p.cached for p in d.probes)
