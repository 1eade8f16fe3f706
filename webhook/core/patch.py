"""RFC 6902 JSON Patch operations for a plan.  Pure.

One ``replace`` per rewritten image, plus one operation that records the
original images in the ``ecr-webhook.io/original-images`` annotation (a JSON map
of container name to original image).  When ``metadata.annotations`` is absent
the whole map is added, because RFC 6902 ``add`` cannot create intermediate
members (same approach as aws/amazon-eks-pod-identity-webhook).  JSON Pointer
tokens are escaped per RFC 6901: ``~`` becomes ``~0`` and ``/`` becomes ``~1``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, NotRequired, TypedDict

from webhook.core import jsonc
from webhook.core.plan import PodPlan
from webhook.core.policy import ORIGINALS_ANNOTATION

# Kubernetes refuses an object whose annotations total more than 256 KiB,
# counting len(key) + len(value) in bytes over all of them
# (k8s.io/apimachinery pkg/api/validation/objectmeta.go: ValidateAnnotationsSize,
# TotalAnnotationSizeLimitB = 256 * 1024; a total equal to the limit passes).
# The apiserver validates the pod after the mutating webhooks, so an
# annotation that crosses the limit would turn an admission into a 422.
TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024
ANNOTATION_OMITTED = (
    "ecr-webhook: original-images annotation omitted (pod annotations would exceed "
    "256 KiB); see the audit log"
)


class PatchOp(TypedDict):
    op: Literal["add", "replace", "remove", "test"]
    path: str
    value: NotRequired[Any]


def escape(token: str) -> str:
    """Escape one JSON Pointer reference token (RFC 6901 section 3)."""
    return token.replace("~", "~0").replace("/", "~1")


def annotations_size(annotations: Mapping[str, Any]) -> int:
    """The size Kubernetes counts: bytes of every key and value (ValidateAnnotationsSize)."""
    return sum(len(str(k).encode()) + len(str(v).encode()) for k, v in annotations.items())


def build_patch(
    obj: Mapping[str, Any],
    plan: PodPlan,
    spec_pointer: str = "/spec",
    meta_pointer: str = "/metadata",
    annotation: str | None = ORIGINALS_ANNOTATION,
) -> list[PatchOp]:
    """``build_patch_checked`` without its warning."""
    return build_patch_checked(obj, plan, spec_pointer, meta_pointer, annotation)[0]


def build_patch_checked(
    obj: Mapping[str, Any],
    plan: PodPlan,
    spec_pointer: str = "/spec",
    meta_pointer: str = "/metadata",
    annotation: str | None = ORIGINALS_ANNOTATION,
) -> tuple[list[PatchOp], str | None]:
    """The patch that applies ``plan`` to ``obj`` (``[]`` when nothing changes), and a
    warning when the originals annotation had to be left out.

    ``spec_pointer`` and ``meta_pointer`` locate the pod spec and the metadata that
    carries the annotation inside ``obj`` (``/spec/template/spec`` and
    ``/spec/template/metadata`` for a Deployment).  An existing originals
    annotation is merged, keeping the earliest original of each container, so a
    reinvocation never loses history.  ``annotation=None`` emits the image
    operations only.

    The annotation is left out, with ``ANNOTATION_OMITTED`` as the warning,
    when it would take the object's annotations over Kubernetes' 256 KiB total
    (``TOTAL_ANNOTATION_SIZE_LIMIT``): the images are still rewritten, and the
    audit record keeps the originals.  There is no shorter form worth having:
    the value is a few hundred bytes, and a pod that close to the limit has no
    room for any of it.
    """
    rewrites = plan.rewrites
    if not rewrites:
        return [], None
    ops: list[PatchOp] = [
        {"op": "replace", "path": f"{spec_pointer}/{d.path}", "value": d.target} for d in rewrites
    ]
    if annotation is None:
        return ops, None
    meta = _resolve(obj, meta_pointer)
    originals: dict[str, str] = {}
    annotations = meta.get("annotations") if isinstance(meta, jsonc.OBJECT) else None
    if isinstance(annotations, jsonc.OBJECT):
        try:
            previous = json.loads(annotations.get(annotation) or "{}")
        except (TypeError, ValueError):
            previous = {}
        if isinstance(previous, dict):
            originals.update({str(k): str(v) for k, v in previous.items()})
    for d in rewrites:
        originals.setdefault(d.container, d.image)
    value = jsonc.dumps_sorted(originals)
    others = (
        annotations_size({k: v for k, v in annotations.items() if k != annotation})
        if isinstance(annotations, jsonc.OBJECT)
        else 0
    )
    if others + len(annotation.encode()) + len(value.encode()) > TOTAL_ANNOTATION_SIZE_LIMIT:
        return ops, ANNOTATION_OMITTED
    if not isinstance(meta, jsonc.OBJECT):
        ops.append(
            {"op": "add", "path": meta_pointer, "value": {"annotations": {annotation: value}}}
        )
    elif not isinstance(annotations, jsonc.OBJECT):
        ops.append(
            {"op": "add", "path": f"{meta_pointer}/annotations", "value": {annotation: value}}
        )
    else:
        op: Literal["add", "replace"] = "replace" if annotation in annotations else "add"
        ops.append(
            {"op": op, "path": f"{meta_pointer}/annotations/{escape(annotation)}", "value": value}
        )
    return ops, None


def _resolve(obj: Mapping[str, Any], pointer: str) -> object:
    node: object = obj
    for token in pointer.lstrip("/").split("/"):
        if not token:
            continue
        if not isinstance(node, jsonc.OBJECT):
            return None
        node = node.get(token.replace("~1", "/").replace("~0", "~"))
    return node
