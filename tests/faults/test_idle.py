"""R-13: a worker with no work, with werkfluss's defaults (10 s lease, default poll).

Over `WINDOW` seconds of idleness (``WF_FAULT_IDLE_SECONDS``, default 10; RELIABILITY.md:
600) the test counts the commands the server processed (``INFO commandstats`` before and
after, without the test's own INFO calls: nothing else talks to the test's server then),
the worker's CPU time, and the warnings, errors and tracebacks it logged.

"Commands" are those the worker sends: the calls by name of ``INFO commandstats`` less
those werkfluss's scripts make inside (the timer poll's script makes three; the servers
count them in ``total_commands_processed`` too, reported as well). The bound asserted, at
most `MAX_RATE` commands/s, has a margin over today's figure (2-3/s: the blocking queue read
once a second and a slower timer poll; 11/s before the idle rate was lowered).
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING

import psutil
import pytest

from werkfluss import Settings
from werkfluss._store import SCRIPTS

from .harness import make_faults, report

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from ..conftest import Server
    from .harness import Faults

WINDOW = float(os.environ.get("WF_FAULT_IDLE_SECONDS", "10"))
MAX_RATE = 10.0  # commands/s
MAX_CPU = 5.0  # % of one core

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120 + WINDOW)]


@pytest.fixture
def world(server: Server, prefix: str, tmp_path: Path) -> Iterator[Faults]:
    faults = make_faults(server, prefix, tmp_path / "faults", lease=Settings().lease)
    yield faults
    faults.close()


def scripted() -> set[str]:
    """Commands werkfluss's scripts call (lower case), as INFO commandstats names them."""
    sources = "".join(script.source for script in SCRIPTS)
    return {name.lower() for name in re.findall(r"redis\.p?call\(\s*['\"](\w+)['\"]", sources)}


def command_counts(faults: Faults) -> tuple[int, int, dict[str, int]]:
    """Commands clients sent (``total_commands_processed``, this INFO included), connections
    accepted, and calls by command name, those that scripts make included."""
    stats = faults.client.info("stats")
    processed, connections = int(stats["total_commands_processed"]), int(stats["total_connections_received"])
    calls = faults.client.info("commandstats")
    return processed, connections, {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in calls.items()}


def test_r13_an_idle_worker_is_quiet(world: Faults) -> None:
    faults = world
    worker = faults.workers.start()
    process = psutil.Process(worker.pid)
    log_before = len(faults.workers.log(worker).splitlines())
    (sent_before, conns_before, before), cpu_before = command_counts(faults), process.cpu_times()
    began = time.monotonic()
    time.sleep(WINDOW)  # the scenario itself: nothing happens for this long
    (sent_after, conns_after, after), cpu_after = command_counts(faults), process.cpu_times()
    elapsed = time.monotonic() - began
    assert worker.poll() is None, faults.workers.log(worker)
    delta = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    delta.pop("info", None)  # the test's own
    total = (sent_after - sent_before - 2) / elapsed  # the two INFO calls of the first snapshot and this one's first
    inner = scripted()
    sent = sum(n for name, n in delta.items() if name.split("|")[0] not in inner) / elapsed
    cpu = 100 * (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / elapsed
    lines = faults.workers.log(worker).splitlines()[log_before:]
    troubles = [line for line in lines if " WARNING " in line or " ERROR " in line or line.startswith("Traceback")]
    report(
        f"R-13 idle worker, werkfluss defaults [{faults.kind}]",
        window_s=round(elapsed, 1),
        commands_sent_per_s=round(sent, 2),
        commands_with_script_calls_per_s=round(total, 2),
        by_name_per_s={name: round(n / elapsed, 2) for name, n in sorted(delta.items(), key=lambda i: -i[1])},
        connections_opened_per_s=round((conns_after - conns_before) / elapsed, 2),
        worker_cpu_percent=round(cpu, 2),
        errors_logged=len(troubles),
    )
    assert troubles == [], troubles[:5]
    assert sent <= MAX_RATE, delta
    assert cpu <= MAX_CPU
