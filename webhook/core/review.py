"""The AdmissionReview envelope and the admission decision.  Pure.

``admit(body, ctx)`` takes a decoded AdmissionReview and returns an ``Outcome``:
the response document and everything the audit record needs.  The Flask view
only decodes, calls it, records and encodes (STYLE.md habit 1).

Contract (Kubernetes docs, "Dynamic Admission Control", webhook request and
response):

* the response echoes the request's ``apiVersion`` and ``kind`` and carries
  ``response.uid == request.uid``; both ``admission.k8s.io/v1`` and ``v1beta1``
  are accepted (never assume v1);
* a change is ``patchType: JSONPatch`` plus the base64 of the RFC 6902 patch; no
  change means no ``patch`` field at all;
* ``response.warnings`` are shown by kubectl; keep each under 120 characters
  (the apiserver truncates longer ones and drops non-printable ones).

Malformed envelopes raise ``ReviewError`` (the server answers HTTP 400).
Everything else answers ``allowed: true``: this webhook never denies a pod, and
an internal error must not deny one by accident (``failurePolicy`` only applies
when the webhook does not answer).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NotRequired, TypedDict, cast

from webhook.core import jsonc
from webhook.core.errors import ReviewError
from webhook.core.imageref import ImageRef
from webhook.core.patch import PatchOp, annotation_state, build_patch_checked
from webhook.core.plan import CONTAINER_KINDS, PlanContext, PodPlan, plan_pod
from webhook.core.plan import probe_requests as _pod_probe_requests
from webhook.core.policy import ORIGINALS_ANNOTATION

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
MAX_WARNING = 120


class GroupVersionResource(TypedDict, total=False):
    group: str
    version: str
    resource: str


class UserInfo(TypedDict, total=False):
    username: str
    uid: str
    groups: list[str]


class AdmissionRequest(TypedDict, total=False):
    uid: str
    kind: dict[str, str]
    resource: GroupVersionResource
    subResource: str
    name: str
    namespace: str
    operation: Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
    userInfo: UserInfo
    object: dict[str, Any]
    oldObject: dict[str, Any]
    dryRun: bool


class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    patchType: NotRequired[Literal["JSONPatch"]]
    patch: NotRequired[str]
    warnings: NotRequired[list[str]]


class AdmissionReviewOut(TypedDict):
    apiVersion: str
    kind: Literal["AdmissionReview"]
    response: AdmissionResponse


Decision = Literal["patched", "unchanged", "skipped", "error"]


@dataclass(frozen=True)
class Outcome:
    """The answer to one admission, plus what the audit record needs."""

    review: AdmissionReviewOut
    decision: Decision
    request: AdmissionRequest
    plan: PodPlan = field(default_factory=PodPlan)
    patch: tuple[PatchOp, ...] = ()
    warnings: tuple[str, ...] = ()
    skipped: str | None = None
    error: str | None = None
    # The exception behind an "error" decision, for the operational log's stack
    # trace; never serialised into the audit record.
    exception: BaseException | None = field(default=None, compare=False, repr=False)


# The request fields this webhook reads, and their types in admission.k8s.io
# (k8s.io/api/admission/v1 AdmissionRequest); a review that breaks them is malformed.
_REQUEST_FIELDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("operation", str),
    ("subResource", str),
    ("namespace", str),
    ("name", str),
    ("resource", jsonc.OBJECT),
    ("userInfo", jsonc.OBJECT),
    ("object", jsonc.OBJECT),
    ("oldObject", jsonc.OBJECT),
    ("dryRun", bool),
)


def parse_review(body: object) -> tuple[str, AdmissionRequest]:
    """Validate the envelope; return (apiVersion, request).  Raises ReviewError."""
    if not isinstance(body, jsonc.OBJECT):
        raise ReviewError("the body must be a JSON object (an AdmissionReview)")
    api_version = body.get("apiVersion")
    if api_version not in API_VERSIONS:
        raise ReviewError(
            f"unsupported apiVersion {api_version!r}; expected one of {', '.join(API_VERSIONS)}"
        )
    if body.get("kind") != "AdmissionReview":
        raise ReviewError(f"kind must be AdmissionReview, got {body.get('kind')!r}")
    request = body.get("request")
    if not isinstance(request, jsonc.OBJECT):
        raise ReviewError("request is missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("request.uid is missing or empty")
    for name, types in _REQUEST_FIELDS:
        value = request.get(name)
        if value is not None and not isinstance(value, types):
            raise ReviewError(f"request.{name} has the wrong type ({type(value).__name__})")
    # A view, not a copy: the fields read have just been checked.
    return str(api_version), cast(AdmissionRequest, request)


def truncate(line: str, limit: int = MAX_WARNING) -> str:
    """One printable line of at most ``limit`` characters."""
    if len(line) <= limit and line.isprintable():
        return line  # the common case, without a per-character pass
    line = "".join(ch if ch.isprintable() else " " for ch in line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def response(
    api_version: str, uid: str, patch: list[PatchOp] | tuple[PatchOp, ...] = (),
    warnings: tuple[str, ...] = (),
) -> AdmissionReviewOut:  # fmt: skip
    """An ``allowed: true`` AdmissionReview answer; a patch only when there is one."""
    return _answer(api_version, uid, _encode_patch(patch), tuple(truncate(w) for w in warnings))


def _encode_patch(patch: list[PatchOp] | tuple[PatchOp, ...]) -> str:
    """``response.patch``: the base64 of the patch's JSON; "" without a patch."""
    return base64.b64encode(jsonc.dumps(list(patch))).decode("ascii") if patch else ""


def _answer(api_version: str, uid: str, encoded: str, shown: tuple[str, ...]) -> AdmissionReviewOut:
    """``response`` from the patch already encoded and the warnings already truncated."""
    resp: AdmissionResponse = {"uid": uid, "allowed": True}
    if encoded:
        resp["patchType"] = "JSONPatch"
        resp["patch"] = encoded
    if shown:
        resp["warnings"] = list(shown)
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": resp}


def in_scope(request: AdmissionRequest) -> tuple[bool, tuple[str, ...]]:
    """Whether this webhook acts on the request, and which container lists.

    Scope: Pod CREATE, and UPDATE through the ``pods/ephemeralcontainers``
    subresource (which can change only ``spec.ephemeralContainers``: the
    apiserver's ephemeral-containers strategy drops every other change).
    """
    resource = request.get("resource") or {}
    if resource.get("group", "") != "" or resource.get("resource") != "pods":
        return False, ()
    sub = request.get("subResource", "") or ""
    op = request.get("operation")
    if op == "CREATE" and sub == "":
        return True, CONTAINER_KINDS
    if op == "UPDATE" and sub == "ephemeralcontainers":
        return True, ("ephemeralContainers",)
    return False, ()


def admit(body: object, ctx: PlanContext) -> Outcome:
    """Decide one admission.  Raises ReviewError only for a malformed envelope.

    Any other exception is the caller's to turn into an allowed answer with a
    warning (``fail_open``), so the mapping of errors lives in one place.
    """
    api_version, request = parse_review(body)
    uid = request["uid"]
    ok, kinds = in_scope(request)
    if not ok:
        return Outcome(response(api_version, uid), "skipped", request, skipped="out of scope")
    pod = request.get("object")
    if not isinstance(pod, jsonc.OBJECT):
        raise ReviewError("request.object is missing or not an object")
    meta = pod.get("metadata") if isinstance(pod.get("metadata"), jsonc.OBJECT) else {}
    namespace = request.get("namespace") or (meta or {}).get("namespace")
    plan = plan_pod(meta, pod.get("spec"), namespace, ctx, kinds)
    if plan.skipped:
        return Outcome(response(api_version, uid), "skipped", request, plan, skipped=plan.skipped)
    ephemeral = request.get("subResource") == "ephemeralcontainers"
    if ephemeral:
        # Existing ephemeral containers may not be changed: apiserver validation
        # (ValidatePodEphemeralContainersUpdate) rejects the whole update with 422
        # ("existing ephemeral containers ... may not be changed").  Only the ones
        # this update adds (absent from oldObject) are planned.
        plan = _only_new(plan, request.get("oldObject"))
    # Through pods/ephemeralcontainers the apiserver keeps only
    # spec.ephemeralContainers of the patched object (the subresource's update
    # strategy drops every other change, annotations included, without an error;
    # seen against kube-apiserver v1.37 in tests/e2e/test_webhook.py).  So only the
    # image operations are sent there, and the audit record keeps the originals.
    derived = _derive(pod, plan, None if ephemeral else ORIGINALS_ANNOTATION)
    answer = _answer(api_version, uid, derived.encoded, derived.shown)
    decision: Decision = "patched" if derived.patch else "unchanged"
    return Outcome(answer, decision, request, plan, derived.patch, derived.warnings)


@dataclass(frozen=True, slots=True)
class _Derived:
    """What an admission's answer derives from its plan and the pod's annotations."""

    patch: tuple[PatchOp, ...]
    warnings: tuple[str, ...]
    encoded: str  # base64 of the patch's JSON; "" without a patch
    shown: tuple[str, ...]  # the warnings as response.warnings carries them


_NO_PATCH = "review.no-patch"  # this module's key in PodPlan.derived for a plan without rewrites


def _derive(pod: Mapping[str, Any], plan: PodPlan, annotation: str | None) -> _Derived:
    """The patch, the warnings and their encodings, memoised on ``plan``.

    The patch depends on the plan and, through the originals annotation, on
    the pod's annotations (``patch.annotation_state``, which is all the patch
    builder reads of them); the warnings on the plan and on whether the
    annotation had to be left out.  So the result is memoised in
    ``plan.derived`` under the annotation state: the pods of one DaemonSet
    share a plan (plan_pod), and all but the first get their answer from here.
    Measured with bench/admit.py: ``review.admit`` 13.1 -> 5.4 us.
    """
    # Without rewrites there is no patch: nothing of the annotations is read
    # (a pod's odd annotations must not fail an admission that changes nothing).
    state = annotation_state(pod, annotation) if plan.rewrites else None
    key: object = _NO_PATCH if state is None else state
    hit = plan.derived.get(key)
    if hit is not None:
        return cast(_Derived, hit)
    ops, omitted = build_patch_checked(pod, plan, annotation=annotation, state=state)
    patch = tuple(ops)
    warnings = tuple(d.short_message(MAX_WARNING) for d in plan.rewrites + plan.warnings)
    if omitted is not None:
        warnings += (omitted,)
    derived = _Derived(patch, warnings, _encode_patch(patch), tuple(truncate(w) for w in warnings))
    plan.remember_derived(key, derived)
    return derived


def probe_requests(body: object, ctx: PlanContext) -> tuple[ImageRef, ...]:
    """The references ``admit(body, ctx)`` may consult, for the shell to probe first.

    Raises ReviewError for a malformed envelope, exactly as ``admit`` does.
    """
    _, request = parse_review(body)
    ok, kinds = in_scope(request)
    pod = request.get("object")
    if not ok or not isinstance(pod, jsonc.OBJECT):
        return ()
    meta = pod.get("metadata") if isinstance(pod.get("metadata"), jsonc.OBJECT) else {}
    namespace = request.get("namespace") or (meta or {}).get("namespace")
    return _pod_probe_requests(meta, pod.get("spec"), namespace, ctx, kinds)


def _only_new(plan: PodPlan, old: object) -> PodPlan:
    """``plan`` without the ephemeral containers that ``old`` (oldObject) already had."""
    spec = old.get("spec") if isinstance(old, jsonc.OBJECT) else None
    existing = spec.get("ephemeralContainers") if isinstance(spec, jsonc.OBJECT) else None
    names = {c.get("name") for c in existing or [] if isinstance(c, jsonc.OBJECT)}
    if not names:
        return plan
    return replace(plan, decisions=tuple(d for d in plan.decisions if d.container not in names))


def fail_open(body: object, error: BaseException) -> Outcome:
    """The answer when deciding failed: allowed, no patch, one warning.

    Uses whatever uid and apiVersion the body has; ``body`` has already passed
    ``parse_review`` when this is called.
    """
    api_version, request = parse_review(body)
    message = f"ecr-webhook: internal error, pod admitted unchanged ({type(error).__name__})"
    return Outcome(
        response(api_version, request["uid"], (), (message,)),
        "error",
        request,
        warnings=(message,),
        error=f"{type(error).__name__}: {error}",
        exception=error,
    )


_STATUS_REASONS = {400: "BadRequest", 413: "RequestEntityTooLarge", 415: "UnsupportedMediaType"}


def status_document(code: int, message: str) -> dict[str, Any]:
    """A Kubernetes ``Status`` for an HTTP request that carries no AdmissionReview.

    What the webhook answers with a 4xx (the app's 400/413/415, and the
    worker's own 413 for a body over the limit): the kube-apiserver logs the
    body of a non-200 webhook answer, and a ``Status`` is what it knows how to
    show (k8s.io/apimachinery metav1.Status).
    """
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "message": message,
        "reason": _STATUS_REASONS.get(code, "BadRequest"),
        "code": code,
    }
