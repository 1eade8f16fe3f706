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
from typing import Any, Literal, NamedTuple, NotRequired, TypedDict

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


class AnnotationState(NamedTuple):
    """All that ``build_patch_checked`` reads of an object besides the plan.

    Hashable, so the envelope can memoise the patch of a plan under it
    (review._derive): two objects in the same state get the same patch.
    """

    annotation: str | None  # the originals annotation's key; None: image operations only
    has_meta: bool  # the metadata is an object
    has_annotations: bool  # ... with an annotations object
    present: bool  # ... that has the key
    value: str | None  # ... with this str value (None: absent, or not a str)
    others: int  # annotations_size() of the other annotations


_IMAGES_ONLY = AnnotationState(None, False, False, False, None, 0)


def annotation_state(
    obj: Mapping[str, Any], annotation: str | None = ORIGINALS_ANNOTATION,
    meta_pointer: str = "/metadata",
) -> AnnotationState:  # fmt: skip
    """The state of ``obj``'s annotations as far as the patch depends on it."""
    if annotation is None:
        return _IMAGES_ONLY
    meta = _resolve(obj, meta_pointer)
    if not isinstance(meta, jsonc.OBJECT):
        return AnnotationState(annotation, False, False, False, None, 0)
    annotations = meta.get("annotations")
    if not isinstance(annotations, jsonc.OBJECT):
        return AnnotationState(annotation, True, False, False, None, 0)
    value = annotations.get(annotation)
    others = annotations_size({k: v for k, v in annotations.items() if k != annotation})
    return AnnotationState(annotation, True, True, annotation in annotations,
                           value if isinstance(value, str) else None, others)  # fmt: skip


def build_patch_checked(
    obj: Mapping[str, Any],
    plan: PodPlan,
    spec_pointer: str = "/spec",
    meta_pointer: str = "/metadata",
    annotation: str | None = ORIGINALS_ANNOTATION,
    state: AnnotationState | None = None,
) -> tuple[list[PatchOp], str | None]:
    """The patch that applies ``plan`` to ``obj`` (``[]`` when nothing changes), and a
    warning when the originals annotation had to be left out.

    ``spec_pointer`` and ``meta_pointer`` locate the pod spec and the metadata that
    carries the annotation inside ``obj`` (``/spec/template/spec`` and
    ``/spec/template/metadata`` for a Deployment).  An existing originals
    annotation is merged, keeping the earliest original of each container, so a
    reinvocation never loses history.  ``annotation=None`` emits the image
    operations only.  ``state``, when given, is ``annotation_state(obj,
    annotation, meta_pointer)`` already computed: of ``obj`` only that is read.

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
    if state is None:
        state = annotation_state(obj, annotation, meta_pointer)
    originals: dict[str, str] = {}
    if state.has_annotations:
        try:
            previous = json.loads(state.value or "{}")
        except (ValueError, RecursionError):  # not JSON, or nested past the parser
            previous = {}
        if isinstance(previous, dict):
            originals.update({str(k): str(v) for k, v in previous.items()})
    for d in rewrites:
        originals.setdefault(d.container, d.image)
    value = jsonc.dumps_sorted(originals)
    if state.others + len(annotation.encode()) + len(value.encode()) > TOTAL_ANNOTATION_SIZE_LIMIT:
        return ops, ANNOTATION_OMITTED
    if not state.has_meta:
        ops.append(
            {"op": "add", "path": meta_pointer, "value": {"annotations": {annotation: value}}}
        )
    elif not state.has_annotations:
        ops.append(
            {"op": "add", "path": f"{meta_pointer}/annotations", "value": {annotation: value}}
        )
    else:
        op: Literal["add", "replace"] = "replace" if state.present else "add"
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
