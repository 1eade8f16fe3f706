"""The pure core stays pure: import-linter's contract (pyproject.toml) holds, and
importing the core modules loads none of the I/O libraries."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = [
    "webhook.imageref",
    "webhook.ecr",
    "webhook.policy",
    "webhook.plan",
    "webhook.patch",
    "webhook.review",
    "webhook.objects",
    "webhook.errors",
    "webhook.audit",
]
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
