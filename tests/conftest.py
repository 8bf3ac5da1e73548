"""Shared fixtures and hypothesis profiles.

Hypothesis runs derandomized (the same examples on every run, so a failure in
CI is a failure on every machine), 300 examples per property unless a test
sets its own. Profiles (``HYPOTHESIS_PROFILE=...`` or
``--hypothesis-profile=...``): ``explore`` draws fresh examples, for hunting
new failures locally; ``mutation`` runs 25 examples, for mutation testing
(docs/mutation.md), where the suite runs once per mutant.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=300, derandomize=True, print_blob=True)
settings.register_profile(
    "explore", parent=settings.get_profile("ci"), derandomize=False
)
settings.register_profile(
    "mutation", parent=settings.get_profile("ci"), max_examples=25
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep generated datasets out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TANDEM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture
def task_identity(monkeypatch):
    """The task identity Flower's engines set, for handlers run in-process."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread, as a ClientApp gets in simulation (and fast on 2 cores)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
