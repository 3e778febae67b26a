"""Shared test configuration: a derandomized, bounded hypothesis profile for CI, and strict misuse warnings."""

import gc
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

from accumopt.misuse import MisuseWarning

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)  # small models: threads only add noise on 2-core CI machines


def pytest_configure(config: pytest.Config) -> None:
    # A MisuseWarning no test expects fails that test: a correct loop stays silent, and a test that misuses the
    # wrapper on purpose says so (pytest.warns, or a filterwarnings mark saying why).
    config.addinivalue_line("filterwarnings", "error::accumopt.misuse.MisuseWarning")
    # A wrapper destroyed with its window pending warns from its finalizer, where "error" turns the warning
    # into an unraisable exception: fail on that too (the fixture below makes it the leaking test's).
    config.addinivalue_line(
        "filterwarnings", r"error:(?s)Exception ignored in.*MisuseWarning:pytest.PytestUnraisableExceptionWarning")
    # Lightning's own use of its deprecated LeafSpec (not ours; lightning.pytorch.utilities._pytree).
    config.addinivalue_line(
        "filterwarnings", "ignore:.*LeafSpec.*is deprecated:FutureWarning:lightning.pytorch.utilities._pytree")


@pytest.fixture(autouse=True)
def _collect_garbage():
    """Collect the test's garbage when it ends, so that a wrapper it left pending warns in that test.

    ``gc.freeze()`` then sets what survived aside: the next collection only walks what the next test
    creates (a full collection with torch and its friends loaded costs ~0.2 s).
    """
    yield
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session: pytest.Session) -> None:
    gc.unfreeze()  # what the session set aside is collected as usual again


# The blocks of a doc page are fragments of one program, run in one namespace per page (tests/test_docs.py): a
# block may stop mid-window (a single step(weight=...) in docs/weights.md), and a later block that binds `opt`
# again drops that wrapper. Not a misuse in a test; whether the pages' loops flush is a question for the pages.
_DROPPED_PENDING = "An AccumulatingOptimizer was destroyed"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name == "test_docs.py":
            item.add_marker(pytest.mark.filterwarnings(f"ignore:{_DROPPED_PENDING}:accumopt.misuse.MisuseWarning"))


@pytest.fixture(scope="module", autouse=True)
def _doc_pages_dropped(request: pytest.FixtureRequest):
    """The doc pages' namespaces go with their module, not at exit (where their wrappers would warn)."""
    yield
    pages = getattr(request.module, "_pages", None) if request.module.__name__ == "test_docs" else None
    if pages:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _DROPPED_PENDING, MisuseWarning)
            pages.clear()
            gc.unfreeze()  # the namespaces may be in reference cycles that the last collections set aside
            gc.collect()
