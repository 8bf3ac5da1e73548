"""Shared fixtures: a private data cache per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep generated datasets out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TANDEM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
