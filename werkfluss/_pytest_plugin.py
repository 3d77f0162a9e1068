"""werkfluss's pytest plugin: the ``werkfluss_server``, ``werkfluss_settings`` and ``werkfluss_clock`` fixtures.

pytest loads this module (the ``pytest11`` entry point) in every run in an
environment where werkfluss is installed, whether the suite uses werkfluss
or not. So it imports nothing of werkfluss at module level: the fixtures
import what they need when a test asks for them.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._options import Settings
    from ._test_clock import TestClock

__all__ = ["werkfluss_clock", "werkfluss_server", "werkfluss_settings"]


@pytest.fixture(scope="session")
def werkfluss_server() -> Iterator[Settings]:
    """An embedded Valkey server in a temporary directory, for the test session."""
    from ._store._embedded import throwaway_server

    with throwaway_server() as settings:
        yield settings


@pytest.fixture
def werkfluss_settings(werkfluss_server: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """`Settings` for one test: the session's server, a key prefix of the test's own.

    Also set as ``WERKFLUSS_DIR`` / ``WERKFLUSS_PREFIX`` (and
    ``WERKFLUSS_REDIS_URL`` removed) for the test, so calls without
    explicit settings use them.
    """
    from ._options import Settings

    settings = Settings(directory=werkfluss_server.directory, prefix=f"test-{uuid.uuid4().hex[:12]}:")
    monkeypatch.delenv("WERKFLUSS_REDIS_URL", raising=False)
    monkeypatch.setenv("WERKFLUSS_DIR", settings.directory)
    monkeypatch.setenv("WERKFLUSS_PREFIX", settings.prefix)
    return settings


@pytest.fixture
def werkfluss_clock(werkfluss_settings: Settings) -> Iterator[TestClock]:
    """A `werkfluss.testing.TestClock` in auto mode on ``werkfluss_settings``' prefix, for one test.

    Durable sleeps, `sleep_until` and delayed starts of the test's runs are
    skipped whenever nothing else goes on in the process; the clock is the
    server's again after the test. ``werkfluss_clock.advance("1d")`` moves it too.
    """
    from ._test_clock import TestClock

    with TestClock(werkfluss_settings) as clock:
        yield clock
