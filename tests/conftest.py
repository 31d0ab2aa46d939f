"""Shared test fixtures. The `realdata` and `slow` markers are registered in pyproject.toml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    """The read-only real data: $CAPKIT_SHARED_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("CAPKIT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder, or a clean skip where this machine has none."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"no real data at {path} (set CAPKIT_SHARED_DATA)")
    return path
