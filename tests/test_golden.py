"""Golden fixtures: one file per case in tests/golden, input plus expected decisions.

Each file carries ``region``, an optional inline ``policy``, the ``object`` and the
``expect``ed decision of every container, in spec order (init, containers,
ephemeral).  Besides the decisions, every case checks the properties the planner
promises: the patch applies and gives exactly the planned images, the originals
annotation records what changed, and planning the result again rewrites nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import plan_object
from webhook.core.objects import pod_sites
from webhook.core.plan import Action, PlanContext
from webhook.core.policy import ORIGINALS_ANNOTATION, policy_from_mapping

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(GOLDEN.glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


def test_golden_folder_is_not_empty() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden(path: Path) -> None:
    case = _load(path)
    policy = policy_from_mapping(case.get("policy"), source=path.name)
    ctx = PlanContext.build(policy, case.get("region"))
    plan, patch, patched = plan_object(case["object"], ctx)

    if case.get("skipped"):
        assert plan.skipped, "expected the pod to be skipped"
        assert patch == []
        return
    assert plan.skipped is None
    got = [
        {k: v for k, v in (("container", d.container), ("action", str(d.action)),
                           ("reason", str(d.reason)), ("to", d.target)) if v is not None}
        for d in plan.decisions
    ]  # fmt: skip
    assert got == case["expect"]

    # The patch gives exactly the planned images, and records the originals.
    site = next(s for _, s in pod_sites(patched) if s is not None)
    images = {c["name"]: c["image"] for k in ("initContainers", "containers",
              "ephemeralContainers") for c in (site.spec or {}).get(k) or []}  # fmt: skip
    for d in plan.decisions:
        assert images[d.container] == (d.target if d.action is Action.REWRITE else d.image)
    if plan.rewrites:
        originals = json.loads(site.meta["annotations"][ORIGINALS_ANNOTATION])  # type: ignore[index]
        assert originals == {d.container: d.image for d in plan.rewrites}
    else:
        assert patch == []

    # Idempotence: planning over the planner's own output yields nothing.
    again, again_patch, _ = plan_object(patched, ctx)
    assert again.rewrites == ()
    assert again_patch == []
