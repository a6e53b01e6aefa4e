"""Fixtures for the deployment tests."""

from __future__ import annotations

import pytest
from deploy_helpers import OVERLAYS, Overlay, render_overlay


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> Overlay:
    """Each kustomize overlay, rendered once per session."""
    return render_overlay(request.param)
