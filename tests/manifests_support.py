"""Rendering the kustomize tree for tests: kustomize built from Go, never a stand-in.

``kustomize_binary()`` runs tools/build-kustomize.sh (a no-op once the pinned
version is in the cache outside the repository) and raises ``KustomizeError``
with the build's output when it cannot: the tests that use it FAIL then,
they never skip, because an unrendered tree is an untested tree.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
INSTALL_YAML = MANIFESTS / "install.yaml"
BUILD_SCRIPT = ROOT / "tools" / "build-kustomize.sh"
RENDER_SCRIPT = ROOT / "tools" / "render-install.sh"
COMPONENTS = ("self-signed", "cert-manager", "monitoring", "hpa")
# The renderings the tests look at: both certificate paths, each with every
# optional component, plus the two overlays users apply.
COMBINATIONS: dict[str, tuple[str, ...]] = {
    "self-signed": ("self-signed",),
    "cert-manager": ("cert-manager",),
    "self-signed+monitoring+hpa": ("self-signed", "monitoring", "hpa"),
    "cert-manager+monitoring+hpa": ("cert-manager", "monitoring", "hpa"),
}


class KustomizeError(RuntimeError):
    """kustomize could not be built or failed to render."""


@cache
def kustomize_binary() -> Path:
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1800, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        raise KustomizeError(
            f"{BUILD_SCRIPT} failed (exit {proc.returncode}); it needs Go on PATH and the Go "
            f"module proxy:\n{proc.stderr[-4000:]}"
        )
    return Path(lines[-1])


def kustomize(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [str(kustomize_binary()), *args],
        capture_output=True, text=True, timeout=300, check=False, cwd=cwd,
    )  # fmt: skip
    if proc.returncode != 0:
        raise KustomizeError(f"kustomize {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def build_dir(path: Path) -> str:
    return kustomize("build", str(path))


def build_with(components: Sequence[str], extra: str = "") -> str:
    """Render base + ``components`` (names under manifests/components) in a scratch overlay.

    kustomize refuses absolute paths in a kustomization, so the overlay names
    the tree by relative paths from its temporary directory.
    """
    with tempfile.TemporaryDirectory(prefix="ecr-webhook-kustomize-") as tmp:
        rel = os.path.relpath(MANIFESTS, tmp)
        lines = [
            "apiVersion: kustomize.config.k8s.io/v1beta1",
            "kind: Kustomization",
            "resources:",
            f"  - {rel}/base",
            "components:",
            *(f"  - {rel}/components/{c}" for c in components),
        ]
        (Path(tmp) / "kustomization.yaml").write_text("\n".join(lines) + "\n" + extra)
        return build_dir(Path(tmp))


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def find(docs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def render_install() -> str:
    """What tools/render-install.sh writes to manifests/install.yaml."""
    proc = subprocess.run(
        ["bash", str(RENDER_SCRIPT), "--stdout"],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise KustomizeError(f"{RENDER_SCRIPT} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout
