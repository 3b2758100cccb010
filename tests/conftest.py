"""Fixtures shared by all test directories."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _own_signing_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Evidence is signed with the user's default key (`signing.default_key_path`) when
    none is configured: the tests, and the commands they start, get a key of their own
    instead of creating one in the home directory of whoever runs them."""
    saved = {name: os.environ.get(name) for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME")}
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    # ... and no lists of known media but the ones a test makes (`matching.db`).
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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


@pytest.fixture
def configured_logging() -> Iterator[None]:
    """For tests that run `logs.configure` as an entry point does: structlog's
    config, the root handlers and level, the levels it sets on noisy libraries and the
    bound context are all restored afterwards."""
    import logging

    import structlog

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = ("botocore", "httpx", "httpcore", "faust")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)
        structlog.contextvars.clear_contextvars()
