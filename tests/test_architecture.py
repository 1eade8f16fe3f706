"""The pure core stays pure: import-linter's contract (pyproject.toml) holds, and
importing the core modules loads none of the I/O libraries."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every module of the webhook.core package, found on disk so a new core module
# cannot slip past the check.
CORE = sorted(
    "webhook.core." + p.stem
    for p in (ROOT / "webhook" / "core").glob("*.py")
    if p.stem != "__init__"
)
IO_LIBS = [
    "flask",
    "boto3",
    "botocore",
    "kubernetes",
    "gunicorn",
    "prometheus_client",
    "werkzeug",
    "urllib3",
    "requests",
    "socket",
]


def test_import_linter_contract() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 1 kept, 0 broken" in out.stdout


def test_core_imports_no_io_library() -> None:
    code = (
        "import sys\n"
        f"for m in {CORE!r}: __import__(m)\n"
        f"print([m for m in {IO_LIBS!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_core_imports_only_the_core() -> None:
    """No core module imports a shell module of the package (webhook.app, webhook.cli, ...)."""
    assert len(CORE) >= 9
    offenders = []
    for path in (ROOT / "webhook" / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if node.module == "webhook":
                    names = [f"webhook.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("webhook.") and not name.startswith("webhook.core"):
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []
