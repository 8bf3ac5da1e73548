"""Shared fixtures and hypothesis profiles.

Hypothesis runs derandomized (the same examples on every run, so a failure in
CI is a failure on every machine). ``HYPOTHESIS_PROFILE=explore`` draws fresh
examples instead, for hunting new failures locally.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep generated datasets out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TANDEM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
