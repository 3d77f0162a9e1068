"""R-22: the server is SIGKILLed while runs sleep, and restarted 2 s later (``appendfsync everysec``).

Each run of `flows.nap` records a step, then pauses on a durable sleep. While every run is
paused the server process dies; some timers come due while it is down, the others after it
is back. Each timer must survive (its entry in the timer set is acknowledged, so the AOF
has it), fire exactly once (the step after the sleep executes once) and never before its
due time. Lateness: for a timer due during the outage, from the restart; otherwise from
its due time.

Each server gets one of its own, killed and restarted like R-07/R-08's (`Target`).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from werkfluss._events import RunResumed, TimerStarted

from ..conftest import ROOT
from . import flows
from .harness import Faults, pct, report
from .targets import Target

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

RUNS = int(os.environ.get("WF_FAULT_TIMER_RESTART_RUNS", "20"))
OUTAGE = 2.0  # seconds the server stays down
SHORT = 1.0  # seconds of sleep: due while the server is down
LONG = OUTAGE + 3.0  # due after it is back


@pytest.fixture(params=["redis", "valkey"])
def everysec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    server = Target(request.param, "everysec", tmp_path)
    yield server
    server.close()


def test_r22_a_timer_survives_a_server_restart_and_fires_once(everysec: Target, prefix: str, tmp_path: Path) -> None:
    server = everysec
    env = {**os.environ, **server.env, "WERKFLUSS_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
    env.pop("WERKFLUSS_DIR" if server.kind == "redis" else "WERKFLUSS_REDIS_URL", None)
    faults = Faults(tmp_path / "faults", env, server.url, server.settings(prefix), kind=server.kind)
    try:
        calls = {f"nap-{i}": (i, SHORT if i % 2 else LONG) for i in range(RUNS)}
        faults.workers.concurrency = RUNS
        faults.workers.start()
        faults.enqueue(flows.nap, calls.items())
        faults.wait_status(calls, ["paused"])
        killed_at = time.time()
        server.kill()
        time.sleep(OUTAGE)  # the fault itself: the server stays away this long
        server.restart()
        restarted_at = time.time()
        faults.wait_status(calls, timeout=60)
        figures = faults.check({r: flows.expected_nap(args[0]) for r, args in calls.items()})
        acknowledged, lost, examples = faults.acknowledged_lost()
        assert lost == 0, examples

        executions = Counter(r.key for r in faults.ledger("exec"))
        fires = Counter(executions[f"{r}:3"] for r in calls)  # seq 3: the step after the sleep
        assert fires == {1: len(calls)}, f"the step after each sleep executed once: {fires}"
        late_after_outage, late_after_due, early = [], [], []
        resumes: Counter[int] = Counter()
        for run_id in calls:
            events = [e for _, e in faults.events(run_id)]
            due = next(e.due for e in events if isinstance(e, TimerStarted))
            resumed = [e.time for e in events if isinstance(e, RunResumed)]
            resumes[len(resumed)] += 1
            fired = resumed[-1]  # the resume that ran the step after the sleep
            if fired < due:
                early.append(run_id)
            if due <= restarted_at:
                late_after_outage.append(fired - restarted_at)
            else:
                late_after_due.append(fired - due)
        assert early == [], f"timers fired before they were due: {early}"
        assert [p.pid for p in faults.workers.procs if p.poll() is not None] == [], "a worker died"
        report(
            f"R-22 timers across a server restart, everysec [{server.kind}]",
            **figures,
            acknowledged_events_lost=lost,
            writes_acknowledged=acknowledged,
            outage_s=round(restarted_at - killed_at, 3),
            timers_due_during_outage=len(late_after_outage),
            timers_due_after_restart=len(late_after_due),
            fires_per_timer=dict(fires),
            early_fires=len(early),
            resumes_per_run=dict(resumes),
            lateness_after_restart_p50_max=[pct(late_after_outage, 50), pct(late_after_outage, 100)],
            lateness_after_due_p50_max=[pct(late_after_due, 50), pct(late_after_due, 100)],
        )
    finally:
        faults.close()
