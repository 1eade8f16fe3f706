"""The originals annotation never pushes a pod over Kubernetes' 256 KiB total
annotation size (apimachinery ValidateAnnotationsSize).  The core rule here;
the real kube-apiserver's verdict in tests/e2e/test_annotation_limit.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from tests.serving import REGION, SOURCE_REGISTRY, TARGET_REGISTRY, admission_review
from tests.serving import decode_patch as decode
from webhook.cli import main
from webhook.core.patch import (
    ANNOTATION_OMITTED,
    TOTAL_ANNOTATION_SIZE_LIMIT,
    annotations_size,
    build_patch_checked,
)
from webhook.core.plan import PlanContext, plan_pod
from webhook.core.policy import ORIGINALS_ANNOTATION, Policy
from webhook.core.review import MAX_WARNING, admit

IMAGE = f"{SOURCE_REGISTRY}/eks/pause:3.10"
CTX = PlanContext.build(Policy(), REGION)


def originals_size(images: dict[str, str]) -> int:
    value = json.dumps(images, sort_keys=True, separators=(",", ":"))
    return len(ORIGINALS_ANNOTATION) + len(value)


def pod_with_annotations(filler: int, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """A pod whose annotations total ``filler`` bytes (key ``f`` plus value), plus ``extra``."""
    annotations = {"f": "x" * (filler - 1), **(extra or {})}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "annotations": annotations},
            "spec": {"containers": [{"name": "c", "image": IMAGE}]}}  # fmt: skip


def patched(pod: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    plan = plan_pod(pod["metadata"], pod["spec"], "ns", CTX)
    ops, note = build_patch_checked(pod, plan)
    return jsonpatch.apply_patch(pod, ops), note


def test_the_size_is_counted_as_kubernetes_counts_it() -> None:
    assert TOTAL_ANNOTATION_SIZE_LIMIT == 262144
    assert annotations_size({"a": "bc", "é": "ü"}) == 3 + 4  # bytes, not characters


def test_up_to_the_limit_the_annotation_is_added() -> None:
    room = TOTAL_ANNOTATION_SIZE_LIMIT - originals_size({"c": IMAGE})
    out, note = patched(pod_with_annotations(room))
    assert note is None
    assert annotations_size(out["metadata"]["annotations"]) == TOTAL_ANNOTATION_SIZE_LIMIT
    assert json.loads(out["metadata"]["annotations"][ORIGINALS_ANNOTATION]) == {"c": IMAGE}
    assert out["spec"]["containers"][0]["image"].startswith(TARGET_REGISTRY + "/")


def test_one_byte_over_it_is_omitted_with_a_warning_and_images_still_rewritten() -> None:
    room = TOTAL_ANNOTATION_SIZE_LIMIT - originals_size({"c": IMAGE})
    out, note = patched(pod_with_annotations(room + 1))
    assert note == ANNOTATION_OMITTED and len(note) <= MAX_WARNING
    assert ORIGINALS_ANNOTATION not in out["metadata"]["annotations"]
    assert annotations_size(out["metadata"]["annotations"]) <= TOTAL_ANNOTATION_SIZE_LIMIT
    assert out["spec"]["containers"][0]["image"].startswith(TARGET_REGISTRY + "/")


def test_a_reinvocation_replaces_its_own_annotation_in_the_count() -> None:
    """An existing originals annotation is replaced, so only the new value counts."""
    previous = json.dumps({"c": IMAGE}, separators=(",", ":"))
    room = TOTAL_ANNOTATION_SIZE_LIMIT - originals_size({"c": IMAGE})
    pod = pod_with_annotations(room, {ORIGINALS_ANNOTATION: previous})
    # At the limit already, with our own annotation in it: counting the old value
    # on top of the new one would wrongly omit it.
    assert annotations_size(pod["metadata"]["annotations"]) == TOTAL_ANNOTATION_SIZE_LIMIT
    out, note = patched(pod)
    assert note is None
    assert annotations_size(out["metadata"]["annotations"]) == TOTAL_ANNOTATION_SIZE_LIMIT


def test_admit_returns_the_warning_with_the_patch() -> None:
    room = TOTAL_ANNOTATION_SIZE_LIMIT - originals_size({"c": IMAGE})
    pod = pod_with_annotations(room + 1)
    outcome = admit(admission_review(pod, namespace="ns"), CTX)
    assert outcome.decision == "patched"
    assert outcome.review["response"]["warnings"][-1] == ANNOTATION_OMITTED
    ops = decode(outcome.review["response"])
    assert [op["path"] for op in ops] == ["/spec/containers/0/image"]


def test_dry_run_reports_the_omission(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    room = TOTAL_ANNOTATION_SIZE_LIMIT - originals_size({"c": IMAGE})
    f = tmp_path / "pod.json"
    f.write_text(json.dumps(pod_with_annotations(room + 1)))
    assert main(["dry-run", "--region", REGION, "-f", str(f), "-o", "json"]) == 0
    (obj,) = json.loads(capsys.readouterr().out)["objects"]
    assert obj["warnings"] == [ANNOTATION_OMITTED]
    assert len(obj["rewrites"]) == 1
