"""The pure AdmissionReview envelope: echo, scope, patch encoding, warnings."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from webhook.core.errors import ReviewError
from webhook.core.plan import DERIVED_MAX, PlanContext
from webhook.core.policy import Policy
from webhook.core.review import admit, fail_open

CTX = PlanContext.build(Policy(), "ap-southeast-4")
BAD = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni:v1.19.4"
LONG = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/amazon/aws-network-policy-agent:v1.2.0"


def review(
    api: str = "admission.k8s.io/v1",
    op: str = "CREATE",
    sub: str = "",
    images: tuple[str, ...] = (BAD,),
    resource: str = "pods",
) -> dict[str, Any]:
    return {
        "apiVersion": api, "kind": "AdmissionReview",
        "request": {
            "uid": "4f1c-uid", "operation": op, "subResource": sub, "namespace": "kube-system",
            "resource": {"group": "", "version": "v1", "resource": resource},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "aws-node-"},
                       "spec": {"containers": [{"name": f"c{i}", "image": im}
                                               for i, im in enumerate(images)],
                                "ephemeralContainers": [{"name": "dbg", "image": BAD}]}},
        },
    }  # fmt: skip


@pytest.mark.parametrize("api", ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"])
def test_echo_api_version_kind_uid(api: str) -> None:
    out = admit(review(api), CTX).review
    assert out["apiVersion"] == api and out["kind"] == "AdmissionReview"
    assert out["response"]["uid"] == "4f1c-uid" and out["response"]["allowed"] is True


def test_patch_is_base64_json_patch() -> None:
    outcome = admit(review(), CTX)
    resp = outcome.review["response"]
    assert resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    assert [o["path"] for o in ops][:2] == [
        "/spec/containers/0/image",
        "/spec/ephemeralContainers/0/image",
    ]
    assert outcome.decision == "patched"


def test_no_change_no_patch_field() -> None:
    # the ephemeral container of the fixture would be rewritten on CREATE: drop it
    body = review(images=("nginx:1.27",))
    body["request"]["object"]["spec"].pop("ephemeralContainers")
    outcome = admit(body, CTX)
    assert "patch" not in outcome.review["response"]
    assert "patchType" not in outcome.review["response"]
    assert outcome.decision == "unchanged"


def test_warnings_are_short_and_name_the_reason() -> None:
    resp = admit(review(images=(BAD, LONG)), CTX).review["response"]
    assert len(resp["warnings"]) == 3
    for w in resp["warnings"]:
        assert len(w) <= 120
        assert "wrong account for ap-southeast-4" in w


def test_ephemeral_update_touches_only_ephemeral_containers() -> None:
    outcome = admit(review(op="UPDATE", sub="ephemeralcontainers"), CTX)
    ops = json.loads(base64.b64decode(outcome.review["response"]["patch"]))
    # only the image: the subresource would drop an annotation operation anyway
    assert [o["path"] for o in ops] == ["/spec/ephemeralContainers/0/image"]


@pytest.mark.parametrize(
    ("op", "sub", "resource"),
    [
        ("UPDATE", "", "pods"),
        ("DELETE", "", "pods"),
        ("CREATE", "binding", "pods"),
        ("CREATE", "", "deployments"),
        ("UPDATE", "status", "pods"),
    ],
)
def test_out_of_scope_is_allowed_untouched(op: str, sub: str, resource: str) -> None:
    outcome = admit(review(op=op, sub=sub, resource=resource), CTX)
    assert outcome.decision == "skipped"
    assert outcome.review["response"] == {"uid": "4f1c-uid", "allowed": True}


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"apiVersion": "admission.k8s.io/v2", "kind": "AdmissionReview", "request": {}},
        {"apiVersion": "admission.k8s.io/v1", "kind": "Pod", "request": {"uid": "x"}},
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}},
    ],
)
def test_malformed_envelope_raises_review_error(body: object) -> None:
    with pytest.raises(ReviewError):
        admit(body, CTX)


def test_fail_open_answer() -> None:
    outcome = fail_open(review("admission.k8s.io/v1beta1"), RuntimeError("boom"))
    resp = outcome.review["response"]
    assert outcome.review["apiVersion"] == "admission.k8s.io/v1beta1"
    assert resp["allowed"] is True and "patch" not in resp
    assert resp["warnings"] and "internal error" in resp["warnings"][0]
    assert outcome.decision == "error" and outcome.error == "RuntimeError: boom"


def test_long_container_names_keep_the_reason() -> None:
    body = review(images=(BAD, LONG))
    body["request"]["object"]["spec"]["containers"][0]["name"] = "aws-vpc-cni-init"
    body["request"]["object"]["spec"]["containers"][1]["name"] = "aws-eks-nodeagent"
    for w in admit(body, CTX).review["response"]["warnings"]:
        assert len(w) <= 120
        assert w.endswith("(wrong account for ap-southeast-4)"), w


def test_ephemeral_update_leaves_existing_ephemeral_containers_alone() -> None:
    """apiserver validation rejects any change to an existing ephemeral container."""
    body = review(op="UPDATE", sub="ephemeralcontainers")
    spec = body["request"]["object"]["spec"]
    spec["ephemeralContainers"] = [{"name": "dbg", "image": BAD}, {"name": "dbg2", "image": BAD}]
    body["request"]["oldObject"] = {
        "spec": {"ephemeralContainers": [{"name": "dbg", "image": BAD}]}
    }
    outcome = admit(body, CTX)
    ops = json.loads(base64.b64decode(outcome.review["response"]["patch"]))
    assert [o["path"] for o in ops] == ["/spec/ephemeralContainers/1/image"]
    assert [d.container for d in outcome.plan.decisions] == ["dbg2"]


# --------------------------------------------------------------- the answer memo
# Pods of one shape share a PodPlan (plan_pod, static oracle) and the answer
# memoised on it (review._derive).  What varies between pods of one shape must
# still change the answer: everything the patch reads of the annotations.

GOOD = "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni:v1.19.4"
ORIGINALS = "ecr-webhook.io/original-images"
# A value that, with the originals annotation, crosses 256 KiB; one that does not.
NEAR_LIMIT = "x" * (256 * 1024 - 200)


def _metadata(variant: str) -> dict[str, Any] | None:
    meta: dict[str, Any] = {"generateName": "aws-node-"}
    if variant == "no-metadata":
        return None
    if variant == "no-annotations":
        return meta
    if variant == "empty-annotations":
        meta["annotations"] = {}
        return meta
    notes: dict[str, Any] = {"a": "b"}
    if variant == "originals":
        notes[ORIGINALS] = json.dumps({"c0": "earlier.example/cni:v1"})
    elif variant == "originals-not-json":
        notes[ORIGINALS] = "not json"
    elif variant == "originals-not-a-string":
        notes[ORIGINALS] = 7
    elif variant == "originals-empty":
        notes[ORIGINALS] = ""
    elif variant == "near-limit":
        notes["big"] = NEAR_LIMIT
    elif variant == "under-limit":
        notes["big"] = NEAR_LIMIT[:-1000]
    elif variant == "skip-c0":
        notes["ecr-webhook.io/skip-containers"] = "c0"
    meta["annotations"] = notes
    return meta


VARIANTS = [
    "no-metadata", "no-annotations", "empty-annotations", "plain", "originals",
    "originals-not-json", "originals-not-a-string", "originals-empty", "near-limit",
    "under-limit", "skip-c0",
]  # fmt: skip


def _review(variant: str, images: tuple[str, ...], uid: str) -> dict[str, Any]:
    body = review(images=images)
    body["request"]["uid"] = uid
    pod = body["request"]["object"]
    meta = _metadata(variant)
    if meta is None:
        del pod["metadata"]
    else:
        pod["metadata"] = meta
    return body


def _ephemeral(existing: list[str], uid: str) -> dict[str, Any]:
    """An update through pods/ephemeralcontainers adding dbg and dbg2, with
    ``existing`` of them already in oldObject."""
    body = review(op="UPDATE", sub="ephemeralcontainers")
    body["request"]["uid"] = uid
    pod = body["request"]["object"]
    pod["spec"]["ephemeralContainers"] = [{"name": "dbg", "image": BAD},
                                          {"name": "dbg2", "image": BAD}]  # fmt: skip
    old = json.loads(json.dumps(pod))
    old["spec"]["ephemeralContainers"] = [c for c in pod["spec"]["ephemeralContainers"]
                                          if c["name"] in existing]  # fmt: skip
    body["request"]["oldObject"] = old
    return body


@pytest.mark.parametrize("order", [[[], ["dbg"], ["dbg", "dbg2"], []],
                                   [["dbg"], [], ["dbg2"], ["dbg"]]])  # fmt: skip
def test_ephemeral_updates_of_one_shape_each_patch_only_their_new_containers(
    order: list[list[str]],
) -> None:
    """The plan of a shape is shared; what oldObject already has differs per update."""
    shared = PlanContext.build(Policy(), "ap-southeast-4")
    for n, existing in enumerate(order):
        fresh_ctx = PlanContext.build(Policy(), "ap-southeast-4")
        fresh = admit(_ephemeral(existing, f"uid-{n}"), fresh_ctx)
        got = admit(_ephemeral(existing, f"uid-{n}"), shared)
        assert got.review == fresh.review, existing
        assert got.plan.decisions == fresh.plan.decisions, existing
        paths = [op["path"] for op in got.patch]
        wanted = [f"/spec/ephemeralContainers/{i}/image"
                  for i, name in enumerate(["dbg", "dbg2"]) if name not in existing]  # fmt: skip
        assert paths == wanted, existing


def test_a_pod_without_rewrites_never_reads_its_annotations() -> None:
    """Nothing to patch: an annotation the size rule cannot even measure (a lone
    surrogate, which the JSON fallback decodes) does not fail the admission."""
    body = review(images=(GOOD,))
    del body["request"]["object"]["spec"]["ephemeralContainers"]  # review() adds a BAD one
    body["request"]["object"]["metadata"]["annotations"] = {"note": "\ud800"}
    outcome = admit(body, PlanContext.build(Policy(), "ap-southeast-4"))
    assert outcome.decision == "unchanged"
    assert outcome.error is None


@pytest.mark.parametrize("images", [(BAD,), (BAD, GOOD), (GOOD,), (BAD, LONG, BAD)])
def test_a_shared_context_answers_as_a_fresh_one(images: tuple[str, ...]) -> None:
    shared = PlanContext.build(Policy(), "ap-southeast-4")
    # Each variant twice, in an order that puts every variant after every other:
    # a memo keyed on too little would answer one with another's patch.
    order = VARIANTS + VARIANTS[::-1] + VARIANTS
    for n, variant in enumerate(order):
        uid = f"uid-{n}"
        fresh = admit(_review(variant, images, uid), PlanContext.build(Policy(), "ap-southeast-4"))
        got = admit(_review(variant, images, uid), shared)
        assert got.review == fresh.review, variant
        assert (got.decision, got.patch, got.warnings) == (fresh.decision, fresh.patch,
                                                           fresh.warnings), variant  # fmt: skip
        assert got.plan == fresh.plan, variant
        assert got.review["response"]["uid"] == uid


def test_pods_of_one_shape_share_a_plan_and_its_answer() -> None:
    ctx = PlanContext.build(Policy(), "ap-southeast-4")
    first = admit(_review("plain", (BAD, LONG), "uid-1"), ctx)
    second = admit(_review("plain", (BAD, LONG), "uid-2"), ctx)
    assert second.plan is first.plan
    assert second.patch is first.patch  # from the memo, not rebuilt
    assert first.review["response"]["uid"] == "uid-1"
    assert second.review["response"]["uid"] == "uid-2"
    other = admit(_review("plain", (LONG, BAD), "uid-3"), ctx)
    assert other.plan is not first.plan


def test_the_answer_memo_of_a_plan_is_bounded() -> None:
    ctx = PlanContext.build(Policy(), "ap-southeast-4")
    for n in range(50):  # 50 annotation states of one shape
        body = _review("plain", (BAD,), f"uid-{n}")
        body["request"]["object"]["metadata"]["annotations"]["a"] = "b" * n
        outcome = admit(body, ctx)
    assert 0 < len(outcome.plan.derived) <= DERIVED_MAX
