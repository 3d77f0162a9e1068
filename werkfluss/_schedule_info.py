"""The schedules seen and steered from outside: `list_schedules`, `pause_schedule`, `resume_schedule`,
`trigger_schedule` (each sync and async), and their typed answer, `ScheduleInfo`.

They work from any process, one that never imported the module declaring a
schedule included (the command line): they read and write the schedule's
state on the server, which the workers declared there. A trigger is a
request the next worker to look (within a couple of seconds) fires.
"""

from __future__ import annotations

import json
from datetime import datetime  # noqa: TC003 - msgspec resolves ScheduleInfo's annotations at run time
from typing import TYPE_CHECKING, Any

import msgspec

from ._errors import ConfigurationError
from ._options import Settings
from ._schedules import describe_declaration, tick_time, timing_of, trigger_run_id
from ._store._open import open_store
from ._sync import blocking

if TYPE_CHECKING:
    from ._store import RedisStore

__all__ = [
    "ScheduleInfo",
    "list_schedules",
    "list_schedules_async",
    "pause_schedule",
    "pause_schedule_async",
    "resume_schedule",
    "resume_schedule_async",
    "schedule_info_async",
    "trigger_schedule",
    "trigger_schedule_async",
]

SERVED_WITHIN = 60.0  # seconds: a schedule no worker renewed for longer is not served (removed from the code)


class ScheduleInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule as the server knows it: its declaration in force, whether workers serve it, its runs.

    Attributes:
        name: The schedule's name.
        workflow: The ID of the workflow it starts.
        queue: The queue its runs go to.
        cron: Its cron expression (None for an interval).
        every: Its interval in seconds (None for a cron expression).
        timezone: The timezone its cron expression is read in.
        catch_up: ``skip``, ``latest`` or ``all``: what missed ticks do.
        max_catch_up: The bound of ``all`` and of ``overlap="queue"``.
        overlap: ``skip``, ``queue`` or ``allow``: a tick while the last run runs.
        jitter: The most seconds a run starts after its tick.
        declared: The declaration as code spells it.
        served: Whether a worker renewed it in the last minute (a schedule
            removed from the code stops being served, and fires no more).
        paused: Whether it is paused (its ticks are skipped until resumed).
        next_tick: Its next tick (UTC), None while paused or not served.
        last_tick: The last tick handled, fired or skipped (UTC).
        last_run: The run ID of the last run it started (a tick's or a trigger's).
        last_status: That run's status (``""`` if it is not there yet).
        fired: Runs started (ticks and triggers).
        skipped: Ticks skipped: missed while no worker ran, or overlapping a run.
        triggers_waiting: Trigger requests no worker has fired yet.
    """

    name: str
    workflow: str
    queue: str
    cron: str | None
    every: float | None
    timezone: str
    catch_up: str
    max_catch_up: int
    overlap: str
    jitter: float
    declared: str
    served: bool
    paused: bool
    next_tick: datetime | None
    last_tick: datetime | None
    last_run: str | None
    last_status: str
    fired: int
    skipped: int
    triggers_waiting: int


async def _info(store: RedisStore, name: str) -> ScheduleInfo | None:
    state = await store.schedule_state(name)
    if not state.declared:
        return None
    try:
        declared: dict[str, Any] = json.loads(state.declared)
    except ValueError:
        declared = {}
    served = store.server_now() - state.seen / 1000 < SERVED_WITHIN
    timing = timing_of(declared)
    next_tick = None
    if served and not state.paused and timing is not None:
        upcoming = timing.after(max(state.last, int(store.now() * 1000)))
        next_tick = tick_time(upcoming) if upcoming is not None else None
    every = declared.get("every")
    return ScheduleInfo(
        name=name,
        workflow=str(declared.get("workflow", "")),
        queue=str(declared.get("queue", "default")),
        cron=declared.get("cron"),
        every=float(every) if isinstance(every, (int, float)) else None,
        timezone=str(declared.get("timezone", "UTC")),
        catch_up=str(declared.get("catch_up", "skip")),
        max_catch_up=int(declared.get("max_catch_up", 100)),
        overlap=str(declared.get("overlap", "skip")),
        jitter=float(declared.get("jitter") or 0.0),
        declared=describe_declaration(declared),
        served=served,
        paused=bool(state.paused),
        next_tick=next_tick,
        last_tick=tick_time(state.last) if state.last else None,
        last_run=state.last_run or None,
        last_status=await store.status(state.last_run) if state.last_run else "",
        fired=state.fired,
        skipped=state.skipped,
        triggers_waiting=len(state.triggers),
    )


async def _unknown(store: RedisStore, name: object) -> ConfigurationError:
    known = ", ".join(await store.schedule_names()) or "none"
    return ConfigurationError(
        f"there is no schedule {name!r}: no worker has declared one of that name on this server; "
        f"known schedules: {known}"
    )


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"a schedule's name is a non-empty string, got {name!r}")
    return name


async def list_schedules_async(*, settings: Settings | None = None) -> list[ScheduleInfo]:
    """Every schedule a worker has declared on the server, by name.

    Raises:
        StorageError: Redis/Valkey is unreachable.
    """
    store = await open_store(settings or Settings.from_env())
    found = [await _info(store, name) for name in await store.schedule_names()]
    return [info for info in found if info is not None]


def list_schedules(*, settings: Settings | None = None) -> list[ScheduleInfo]:
    """Blocking twin of `list_schedules_async`."""
    return blocking("list_schedules", lambda: list_schedules_async(settings=settings))


async def schedule_info_async(name: str, *, settings: Settings | None = None) -> ScheduleInfo:
    """Schedule `name` (for ``werkfluss schedules show``).

    Raises:
        ConfigurationError: no worker has declared a schedule `name`, naming those there are.
    """
    _check_name(name)
    store = await open_store(settings or Settings.from_env())
    info = await _info(store, name)
    if info is None:
        raise await _unknown(store, name)
    return info


async def _pause(name: str, paused: bool, settings: Settings | None) -> None:
    _check_name(name)
    store = await open_store(settings or Settings.from_env())
    if not await store.pause_schedule(name, paused):
        raise await _unknown(store, name)


async def pause_schedule_async(name: str, *, settings: Settings | None = None) -> None:
    """Pause schedule `name`, from any process: its ticks are skipped until it is resumed.

    A run already started goes on; triggers still fire. Pausing a paused schedule does nothing.

    Raises:
        ConfigurationError: no worker has declared a schedule `name`.
    """
    await _pause(name, True, settings)


def pause_schedule(name: str, *, settings: Settings | None = None) -> None:
    """Blocking twin of `pause_schedule_async`."""
    blocking("pause_schedule", lambda: pause_schedule_async(name, settings=settings))


async def resume_schedule_async(name: str, *, settings: Settings | None = None) -> None:
    """Resume schedule `name`: it fires from its next tick on (the ticks of the pause are not caught up).

    Raises:
        ConfigurationError: no worker has declared a schedule `name`.
    """
    await _pause(name, False, settings)


def resume_schedule(name: str, *, settings: Settings | None = None) -> None:
    """Blocking twin of `resume_schedule_async`."""
    blocking("resume_schedule", lambda: resume_schedule_async(name, settings=settings))


async def trigger_schedule_async(name: str, *, settings: Settings | None = None) -> str:
    """Start a run of schedule `name` now, outside its ticks; returns the run's ID.

    The request is stored with the schedule; the next worker serving it to
    look (within about 2 s) enqueues the run, paused or not and whatever
    the overlap policy. The workflow receives the moment of the request.

    Raises:
        ConfigurationError: no worker has declared a schedule `name`.
    """
    _check_name(name)
    store = await open_store(settings or Settings.from_env())
    number, at = await store.trigger_schedule(name)
    if not number:
        raise await _unknown(store, name)
    return trigger_run_id(name, number, at)


def trigger_schedule(name: str, *, settings: Settings | None = None) -> str:
    """Blocking twin of `trigger_schedule_async`: request a run now, return its run ID."""
    return blocking("trigger_schedule", lambda: trigger_schedule_async(name, settings=settings))
