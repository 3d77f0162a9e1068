"""R-24: a herd of runs all sleeping until the same instant.

Every run of `more_flows.herd` sleeps until one moment (`sleep_until`, so every timer has the
same score), then runs a step. All of them are paused (their timers in the timer set) before
that instant. When it comes, the workers' timer loops move the due timers to the queue with
MOVE_DUE, at most 100 per call (`RedisStore.move_due`'s limit, the script's ``ZRANGEBYSCORE
... LIMIT``): each call is one short script, never a BUSY server, so the server's worst
command stays short however large the herd. The workers instrumented with
``WF_FAULT_COUNT_MOVES=1`` write a ledger row per call that moved timers.

Each timer must fire once (one execution of the step after it). Figures: when the last timer
reached the queue, lateness p50/p99/max from the instant to the resume (mostly the workers
working through the herd), MOVE_DUE batches, and the server's worst command latency
(``LATENCY LATEST`` with a 1 ms threshold, and the slowest command in ``SLOWLOG``, and the
slowest MOVE_DUE there), which must stay under `WORST_COMMAND_MS`.

Sizes: ``WF_FAULT_HERD`` runs (2,000 in CI, about 25 s per server); issue 17 asks for
10,000: ``WF_FAULT_HERD=10000`` (about 2.5 minutes per server on 2 cores).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest

from werkfluss._events import RunPaused, RunResumed
from werkfluss._store import SCRIPTS

from . import more_flows
from .harness import DEADLINE, pct, report

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .harness import Faults

RUNS = int(os.environ.get("WF_FAULT_HERD", "2000"))  # RELIABILITY.md and issue 17: 10,000
# Seconds from enqueueing to the instant: every run must be paused by then (checked below).
LEAD = float(os.environ.get("WF_FAULT_HERD_LEAD", str(4 + RUNS / 200)))  # 10,000 paused in 31 s here
WORKERS = 2
MOVE_LIMIT = 100  # the most a worker's MOVE_DUE call may move
# "Redis max latency stays low": no command may hold the server this long. A batch of 100
# takes about a millisecond; the margin is for a loaded 2-core machine, not for a bigger batch.
WORST_COMMAND_MS = 250
COMMAND_EVENTS = ("command", "fast-command")  # LATENCY LATEST's events for commands (not fsync, fork)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120 + LEAD + RUNS / 20)]
SCRIPTS_BY_SHA = {script.sha: script.name for script in SCRIPTS}  # the names EVALSHA calls go by


@pytest.fixture
def monitored(faults: Faults) -> Iterator[Faults]:
    """The server records every command over 1 ms (slowlog, latency monitor); restored after."""
    names = ("slowlog-log-slower-than", "slowlog-max-len", "latency-monitor-threshold")
    before: dict[str, str] = {name: str(faults.client.config_get(name)[name]) for name in names}
    faults.client.config_set("slowlog-log-slower-than", 1000)
    faults.client.config_set("slowlog-max-len", 4096)
    faults.client.config_set("latency-monitor-threshold", 1)
    yield faults
    for name, value in before.items():
        faults.client.config_set(name, value)


def words(entry: dict[str, Any]) -> list[str]:
    """A slowlog entry's command and first argument, a script named rather than its SHA."""
    command = entry.get("command", b"")
    found = [w.decode(errors="replace") for w in (command.split()[:2] if isinstance(command, bytes) else [])]
    if found[:1] == ["EVALSHA"] and len(found) > 1:
        found[1] = SCRIPTS_BY_SHA.get(found[1], found[1])
    return found


def slowest(faults: Faults) -> tuple[float, list[str], float]:
    """The slowest command the slowlog kept (ms) and its first arguments; the slowest MOVE_DUE (ms, 0 if
    none took over the 1 ms threshold)."""
    entries = faults.client.slowlog_get(4096)
    if not entries:
        return 0.0, [], 0.0
    worst = max(entries, key=lambda e: e["duration"])
    moves = [e["duration"] for e in entries if words(e) == ["EVALSHA", "MOVE_DUE"]]
    return worst["duration"] / 1000, words(worst), max(moves, default=0) / 1000


def test_r24_a_herd_of_timers_due_at_one_instant_fires_each_once(monitored: Faults) -> None:
    faults = monitored
    faults.workers.module = "tests.faults.more_flows"
    faults.workers.concurrency = 100
    for _ in range(WORKERS):
        faults.workers.start(env={"WF_FAULT_COUNT_MOVES": "1"})
    enqueued = time.time()
    at = enqueued + LEAD
    calls = {f"herd-{i}": (i, at) for i in range(RUNS)}
    faults.enqueue(more_flows.herd, calls.items())
    timers = f"{faults.prefix}{{q}}:timers"
    faults.wait(lambda: faults.client.zcard(timers) >= RUNS, f"all {RUNS} runs to pause", timeout=2 * LEAD)
    all_paused = time.time()
    assert all_paused < at, f"the runs paused only {all_paused - at:.1f} s after the instant: raise WF_FAULT_HERD_LEAD"
    scores = {score for _, score in faults.client.zrange(timers, 0, -1, withscores=True)}
    faults.client.slowlog_reset()
    faults.client.execute_command("LATENCY", "RESET")
    faults.wait_status(calls, timeout=DEADLINE + RUNS / 100)
    done = time.time()
    # The worst since the reset: LATENCY LATEST gives [event, when, latest ms, max ms].
    latency = {str(e[0], "utf-8", "replace"): int(e[3]) for e in faults.client.execute_command("LATENCY", "LATEST")}
    worst_ms, worst_command, worst_move_ms = slowest(faults)

    executions = Counter(r.key for r in faults.ledger("exec"))
    fires = Counter(executions[f"{r}:2"] for r in calls)  # seq 2: the step after the sleep
    late: list[float] = []
    resumes: Counter[int] = Counter()
    paused_before = 0
    for run_id in calls:
        events = [e for _, e in faults.events(run_id)]
        paused_before += any(isinstance(e, RunPaused) and e.time < at for e in events)
        resumed = [e.time for e in events if isinstance(e, RunResumed)]
        resumes[len(resumed)] += 1
        late.append(resumed[-1] - at)
    moved = faults.ledger("moved")
    moves = [int(r.key) for r in moved]
    limits = {int(r.extra[0]) for r in moved}
    worst_command_event_ms = max((latency.get(event, 0) for event in COMMAND_EVENTS), default=0)
    busy = sum(faults.workers.log(p).count("BUSY") for p in faults.workers.procs)
    report(
        f"R-24 timer herd [{faults.kind}]",
        runs=RUNS,
        workers=WORKERS,
        paused_before_the_instant=paused_before,
        enqueue_to_all_paused_s=round(all_paused - enqueued, 3),
        timer_scores=len(scores),
        fires_per_timer=dict(fires),
        lateness_p50_p99_max=[pct(late, 50), pct(late, 99), pct(late, 100)],
        early_fires=sum(1 for x in late if x < 0),
        resumes_per_run=dict(resumes),
        # The timers' own lateness: when the MOVE_DUE calls put the first and the last on the queue.
        first_and_last_moved_after_s=[
            round(min(r.time for r in moved) - at, 3),
            round(max(r.time for r in moved) - at, 3),
        ]
        if moved
        else None,
        move_due_calls=len(moves),
        move_due_largest_batch=max(moves, default=0),
        move_due_limit=sorted(limits),
        timers_moved=sum(moves),
        extra_wake_ups_moved=sum(moves) - RUNS,
        busy_replies=busy,
        redis_latency_latest_ms=latency,
        slowlog_worst_ms=worst_ms,
        slowlog_worst_command=worst_command,
        slowlog_worst_move_due_ms=worst_move_ms,
        herd_drain_s=round(done - at, 3),
    )
    assert paused_before == RUNS, "every run was parked on its timer before the instant"
    assert len(scores) == 1, f"the timers are due at one instant: {len(scores)} scores"
    assert fires == {1: RUNS}, f"the step after each timer executed once: {fires}"
    assert min(late) >= 0, "a timer fired before the instant"
    # More than RUNS when some run got a later wake-up too (a worker found it busy elsewhere and
    # set one): that is a retry, not a second firing, which the executions above rule out.
    assert sum(moves) >= RUNS, "MOVE_DUE moved every timer"
    assert max(moves) <= min(limits) <= MOVE_LIMIT, "in bounded batches"
    assert busy == 0
    assert worst_command_event_ms < WORST_COMMAND_MS, f"a command held the server: LATENCY LATEST {latency}"
    assert worst_ms < WORST_COMMAND_MS, f"a command held the server {worst_ms} ms: {worst_command}"
    figures = faults.check({r: args[0] for r, args in calls.items()}, effectful=[])
    assert figures["duplicate_completions"] == 0
