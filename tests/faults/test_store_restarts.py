"""R-07, R-08: the server process is SIGKILLed under load and restarted 2 s later; workers stay up.

Each variant gets a server of its own: Debian's redis-server (`RedisProcess`, restarted
on the same port and data) or an embedded Valkey in its own directory (restarted with
`ensure_server`, as the next `start()` would). Both run with ``appendonly yes`` and
``appendfsync always`` (R-07) or ``everysec`` (R-08). A process crash loses nothing the
server acknowledged in either mode: only a machine crash can lose the everysec window.

"Acknowledged events lost" is measured from the workers' side: every append a worker saw
acknowledged at log index N (the instrumented store's ``done ... ok N`` rows) must still
be that event at ``0-N`` in the final log.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ..conftest import ROOT
from . import flows
from .harness import DEADLINE, Faults, pct, report
from .targets import Target, worker_troubles

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

RUNS = int(os.environ.get("WF_FAULT_RESTART_RUNS", "200"))
# Runs per worker process. redis-py's asyncio pool refuses a 101st connection, and during an
# outage every retrying command holds one: a worker at --concurrency 200 hit "Too many
# connections" here (WF_FAULT_RESTART_CONCURRENCY=200 shows it), a StorageError that failed
# runs until such errors interrupted runs instead (see test_partitions.py).
PER_WORKER = int(os.environ.get("WF_FAULT_RESTART_CONCURRENCY", "50"))
OUTAGE = 2.0  # seconds the server stays down


@pytest.mark.parametrize(("scenario", "fsync"), [("R-07", "always"), ("R-08", "everysec")], ids=["R-07", "R-08"])
def test_r07_r08_server_sigkill_and_restart_loses_no_acknowledged_event(
    target: Callable[[str], Target], prefix: str, tmp_path: Path, scenario: str, fsync: str
) -> None:
    server = target(fsync)
    env = {**os.environ, **server.env, "WERKFLUSS_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
    env.pop("WERKFLUSS_DIR" if server.kind == "redis" else "WERKFLUSS_REDIS_URL", None)
    env["WF_FAULT_STEP_DELAY"] = "0.1"  # every run spends >= 0.3 s in flight
    faults = Faults(
        tmp_path / "faults", env, server.url, server.settings(prefix), kind=server.kind, concurrency=PER_WORKER
    )
    try:
        calls = {f"restart-{i}": (i,) for i in range(RUNS)}
        expected = faults.reference(flows.order, calls).result(DEADLINE)  # before the fault: same server
        for _ in range(-(-RUNS // PER_WORKER)):
            faults.workers.start()
        faults.enqueue(flows.order, calls.items())
        faults.wait(lambda: len(faults.ledger("exec")) >= RUNS, "a third of the steps to have started")
        before = len(faults.ledger("done"))
        killed_at = time.time()
        server.kill()
        time.sleep(OUTAGE)  # the fault itself: the server stays away this long
        server.restart()
        restarted_at = time.time()
        faults.wait_status(calls, timeout=120)
        figures = faults.check(expected)
        acknowledged, lost, examples = faults.acknowledged_lost()
        assert lost == 0, examples
        progress = [r.time for r in faults.ledger("done") if r.time > restarted_at and r.extra[1:2] == ("ok",)]
        executions = Counter(r.key for r in faults.ledger("exec"))
        troubles, tracebacks = worker_troubles(faults)
        assert [p.pid for p in faults.workers.procs if p.poll() is not None] == [], "a worker died"
        assert tracebacks == 0, faults.describe_workers()
        completed = [e.time for r in calls for _, e in faults.events(r) if type(e).__name__ == "RunCompleted"]
        report(
            f"{scenario} appendfsync {fsync} [{server.kind}]",
            **figures,
            writes_acknowledged=acknowledged,
            writes_acknowledged_before_kill=before,
            acknowledged_events_lost=lost,
            steps_re_executed=sum(n - 1 for n in executions.values() if n > 1),
            outage_s=round(restarted_at - killed_at, 3),
            restart_to_first_progress_s=round(min(progress) - restarted_at, 3) if progress else None,
            restart_to_all_completed_s=round(max(completed) - restarted_at, 3),
            completion_after_restart_p50=pct([t - restarted_at for t in completed if t > restarted_at], 50),
            worker_warnings_by_type=dict(troubles),
            worker_tracebacks=tracebacks,
        )
    finally:
        faults.close()
