"""Small test helpers (not fixtures)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jsonpatch

from webhook.core.objects import pod_sites
from webhook.core.patch import build_patch
from webhook.core.plan import PlanContext, PodPlan, plan_pod


def plan_object(obj: Mapping[str, Any], ctx: PlanContext) -> tuple[PodPlan, list[Any], Any]:
    """Plan the single pod site of ``obj``; return (plan, patch, patched object)."""
    sites = [s for _, s in pod_sites(obj) if s is not None]
    assert len(sites) == 1, f"expected one pod spec, found {len(sites)}"
    site = sites[0]
    plan = plan_pod(site.meta, site.spec, site.namespace, ctx)
    patch = build_patch(obj, plan, site.spec_pointer, site.meta_pointer)
    patched = jsonpatch.JsonPatch(patch).apply(copy.deepcopy(dict(obj))) if patch else obj
    return plan, patch, patched
