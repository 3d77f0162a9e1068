"""A worker's scheduler: fire the ticks of the schedules it serves, once each, whatever the number of workers.

One task per worker looks at each schedule it serves (declared in this
process, for a workflow it defines, on a queue it serves): it reads the
schedule's state, fires the trigger requests, then the ticks due since the
last one handled, and naps until the next tick (through `_clock.nap`, so a
test clock drives it), at most `LOOK` seconds, so that a pause, a resume or
a trigger from another process is seen soon.

Firing a tick is an enqueue of the run ``<name>@<tick>`` (idempotent by run
ID), then a script that moves the schedule's ``last`` forward. Workers
take turns by a short claim on each tick, so one of them decides it (fire,
or skip for an overlap); one that dies between the enqueue and the advance
leaves the tick to the next, whose enqueue reaches the same run. All times
are the timer clock's (`store.now()`), never this machine's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from .._clock import nap
from .._engine._submit import submit_run
from .._errors import RunConflictError, StorageError
from .._logging import log
from .._queues import DEFAULT_PRIORITY
from .._schedules import tick_time, trigger_run_id
from .._store._open import open_store
from .._values import encode_run_call

if TYPE_CHECKING:
    from .._options import Settings
    from .._schedules import Schedule
    from .._store import RedisStore

__all__ = ["CLAIM", "GRACE", "LOOK", "serve_schedules"]

GRACE = 5.0  # seconds: a tick later than this when a worker first looks was missed (no worker ran)
LOOK = 2.0  # seconds: the longest nap between looks at the schedules' state
SOON = 0.25  # seconds: the next look while a tick waits for the previous run, or for another worker's claim
CLAIM = 3.0  # seconds a worker's claim on a tick holds off the others (one that dies leaves it then)
DECLARE_EVERY = 20.0  # seconds between renewals of the declarations
_ENDED = frozenset({"", "completed", "failed", "cancelled", "blocked"})  # "" no run: its enqueue died first


async def serve_schedules(settings: Settings, holder: str, schedules: list[Schedule], stopping: anyio.Event) -> None:
    """Fire `schedules`' ticks and triggers until `stopping` is set (the worker's task group ends it)."""
    store = await open_store(settings)
    served: list[Schedule] = []
    conflicts: dict[str, str] = {}
    renewed = float("-inf")
    try:
        await _serve(store, settings, holder, schedules, stopping, served, conflicts, renewed)
    finally:
        # A graceful stop (or a crash of this task) withdraws this worker's declarations, so
        # that a deploy's new declaration takes over at its workers' next look.
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            for declared in schedules:
                try:
                    await store.withdraw_schedule(declared.name, declared.encoded())
                except StorageError:
                    break


async def _serve(
    store: RedisStore,
    settings: Settings,
    holder: str,
    schedules: list[Schedule],
    stopping: anyio.Event,
    served: list[Schedule],
    conflicts: dict[str, str],
    renewed: float,
) -> None:
    while not stopping.is_set():
        # A declaration held off by another is looked at again soon: it takes over once that one is withdrawn.
        if time.monotonic() - renewed >= (LOOK if conflicts else DECLARE_EVERY):
            renewed = time.monotonic()
            served = await _declare(store, holder, schedules, conflicts, served)
        now = store.now()
        soonest, tick = now + LOOK, False
        for declared in served:
            if stopping.is_set():
                return
            try:
                at, is_tick = await _look(store, settings, holder, declared)
            except Exception as exc:  # a worker outlives storage trouble: it looks again
                log.warning(
                    "worker %s: cannot fire schedule %s, retrying: %s",
                    holder,
                    declared.name,
                    exc,
                    exc_info=not isinstance(exc, StorageError),
                )
                at, is_tick = now + 1.0, False
            if at < soonest:
                soonest, tick = at, is_tick
        wait = soonest - store.now()
        if wait > 0:
            await nap(store.prefix, min(wait, LOOK), due=soonest if tick else None)


async def _declare(
    store: RedisStore, holder: str, schedules: list[Schedule], conflicts: dict[str, str], served: list[Schedule]
) -> list[Schedule]:
    """Renew each schedule's declaration; those another process declares differently (renewed in the last
    minute) are left to it, and reported once."""
    now_served = []
    for declared in schedules:
        try:
            other = await store.declare_schedule(declared.name, declared.encoded())
        except StorageError as exc:
            log.warning("worker %s: cannot renew schedule %s: %s", holder, declared.name, exc)
            if declared in served:
                now_served.append(declared)
            continue
        if other is None:
            if conflicts.pop(declared.name, None) is not None:
                log.info("worker %s: schedule %s as declared here is in force now", holder, declared.name)
            now_served.append(declared)
        elif conflicts.get(declared.name) is None:
            conflicts[declared.name] = other
            log.error(
                "schedule %r is declared as %s here, but another process declared it as %s: that one stays in "
                "force while a process keeps declaring it; this one takes over 60 s after the last one stopped",
                declared.name,
                declared.describe(),
                other,
            )
    return now_served


async def _look(store: RedisStore, settings: Settings, holder: str, declared: Schedule) -> tuple[float, bool]:
    """Fire what schedule `declared` has due; returns when to look again (timer clock), and whether that
    is a tick (else a poll)."""
    name = declared.name
    state = await store.schedule_state(name)
    now = store.now()
    now_ms = int(now * 1000)
    for number, at in state.triggers:  # explicit requests: they fire paused or not, whatever runs
        run_id = trigger_run_id(name, number, at)
        await _fire(store, settings, declared, run_id, at, 0.0)
        await store.triggered(name, number, run_id, at)
        log.info("worker %s: schedule %s triggered: run %s", holder, name, run_id)
    if state.paused:
        return now + LOOK, False
    last = state.last or now_ms
    ticks, older = declared.timing.ticks(last, now_ms, declared.max_catch_up + 1)
    if not ticks:
        upcoming = declared.timing.after(max(last, now_ms))
        return (upcoming / 1000, True) if upcoming is not None else (now + LOOK, False)
    edge = now_ms - int(GRACE * 1000)
    # A tick up to the end of a claim was reached by a live worker (the claimer, which may have died
    # before firing it; the claim held the others off): it is owed, not missed. The claim runs on the
    # server's clock, the ticks on the timer clock.
    blocked = state.claim_until + int((now - store.server_now()) * 1000) if state.claim_until else 0
    owed = [t for t in ticks if t <= blocked]
    if owed:  # fired first, on their own: the policies below apply to the rest at the next look
        ticks = owed
    held = state.held if declared.overlap == "queue" else 0
    late = [t for t in ticks if t < edge and t > blocked and not (held and t >= held)]
    keep = {"skip": 0, "latest": 1, "all": declared.max_catch_up}[declared.catch_up]
    caught = late[len(late) - keep :] if keep else []
    skipped = late[: len(late) - len(caught)]
    due = caught + ticks[len(late) :]
    if len(due) > declared.max_catch_up:  # waiting for the previous run: at most max_catch_up ticks wait
        skipped, due = skipped + due[: -declared.max_catch_up], due[-declared.max_catch_up :]
    count = len(skipped) + older  # `older`: passed over, older than every tick the policies look at
    if count:
        await store.advance_schedule(name, max(skipped) if skipped else ticks[0] - 1, "skipped", count=count)
        log.info(
            "worker %s: schedule %s skipped %d missed tick%s (catch_up=%s, max_catch_up=%d)",
            holder,
            name,
            count,
            "" if count == 1 else "s",
            declared.catch_up,
            declared.max_catch_up,
        )
    previous = state.last_run
    for tick in due:
        claim = await store.claim_tick(name, tick, holder, CLAIM)
        if claim == "done":
            continue
        if claim == "busy":
            return now + SOON, False
        if declared.overlap != "allow" and previous and await store.status(previous) not in _ENDED:
            if declared.overlap == "skip":
                await store.advance_schedule(name, tick, "skipped")
                log.info("worker %s: schedule %s skipped a tick: run %s has not ended", holder, name, previous)
                continue
            await store.advance_schedule(name, tick, "held")
            return now + SOON, False
        run_id = declared.run_id(tick)
        await _fire(store, settings, declared, run_id, tick, declared.jitter_delay(run_id))
        await store.advance_schedule(name, tick, "fired", run_id=run_id, unhold=tick == due[-1])
        previous = run_id
    upcoming = declared.timing.after(now_ms)
    return (upcoming / 1000, True) if upcoming is not None else (now + LOOK, False)


async def _fire(
    store: RedisStore, settings: Settings, declared: Schedule, run_id: str, tick: int, delay: float
) -> None:
    """Enqueue run `run_id` of the schedule's workflow for the tick at `tick` (ms), as `enqueue` would."""
    workflow = declared.workflow
    queue = workflow.queue
    args_raw, canonical = encode_run_call(workflow.id, (tick_time(tick),), {}, limit=settings.max_payload)
    await store.ensure_queue(queue)
    meta = f"{DEFAULT_PRIORITY}|1|" if queue.limited else ""
    try:
        await submit_run(
            store,
            workflow.id,
            run_id,
            args_raw,
            canonical,
            tag=queue.tag_for(None, run_id),
            meta=meta,
            delay=delay,
            deadline=workflow.deadline,  # the workflow's own: a tick's run has no options
        )
    except RunConflictError as exc:  # another workflow's run holds the ID: the tick cannot be fired
        log.error("schedule %s cannot fire its tick: %s", declared.name, exc)
