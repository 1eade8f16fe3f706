"""The patch builder: explicit RFC 6902 operations, checked by applying them."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest

from webhook.core.patch import build_patch, escape
from webhook.core.plan import PlanContext, plan_pod
from webhook.core.policy import ORIGINALS_ANNOTATION, Policy

BAD = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni:v1.19.4"
GOOD = "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni:v1.19.4"
CTX = PlanContext.build(Policy(), "ap-southeast-4")


def _pod(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [{"name": "aws-node", "image": BAD}, {"name": "other", "image": "nginx"}]
        },
    }


def _apply(pod: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    plan = plan_pod(pod["metadata"], pod["spec"], "kube-system", CTX)
    patch = build_patch(pod, plan)
    return patch, jsonpatch.JsonPatch(patch).apply(copy.deepcopy(pod))


def test_escape() -> None:
    assert escape("ecr-webhook.io/original-images") == "ecr-webhook.io~1original-images"
    assert escape("a~b/c") == "a~0b~1c"


def test_annotations_absent_adds_the_whole_map() -> None:
    patch, out = _apply(_pod({"name": "p"}))
    assert patch[0] == {"op": "replace", "path": "/spec/containers/0/image", "value": GOOD}
    assert patch[-1]["op"] == "add" and patch[-1]["path"] == "/metadata/annotations"
    assert json.loads(out["metadata"]["annotations"][ORIGINALS_ANNOTATION]) == {"aws-node": BAD}
    assert out["spec"]["containers"][1]["image"] == "nginx"


def test_annotations_present_adds_the_escaped_key() -> None:
    patch, out = _apply(_pod({"name": "p", "annotations": {"x": "y"}}))
    assert patch[-1] == {
        "op": "add",
        "path": "/metadata/annotations/ecr-webhook.io~1original-images",
        "value": json.dumps({"aws-node": BAD}, separators=(",", ":")),
    }
    assert out["metadata"]["annotations"]["x"] == "y"


def test_existing_originals_are_merged_earliest_first() -> None:
    earlier = json.dumps({"aws-node": "first-original", "gone": "z"})
    patch, out = _apply(_pod({"name": "p", "annotations": {ORIGINALS_ANNOTATION: earlier}}))
    assert patch[-1]["op"] == "replace"
    assert json.loads(out["metadata"]["annotations"][ORIGINALS_ANNOTATION]) == {
        "aws-node": "first-original",
        "gone": "z",
    }


def test_template_without_metadata() -> None:
    ds = {
        "kind": "DaemonSet",
        "metadata": {"name": "d"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": BAD}]}}},
    }
    plan = plan_pod(None, ds["spec"]["template"]["spec"], None, CTX)
    patch = build_patch(ds, plan, "/spec/template/spec", "/spec/template/metadata")
    out = jsonpatch.JsonPatch(patch).apply(ds)
    assert out["spec"]["template"]["spec"]["containers"][0]["image"] == GOOD
    assert ORIGINALS_ANNOTATION in out["spec"]["template"]["metadata"]["annotations"]


def test_no_change_no_operations() -> None:
    pod = _pod({"name": "p"})
    pod["spec"]["containers"][0]["image"] = GOOD
    assert _apply(pod)[0] == []


@pytest.mark.parametrize("n", [1, 3, 7])
def test_one_replace_per_changed_image(n: int) -> None:
    pod = {
        "metadata": {},
        "spec": {"containers": [{"name": f"c{i}", "image": BAD} for i in range(n)]},
    }
    patch, out = _apply(pod)
    assert [op["op"] for op in patch] == ["replace"] * n + ["add"]
    assert all(c["image"] == GOOD for c in out["spec"]["containers"])
