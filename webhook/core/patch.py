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

from webhook.core.plan import PodPlan
from webhook.core.policy import ORIGINALS_ANNOTATION


class PatchOp(TypedDict):
    op: Literal["add", "replace", "remove", "test"]
    path: str
    value: NotRequired[Any]


def escape(token: str) -> str:
    """Escape one JSON Pointer reference token (RFC 6901 section 3)."""
    return token.replace("~", "~0").replace("/", "~1")


def build_patch(
    obj: Mapping[str, Any],
    plan: PodPlan,
    spec_pointer: str = "/spec",
    meta_pointer: str = "/metadata",
    annotation: str | None = ORIGINALS_ANNOTATION,
) -> list[PatchOp]:
    """The patch that applies ``plan`` to ``obj``; ``[]`` when nothing changes.

    ``spec_pointer`` and ``meta_pointer`` locate the pod spec and the metadata that
    carries the annotation inside ``obj`` (``/spec/template/spec`` and
    ``/spec/template/metadata`` for a Deployment).  An existing originals
    annotation is merged, keeping the earliest original of each container, so a
    reinvocation never loses history.  ``annotation=None`` emits the image
    operations only.
    """
    rewrites = plan.rewrites
    if not rewrites:
        return []
    ops: list[PatchOp] = [
        {"op": "replace", "path": f"{spec_pointer}/{d.path}", "value": d.target} for d in rewrites
    ]
    if annotation is None:
        return ops
    meta = _resolve(obj, meta_pointer)
    originals: dict[str, str] = {}
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    if isinstance(annotations, Mapping):
        try:
            previous = json.loads(annotations.get(annotation) or "{}")
        except (TypeError, ValueError):
            previous = {}
        if isinstance(previous, dict):
            originals.update({str(k): str(v) for k, v in previous.items()})
    for d in rewrites:
        originals.setdefault(d.container, d.image)
    value = json.dumps(originals, sort_keys=True, separators=(",", ":"))
    if not isinstance(meta, Mapping):
        ops.append(
            {"op": "add", "path": meta_pointer, "value": {"annotations": {annotation: value}}}
        )
    elif not isinstance(annotations, Mapping):
        ops.append(
            {"op": "add", "path": f"{meta_pointer}/annotations", "value": {annotation: value}}
        )
    else:
        op: Literal["add", "replace"] = "replace" if annotation in annotations else "add"
        ops.append(
            {"op": op, "path": f"{meta_pointer}/annotations/{escape(annotation)}", "value": value}
        )
    return ops


def _resolve(obj: Mapping[str, Any], pointer: str) -> object:
    node: object = obj
    for token in pointer.lstrip("/").split("/"):
        if not token:
            continue
        if not isinstance(node, Mapping):
            return None
        node = node.get(token.replace("~1", "/").replace("~0", "~"))
    return node
