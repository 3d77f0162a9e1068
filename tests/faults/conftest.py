"""Fixtures of the fault suite, and its total runtime in the terminal summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
import pytest

from ..workers import server_env
from .harness import BATCH, LEASE, Faults, report
from .targets import Target

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from ..conftest import Server


@pytest.fixture
def faults(server: Server, prefix: str, tmp_path: Path) -> Iterator[Faults]:
    """A `Faults` world on the session's server (`server`: embedded Valkey or Debian's Redis)."""
    settings = msgspec.structs.replace(server.settings(prefix), lease=LEASE)
    world = Faults(
        tmp_path / "faults",
        server_env(server, prefix),
        server.url,
        settings,
        kind=server.kind,
        concurrency=max(16, BATCH),
    )
    yield world
    world.close()


@pytest.fixture(params=["redis", "valkey"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], Target]]:
    """Servers of each kind that a scenario kills, rolls back or corrupts: ``target(fsync)``
    starts one of its own (`targets.Target`); all are closed afterwards."""
    made: list[Target] = []

    def make(fsync: str) -> Target:
        made.append(Target(request.param, fsync, tmp_path))
        return made[-1]

    yield make
    for one in made:
        one.close()


_durations: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/faults/" in report.nodeid:
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _durations:
        total = round(sum(_durations.values()), 1)
        slowest = sorted(_durations.items(), key=lambda item: -item[1])[:5]
        terminalreporter.write_line(f"fault suite: {len(_durations)} tests in {total} s (setup + call + teardown)")
        for nodeid, seconds in slowest:
            terminalreporter.write_line(f"  {seconds:6.1f} s  {nodeid}")
        report("suite", tests=len(_durations), seconds=total)
