"""Helpers the test modules share: reading a run's log and status, waiting for statuses, and
running the `werkfluss` console script. Test modules import from here, never from each other."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from werkfluss._events import decode_event
from werkfluss._store._open import open_store

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from werkfluss import Settings

    from .conftest import Server

    # The `cli` fixtures: the console script with arguments (and stdin), against the test's server.
    Cli = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]

__all__ = [
    "WERKFLUSS",
    "append_to_ledger",
    "events",
    "every_server",
    "one_line_error",
    "run_cli",
    "status",
    "statuses",
    "until_all",
    "until_status",
]

WERKFLUSS = str(Path(sys.executable).parent / "werkfluss")  # the console script pip installed


def append_to_ledger(line: str) -> None:
    """Append `line` to the file ``$WF_LEDGER`` names, if any (worker processes write it): one
    small ``O_APPEND`` write, so the lines of many processes never interleave."""
    ledger = os.environ.get("WF_LEDGER")
    if ledger:
        fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


@pytest.fixture(name="server", params=["valkey", "redis", "cluster"])
def every_server(request: pytest.FixtureRequest) -> Server:
    """`server` on the local 3-master Redis Cluster too: a module imports this to run each of
    its tests on the embedded Valkey, on Redis and on the cluster (formed once, on first use)."""
    return request.getfixturevalue(f"{request.param}_server")  # type: ignore[no-any-return]


async def events(settings: Settings, run_id: str) -> list[Any]:
    """The run's log, decoded, oldest first (read from the store, not through `get_events`)."""
    store = await open_store(settings)
    return [decode_event(body) async for batch in store.read_log(run_id) for _, body in batch if body]


async def status(settings: Settings, run_id: str) -> str:
    """The run's status as the store holds it (``""`` if there is no such run)."""
    store = await open_store(settings)
    return await store.status(run_id)


async def statuses(settings: Settings, run_ids: list[str]) -> Counter[str]:
    """How many of `run_ids` are in each status."""
    store = await open_store(settings)
    return Counter([await store.status(r) for r in run_ids])


async def until_status(settings: Settings, run_id: str, wanted: str, timeout: float = 10) -> None:
    """Wait until the run's status is `wanted`; fail after `timeout` seconds."""
    store = await open_store(settings)
    with anyio.fail_after(timeout):
        while await store.status(run_id) != wanted:
            await anyio.sleep(0.01)


async def until_all(settings: Settings, run_ids: list[str], wanted: str = "completed", timeout: float = 60) -> None:
    """Wait until every one of `run_ids` is `wanted`; fail after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while (await statuses(settings, run_ids))[wanted] != len(run_ids):
            await anyio.sleep(0.05)


async def run_cli(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `werkfluss` console script; the finished process, with text stdout and stderr."""
    done = await anyio.run_process([WERKFLUSS, *args], input=stdin.encode() if stdin else None, env=env, check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Assert the command failed with exit 1 and one ``werkfluss: ...`` line holding every needle."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("werkfluss: "), done.stderr
    for needle in needles:
        assert needle in lines[0]
