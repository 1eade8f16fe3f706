"""Where the pod specs are inside Kubernetes objects.  Pure.

``pod_sites(obj)`` yields one ``PodSite`` per pod spec an object carries: the pod
itself, or the pod template of a workload.  ``kind: List`` (``kubectl get -o
yaml``) and AdmissionReview documents are unwrapped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# kind -> pointer of the pod template (its "metadata" and "spec" are below it).
TEMPLATE_POINTERS: dict[str, str] = {
    "Deployment": "/spec/template",
    "DaemonSet": "/spec/template",
    "StatefulSet": "/spec/template",
    "ReplicaSet": "/spec/template",
    "ReplicationController": "/spec/template",
    "Job": "/spec/template",
    "CronJob": "/spec/jobTemplate/spec/template",
    "PodTemplate": "/template",
}


@dataclass(frozen=True, slots=True)
class PodSite:
    """One pod spec inside a document.

    ``obj`` is the object the pointers are relative to (the item itself for a
    List item, ``request.object`` for an AdmissionReview).
    """

    obj: Mapping[str, Any]
    kind: str
    namespace: str | None
    name: str | None
    spec_pointer: str
    meta_pointer: str
    meta: Mapping[str, Any] | None
    spec: Mapping[str, Any] | None


def _get(obj: Mapping[str, Any], pointer: str) -> Any:
    node: Any = obj
    for token in pointer.strip("/").split("/"):
        if not isinstance(node, Mapping):
            return None
        node = node.get(token)
    return node


def _name(meta: Mapping[str, Any]) -> str | None:
    name = meta.get("name") or meta.get("generateName")
    return str(name) if name else None


def pod_sites(
    obj: object, default_namespace: str | None = None
) -> Iterator[tuple[Mapping[str, Any], PodSite | None]]:
    """Yield ``(object, site)`` for every object in ``obj``.

    ``site`` is None for an object that carries no pod spec (a Service, say), so
    callers can still count and report it.  ``default_namespace`` applies to
    objects whose metadata names none (an AdmissionReview's ``request.namespace``).
    """
    if not isinstance(obj, Mapping):
        return
    kind = obj.get("kind")
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List") and "items" in obj):
        for item in obj.get("items") or []:
            yield from pod_sites(item, default_namespace)
        return
    if kind == "AdmissionReview":
        request = obj.get("request")
        inner = request.get("object") if isinstance(request, Mapping) else None
        if isinstance(inner, Mapping):
            assert isinstance(request, Mapping)  # nosec B101  # checked by the caller; mypy narrowing
            yield from pod_sites(inner, request.get("namespace") or default_namespace)
        return
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    namespace = meta.get("namespace")
    namespace = str(namespace) if namespace else default_namespace
    if kind == "Pod":
        yield (
            obj,
            PodSite(
                obj, "Pod", namespace, _name(meta), "/spec", "/metadata", meta, obj.get("spec")
            ),
        )
        return
    pointer = TEMPLATE_POINTERS.get(str(kind))
    if pointer is None:
        yield obj, None
        return
    template = _get(obj, pointer)
    template = template if isinstance(template, Mapping) else {}
    tmeta = template.get("metadata")
    yield (
        obj,
        PodSite(
            obj,
            str(kind),
            namespace,
            _name(meta),
            pointer + "/spec",
            pointer + "/metadata",
            tmeta if isinstance(tmeta, Mapping) else None,
            template.get("spec") if isinstance(template.get("spec"), Mapping) else None,
        ),
    )
