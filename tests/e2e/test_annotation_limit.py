"""The originals annotation and Kubernetes' 256 KiB annotation limit, against the
real kube-apiserver (issue 11).

The apiserver validates a pod after the mutating webhooks ran, with
ValidateAnnotationsSize (k8s.io/apimachinery pkg/api/validation/objectmeta.go:
the bytes of every key and value, at most 256 * 1024).  A webhook that adds an
annotation to a pod near the limit turns its creation into a 422.  Here:

* the limit is the apiserver's, not our reading of it: a pod at exactly
  262144 bytes is stored, one byte more is refused (in the webhook's own
  namespace, which is never sent to it);
* a pod whose annotations leave exactly room for the originals annotation gets
  it, and is stored at exactly 262144 bytes;
* a pod one byte fuller, with images to rewrite, is still admitted: images
  rewritten, the annotation left out, a Warning saying so, the originals in
  the audit record.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e import test_webhook
from tests.e2e.test_webhook import OWN_NAMESPACE, WRONG_IMAGE, Cluster, raw, rewritten, unique
from tests.e2e.webhook_support import parse_warning_headers, simple_pod
from tests.serving import ORIGINALS
from webhook.core.patch import ANNOTATION_OMITTED, annotations_size

pytestmark = pytest.mark.e2e

LIMIT = 256 * 1024
# test_webhook's module fixture: ecr-webhook serve registered from manifests/base
# (a server of this module's own).
cluster = test_webhook.cluster


def pod_at(name: str, total: int, images: dict[str, str]) -> dict[str, Any]:
    """A pod whose annotations total ``total`` bytes (Kubernetes' count)."""
    pod = simple_pod(name, images)
    pod["metadata"]["annotations"] = {"e2e.ecr-webhook.io/filler": ""}
    pod["metadata"]["annotations"]["e2e.ecr-webhook.io/filler"] = "x" * (
        total - len("e2e.ecr-webhook.io/filler")
    )
    assert annotations_size(pod["metadata"]["annotations"]) == total
    return pod


def originals_size(images: dict[str, str]) -> int:
    return len(ORIGINALS) + len(json.dumps(images, sort_keys=True, separators=(",", ":")))


def test_the_apiserver_refuses_one_byte_over_the_limit(cluster: Cluster) -> None:
    """The limit itself, without the webhook (its own namespace is never sent)."""
    c = cluster
    c.ensure_namespace(OWN_NAMESPACE)
    at = c.create_pod(OWN_NAMESPACE, pod_at(unique("at-limit"), LIMIT, {"c": "busybox"}),
                      dry_run=True)  # fmt: skip
    assert at.status == 201
    with pytest.raises(ApiException) as over:
        c.create_pod(OWN_NAMESPACE, pod_at(unique("over"), LIMIT + 1, {"c": "busybox"}),
                     dry_run=True)  # fmt: skip
    assert over.value.status == 422
    assert "262144" in str(over.value.body)


def test_room_for_the_annotation_exactly(cluster: Cluster) -> None:
    c = cluster
    ns = c.namespace("e2e-annotations")
    images = {"c": WRONG_IMAGE}
    name = unique("room")
    response = c.create_pod(ns, pod_at(name, LIMIT - originals_size(images), images))
    assert response.status == 201
    stored = c.read_pod(ns, name)
    assert stored["spec"]["containers"][0]["image"] == rewritten(WRONG_IMAGE)
    assert json.loads(stored["metadata"]["annotations"][ORIGINALS]) == images
    assert annotations_size(stored["metadata"]["annotations"]) == LIMIT


def test_a_pod_one_byte_fuller_is_admitted_without_the_annotation(cluster: Cluster) -> None:
    c = cluster
    ns = c.namespace("e2e-annotations")
    images = {"c": WRONG_IMAGE}
    name = unique("full")
    response = c.create_pod(ns, pod_at(name, LIMIT - originals_size(images) + 1, images))
    assert response.status == 201
    created = raw(response)
    assert created["spec"]["containers"][0]["image"] == rewritten(WRONG_IMAGE)
    assert ORIGINALS not in created["metadata"]["annotations"]
    texts = [text for _, _, text in parse_warning_headers(response.headers.getlist("Warning"))]
    assert ANNOTATION_OMITTED in texts
    (record,) = c.audit.for_pod(ns, name)
    assert record["decision"] == "patched"
    assert [(d["from"], d["to"]) for d in record["containers"]] == [
        (WRONG_IMAGE, rewritten(WRONG_IMAGE))
    ]
    assert ANNOTATION_OMITTED in record["warnings"]
