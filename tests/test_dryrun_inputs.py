"""``ecr-webhook dry-run`` input edges found by hand (issue 11): an unknown
cluster region, alias bombs, flow-mapping and concatenated-JSON streams, pipes
and character devices as files, file-level errors in the JSON report, and
JSON errors that say JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from webhook.cli import main

A4 = "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com"
A4_OK = "491585149902.dkr.ecr.ap-southeast-4.amazonaws.com"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["dry-run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def pod(name: str, image: str = f"{A4}/eks/pause:3.10") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"containers": [{"name": "c", "image": image}]}}  # fmt: skip


# --------------------------------------------------------------------- unknown region


@pytest.mark.parametrize("how", ["flag", "policy", "env"])
def test_unknown_region_warns_and_plans(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    f = tmp_path / "pods.yaml"
    f.write_text(yaml.safe_dump_all([
        pod("wrong-account"), pod("in-region", "602401143452.dkr.ecr.ap-southeast-9."
                                  "amazonaws.com/eks/pause:3.10")]))  # fmt: skip
    args = ["-f", str(f), "-o", "json"]
    if how == "flag":
        args += ["--region", "ap-southeast-9"]
    elif how == "policy":
        (tmp_path / "p.yaml").write_text("region: ap-southeast-9\n")
        args += ["--policy", str(tmp_path / "p.yaml")]
    else:
        monkeypatch.setenv("AWS_REGION", "ap-southeast-9")
    code, out, err = run(args, capsys)
    assert code == 0
    assert "warning: region ap-southeast-9 is not in the registry data" in err
    rep = json.loads(out)
    assert rep["region"] == "ap-southeast-9"
    first, second = rep["objects"]
    assert [r["to"] for r in first["rewrites"]] == [f"{A4_OK}/eks/pause:3.10"]
    assert second["rewrites"] == [] and second["warnings"] == []


def test_malformed_region_is_still_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["--region", "moon-1", "-f", "/dev/null"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: command line: --region: not an AWS region name")
