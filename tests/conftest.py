"""Fixtures shared by all test directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (third-party weights and media), or $SYNTHWATCH_SHARED_DIR; skips if absent.

    These files are never copied into the repo, so tests that need them must skip
    cleanly on a checkout without them (mark such tests `pytest.mark.shared`).
    """
    env = os.environ.get("SYNTHWATCH_SHARED_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"
    if not (path / "weights").is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path
