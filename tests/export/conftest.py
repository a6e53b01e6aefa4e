"""Fixtures for the export tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from export_helpers import movielens_dir


@pytest.fixture(scope="session")
def movielens_path() -> Path:
    return movielens_dir()
