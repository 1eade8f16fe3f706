"""Odd AdmissionReviews never break the admission path (hypothesis).

For any JSON-shaped body, ``review.admit`` either answers ``allowed: true`` with
the request's uid, or raises ``ReviewError`` (HTTP 400); any other exception
would become a fail-open answer in the app, and this test treats it as a bug.
The audit record of every answer builds and serialises.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webhook.core.audit import build_record
from webhook.core.errors import ReviewError
from webhook.core.plan import PlanContext
from webhook.core.policy import Policy
from webhook.core.review import admit

CTX = PlanContext.build(Policy(), "ap-southeast-4")
IMAGES = st.sampled_from([
    "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni:v1.19.4",
    "602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.10",
    "nginx", "", "UPPER/case", "%s.dkr.ecr.%s.%s/x",
])  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | IMAGES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)  # fmt: skip
container = st.fixed_dictionaries({}, optional={"name": st.text(max_size=6) | json_values,
                                                "image": IMAGES | json_values})  # fmt: skip
spec = st.fixed_dictionaries({}, optional={
    "containers": st.lists(container, max_size=3) | json_values,
    "initContainers": st.lists(container, max_size=2) | json_values,
    "ephemeralContainers": st.lists(container, max_size=2) | json_values,
})  # fmt: skip
pod = st.fixed_dictionaries({}, optional={
    "metadata": st.fixed_dictionaries({}, optional={
        "annotations": st.dictionaries(st.sampled_from(["ecr-webhook.io/original-images",
                                                        "ecr-webhook.io/skip-containers", "x"]),
                                       st.text(max_size=10) | json_values) | json_values,
        "labels": json_values, "namespace": json_values, "name": json_values}) | json_values,
    "spec": spec | json_values,
})  # fmt: skip
request = st.fixed_dictionaries(
    {"uid": st.text(min_size=1, max_size=8)},
    optional={
        "operation": st.sampled_from(["CREATE", "UPDATE", "DELETE"]) | json_values,
        "subResource": st.sampled_from(["", "ephemeralcontainers", "status"]) | json_values,
        "resource": st.fixed_dictionaries({"group": st.just(""), "resource": st.just("pods")})
        | json_values,
        "namespace": st.text(max_size=8) | json_values,
        "object": pod | json_values,
        "oldObject": pod | json_values,
        "userInfo": json_values,
        "dryRun": json_values,
    },
)  # fmt: skip
bodies = st.fixed_dictionaries({
    "apiVersion": st.sampled_from(["admission.k8s.io/v1", "admission.k8s.io/v1beta1"]),
    "kind": st.just("AdmissionReview"),
    "request": request,
})  # fmt: skip


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_admit_answers_or_rejects_never_crashes(body: dict[str, Any]) -> None:
    try:
        outcome = admit(body, CTX)
    except ReviewError:
        return  # a 400: request.object missing or not an object
    resp = outcome.review["response"]
    assert resp["allowed"] is True
    assert resp["uid"] == body["request"]["uid"]
    assert outcome.review["apiVersion"] == body["apiVersion"]
    assert all(len(w) <= 120 for w in resp.get("warnings", []))
    json.dumps(outcome.review)
    json.dumps(build_record(outcome, 0.0, 1.0))
