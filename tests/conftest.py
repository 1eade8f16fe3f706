"""Shared fixtures.  ``SHARED`` is ../shared from the project root (may be absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.registry_conftest"]

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ECR_WEBHOOK_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared, or a skip that says why (only the corpus/data-copy tests use it)."""
    if not (SHARED / "ecr_accounts.csv").is_file():
        pytest.skip(
            f"shared material not found at {SHARED} (set ECR_WEBHOOK_SHARED); "
            "the corpus and data-copy checks need it"
        )
    return SHARED
