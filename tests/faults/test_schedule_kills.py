"""Issue 17: a schedule firing every second under a kill storm.

Three worker processes serve `schedule_flows.tick` (``every="1s"``, ``overlap="allow"``).
Once its first tick ran, one worker, chosen at random, is SIGKILLed every 10 s (the first
5 s in), each time within 20 ms after a tick (while it is fired and run), and a new one
started at once, for `STORM` seconds; so at least two workers serve
the schedule at every moment. Then the schedule is paused (`pause_schedule`), the workers
are stopped (SIGTERM) and one fresh worker finishes whatever runs they left.

- **Exactly one run per tick, counted by run ID**: every run under the prefix is a tick's,
  its ID is the one derived from the schedule and its tick (``<name>@<tick>``), and no two
  runs share a tick.
- **None missed while a worker was alive**: every second from the first tick to the last
  has its run, and the last is no earlier than the end of the storm.
- Every run completed once (`Faults.check`: one completion per step, results = ticks).

Figures: lateness p50/p99/max (tick → its run's step started, on this machine's clock;
a tick whose run was on a killed worker waits for the lease), ticks, kills, step
re-executions, the schedule's fired/skipped counts.

Scaled for CI: a ``WF_FAULT_SCHEDULE_STORM`` (20) second storm; issue 17 asks for a
minute: ``WF_FAULT_SCHEDULE_STORM=60`` (6 kills).

A random kill seldom lands in the few milliseconds a tick takes to fire, so the second test
stops a worker there on purpose (`schedule_flows`' barriers) and SIGKILLs it: after its
claim on the tick succeeded, before the enqueue; and after the enqueue, before the
schedule's state records the tick as fired. The tick must still get its one run (the
other workers fire it, the enqueue reaching the same run ID), and the ticks around it too.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime

import pytest

from werkfluss import ScheduleInfo, list_schedules_async, pause_schedule_async

from .harness import DEADLINE, LEASE, Faults, pct, report

STORM = float(os.environ.get("WF_FAULT_SCHEDULE_STORM", "20"))
KILL_EVERY = 10.0  # seconds between SIGKILLs (the first after half of it)
FIRING = 0.02  # seconds after a tick within which each kill lands (a tick fires and runs in about 10 ms)
WORKERS = 3
NAME = "faults-every-second"  # schedule_flows.NAME: that module is imported by the workers only

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180 + 2 * STORM)]


def tick_rows(faults: Faults) -> dict[str, list[tuple[float, float, int]]]:
    """Each run's executions of its step: ``(tick, started, pid)``, oldest first."""
    found: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for r in faults.ledger("tick"):
        found[r.key.rsplit(":", 1)[0]].append((float(r.extra[0]), r.time, r.pid))
    return {run: sorted(rows, key=lambda x: x[1]) for run, rows in found.items()}


def run_id_of(tick: float) -> str:
    return f"{NAME}@{datetime.fromtimestamp(tick, UTC):%Y-%m-%dT%H:%M:%SZ}"


def test_a_schedule_starts_one_run_per_tick_through_a_kill_storm(faults: Faults) -> None:
    seed = int(os.environ.get("WF_FAULT_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    faults.workers.module = "tests.faults.schedule_flows"
    for _ in range(WORKERS):
        faults.workers.start()
    faults.wait(lambda: bool(faults.ledger("tick")), "the schedule's first tick to run")

    storm_start = time.time()
    # Each kill lands in the first FIRING seconds of a tick's second, while the tick is being
    # claimed, enqueued and run, rather than in the idle rest of it.
    kill_at = [
        math.floor(storm_start + KILL_EVERY / 2 + k * KILL_EVERY) + rng.uniform(0, FIRING)
        for k in range(int((STORM - KILL_EVERY / 2) // KILL_EVERY) + 1)
    ]
    kills: list[float] = []  # when each killed worker was dead (unix time)
    while time.time() < storm_start + STORM:
        if kill_at and time.time() >= kill_at[0]:
            kill_at.pop(0)
            faults.workers.kill(rng.choice(faults.workers.alive()))  # returns once it is reaped
            kills.append(time.time())
            faults.workers.spawn()
        time.sleep(0.001 if kill_at and kill_at[0] - time.time() < 0.02 else 0.01)  # the storm's clock
    storm_end = time.time()

    info, rows, per_tick, missing = settle(faults)
    first, last = min(per_tick), max(per_tick)
    late = [executions[0][1] - executions[0][0] for executions in rows.values()]
    after_kill = [
        executions[0][1] - executions[0][0]
        for executions in rows.values()
        if any(-1 < executions[0][0] - k < 2 * LEASE + 1 for k in kills)  # the tick a kill cut, and the next
    ]
    report(
        f"issue 17 schedule under a kill storm [{faults.kind}]",
        seed=seed,
        storm_s=STORM,
        workers=WORKERS,
        kills=len(kills),
        ticks=len(per_tick),
        first_tick_before_storm_s=round(storm_start - first, 3),
        last_tick_after_storm_s=round(last - storm_end, 3),
        missing_ticks=len(missing),
        runs_per_tick=dict(Counter(per_tick.values())),
        step_executions=sum(len(e) for e in rows.values()),
        re_executions=sum(len(e) - 1 for e in rows.values()),
        lateness_p50_p99_max=[pct(late, 50), pct(late, 99), pct(late, 100)],
        lateness_max_of_ticks_around_a_kill=pct(after_kill, 100),
        kills_after_their_tick_ms=[round((k - math.floor(k)) * 1000) for k in kills],
        ticks_over_1s_late=sum(1 for x in late if x > 1),
        schedule_fired=info.fired,
        schedule_skipped=info.skipped,
    )
    assert len(kills) >= int(STORM // KILL_EVERY), f"only {len(kills)} kills"
    assert not missing, f"ticks with no run while workers were alive: {missing[:10]} (seed {seed})"
    assert first <= storm_start and last >= storm_end - 3, "the schedule fired throughout the storm"


# This test found that a tick claimed by a worker that died before firing it was skipped as missed
# (the claim outlived the grace after which a tick counts as missed): a tick up to the end of a
# claim is owed now, and fired once the claim runs out.
@pytest.mark.parametrize("point", ["after-claim_tick", "before-advance_schedule"])
def test_a_worker_killed_while_firing_a_tick_leaves_it_to_the_others(faults: Faults, point: str) -> None:
    faults.workers.module = "tests.faults.schedule_flows"
    for _ in range(WORKERS):
        faults.workers.start()
    faults.wait(lambda: bool(faults.ledger("tick")), "the schedule's first tick to run")
    tick = int(time.time()) + 3  # far enough ahead to be armed before any worker claims it
    faults.arm(point, str(tick * 1000))
    pid = faults.wait_reached(point, str(tick * 1000))
    faults.kill_pid(pid)
    killed = time.time()
    faults.workers.spawn()
    run_id = run_id_of(tick)
    # Well beyond the scheduler's claim on a tick (3 s), after which the others fire it.
    faults.wait(
        lambda: faults.status(run_id) == "completed", f"tick {run_id} to run without the killed worker", timeout=20
    )
    faults.wait(lambda: any(float(r.extra[0]) >= tick + 3 for r in faults.ledger("tick")), "three ticks more")

    info, rows, per_tick, missing = settle(faults)
    report(
        f"issue 17 schedule, a worker killed at {point} [{faults.kind}]",
        ticks=len(per_tick),
        missing_ticks=len(missing),
        runs_per_tick=dict(Counter(per_tick.values())),
        killed_tick_started_after_s=round(rows[run_id][0][1] - tick, 3),
        killed_tick_executions=len(rows[run_id]),
        killed_after_tick_s=round(killed - tick, 3),
        schedule_fired=info.fired,
        schedule_skipped=info.skipped,
    )
    assert len(rows[run_id]) == 1, f"the killed worker's tick executed {len(rows[run_id])} times"
    assert not missing, f"ticks with no run while workers were alive: {missing[:10]}"


def settle(
    faults: Faults,
) -> tuple[ScheduleInfo, dict[str, list[tuple[float, float, int]]], Counter[float], list[int]]:
    """Pause the schedule, stop the workers, let one fresh worker finish their runs; check the runs.

    Returns the schedule's info, each run's step executions (`tick_rows`), the runs per tick, and
    the seconds from the first tick to the last that have no run."""
    faults.call(lambda: pause_schedule_async(NAME, settings=faults.settings))
    # No worker fires after this, whether or not it saw the pause: the runs fired so far are all.
    faults.workers.stop_all()
    faults.workers.start()  # finishes what the stopped ones left; paused, it fires nothing
    faults.wait(
        lambda: all(faults.status(r) == "completed" for r in faults.all_runs()),
        "every tick's run to complete",
        timeout=DEADLINE + 5 * LEASE,
    )
    schedules: list[ScheduleInfo] = faults.call(lambda: list_schedules_async(settings=faults.settings))
    info = next(s for s in schedules if s.name == NAME)
    assert info.paused
    rows = tick_rows(faults)
    ticks = {run: executions[0][0] for run, executions in rows.items()}
    per_tick = Counter(ticks.values())
    runs = faults.all_runs()
    odd = {r: faults.status(r) for r in set(runs) ^ set(rows)}
    assert not odd, f"every run under the prefix is a tick's, and ran: {odd}"
    assert all(run == run_id_of(tick) for run, tick in ticks.items()), "run IDs derive from schedule and tick"
    assert all(t == int(t) for t in per_tick), "ticks are whole seconds"
    assert per_tick and max(per_tick.values()) == 1, f"a tick started more than one run: {per_tick.most_common(3)}"
    faults.check(ticks, effectful=[])
    missing = [t for t in range(int(min(per_tick)), int(max(per_tick)) + 1) if t not in per_tick]
    return info, rows, per_tick, missing
