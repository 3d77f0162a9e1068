"""`Schedule` and `schedule`: cron and interval schedules declared in code, their registry, and their ticks.

A schedule starts one run of its workflow per tick, with a run ID derived
from the schedule's name and the tick (`Schedule.run_id`), so that any
number of workers firing the same tick reach the same run. The workflow
receives the tick (an aware UTC `datetime`: the nominal time, not the
moment it fired). The workers serve the schedules (`_worker._scheduler`),
keeping their state in the store (`_store._schedules`).

Cron expressions are parsed and evaluated by cronsim: 5 fields, or 6 with
seconds first, in a timezone, with Debian cron's rules for daylight saving
time (a job at a time that does not exist that day runs once at the first
valid moment after it; at a time that happens twice, once, at the first).
An interval (``every="15m"``) ticks at the multiples of its length since the
Unix epoch, so every worker computes the same ticks.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ._errors import ConfigurationError
from ._ids import check_run_id, registered_workflow
from ._options import parse_duration

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._queues import Queue

__all__ = [
    "CatchUp",
    "Overlap",
    "Schedulable",
    "Schedule",
    "Timing",
    "declared_schedules",
    "describe_declaration",
    "schedule",
    "spell_seconds",
    "tick_time",
    "timing_of",
    "trigger_run_id",
]

CatchUp = Literal["skip", "latest", "all"]
"""What a worker does with ticks missed while no worker ran: fire none, the latest, or all (up to a bound)."""
Overlap = Literal["skip", "queue", "allow"]
"""What a tick does while the schedule's previous run has not ended: skip, wait for it, or fire anyway."""

_CATCH_UPS: tuple[str, ...] = get_args(CatchUp)
_OVERLAPS: tuple[str, ...] = get_args(Overlap)
_MAX_NAME = 160  # characters: the run ID adds '@' and the tick (21), within the run ID's 200
_MAX_CATCH_UP = 10_000
COUNT_BOUND = 10_000  # missed cron ticks counted beyond the newest few (the count is a floor past it)


class Schedulable(Protocol):
    """What a schedule needs of its workflow (a `Workflow`): its ID, its body, its queue, its deadline."""

    @property
    def id(self) -> str:
        """The workflow's ID."""
        ...

    @property
    def fn(self) -> Callable[..., Any]:
        """The workflow's body."""
        ...

    @property
    def queue(self) -> Queue:
        """The queue its runs go to."""
        ...

    @property
    def deadline(self) -> float | None:
        """Seconds each run has to finish, or None."""
        ...


W = TypeVar("W", bound=Schedulable)


def _zone(timezone: object, what: str) -> tzinfo:
    if not isinstance(timezone, str) or not timezone:
        raise ConfigurationError(f"{what}: timezone must be an IANA name like 'Europe/Berlin', got {timezone!r}")
    if timezone == "UTC":
        return UTC  # cronsim applies no daylight-saving rules to this one
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"{what}: unknown timezone {timezone!r}: use an IANA name like 'Europe/Berlin' or 'UTC'"
        ) from None


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def tick_time(ms: int) -> datetime:
    """A tick (Unix ms) as the aware UTC `datetime` the workflow receives."""
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass(frozen=True, slots=True)
class Timing:
    """When a schedule ticks: a cron expression in a timezone, or every `every` seconds since the epoch.

    Ticks are Unix times in milliseconds (whole seconds).
    """

    cron: str | None
    every: int | None
    timezone: str = "UTC"
    _zone: tzinfo = field(init=False, repr=False, compare=False, default=UTC)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", _zone(self.timezone, "schedule"))

    def after(self, ms: int) -> int | None:
        """The first tick strictly after `ms` (None: a cron expression that never matches again)."""
        if self.every is not None:
            size = self.every * 1000
            return (ms // size + 1) * size
        assert self.cron is not None
        try:
            return _ms(next(CronSim(self.cron, datetime.fromtimestamp(ms / 1000, self._zone))))
        except StopIteration:
            return None

    def ticks(self, after: int, upto: int, limit: int) -> tuple[list[int], int]:
        """The ticks in ``(after, upto]``: the newest `limit` of them, oldest first, and how many older
        ones were left out (for a cron expression, counted up to `COUNT_BOUND`). Bounded work whatever
        the gap: a cron expression is walked backwards from `upto`."""
        if upto <= after or limit < 1:
            return [], 0
        if self.every is not None:
            size = self.every * 1000
            first, last = after // size + 1, upto // size
            if last < first:
                return [], 0
            start = max(first, last - limit + 1)
            return [k * size for k in range(start, last + 1)], start - first
        assert self.cron is not None
        found: list[int] = []
        older = 0
        # One millisecond past `upto`: cronsim then takes `upto` itself as the first candidate.
        walk = CronSim(self.cron, datetime.fromtimestamp((upto + 1) / 1000, self._zone), reverse=True)
        for moment in walk:
            if _ms(moment) <= after or older >= COUNT_BOUND:
                break
            if len(found) < limit:
                found.append(_ms(moment))
            else:
                older += 1
        return found[::-1], older


def _check_cron(cron: object, zone: tzinfo, what: str) -> str:
    if not isinstance(cron, str):
        raise ConfigurationError(f"{what}: the cron expression must be a string like '0 9 * * MON-FRI', got {cron!r}")
    try:
        walk = CronSim(cron, datetime.now(zone))
        next(walk)
    except CronSimError as exc:
        raise ConfigurationError(
            f"{what}: invalid cron expression {cron!r}: {exc} (5 fields 'minute hour day month weekday', "
            f"or 6 with seconds first)"
        ) from None
    except StopIteration:
        raise ConfigurationError(f"{what}: cron expression {cron!r} never matches") from None
    return cron


def _is_workflow(candidate: object) -> bool:
    ident = getattr(candidate, "id", None)
    held = registered_workflow(ident) if isinstance(ident, str) else None
    return held is not None and getattr(held, "fn", None) is getattr(candidate, "fn", None)


def _takes_the_tick(fn: Callable[..., Any]) -> bool:
    try:
        inspect.signature(fn).bind(datetime.now(UTC))
    except TypeError:
        return False
    except ValueError:  # no signature to inspect: let the call tell
        return True
    return True


@dataclass(frozen=True, slots=True, eq=False)
class Schedule:
    """A cron or interval schedule: one run of `workflow` per tick, served by the workers.

    Declare it at import time, in a module the workers import (``werkfluss
    worker MODULE``); each worker that defines the workflow and serves its
    queue serves the schedule. Each tick starts exactly one run, whatever the
    number of workers: its run ID is ``<name>@<tick, UTC, ISO 8601>``
    (``nightly-sync@2026-03-29T01:00:00Z``). The workflow is called with the
    tick, an aware UTC `datetime` (the nominal time, not the moment it fired).

    Args:
        name: The schedule's name (1 to 160 characters, no whitespace or braces).
        workflow: The workflow it starts (it must take the tick as its one
            positional argument).
        cron: A cron expression: 5 fields (minute hour day month weekday), or
            6 with seconds first (``"*/10 * * * * *"``), in `timezone`.
        every: Or an interval of whole seconds, at least 1 s (``"15m"``, 900,
            a `timedelta`), ticking at its multiples since the Unix epoch (UTC).
        timezone: The IANA timezone the cron expression is read in (default
            ``"UTC"``); daylight saving follows Debian cron's rules.
        catch_up: Ticks missed while no worker ran (more than 5 s late when a
            worker looks): ``"skip"`` (default) fires none, ``"latest"`` the most
            recent, ``"all"`` each, oldest first, up to `max_catch_up`.
        max_catch_up: The bound of ``catch_up="all"`` and of ``overlap="queue"``.
        overlap: A tick while the previous run has not ended: ``"skip"``
            (default) skips it, ``"queue"`` fires it once the previous run ends
            (up to `max_catch_up` ticks wait), ``"allow"`` fires it anyway.
        jitter: Start each tick's run a random delay later, less than this
            (seconds, ``"30s"``, a `timedelta`); the same delay on every worker
            (it derives from the run ID).

    Raises:
        ConfigurationError: naming the schedule and the value at fault.
    """

    name: str
    workflow: Schedulable
    cron: str | None = None
    every: float | timedelta | str | None = None
    timezone: str = "UTC"
    catch_up: CatchUp = "skip"
    max_catch_up: int = 100
    overlap: Overlap = "skip"
    jitter: float | timedelta | str | None = None
    timing: Timing = field(init=False, repr=False)
    jitter_seconds: float = field(init=False, repr=False, default=0.0)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or len(self.name) > _MAX_NAME:
            raise ConfigurationError(
                f"invalid schedule name {self.name!r}: use 1 to {_MAX_NAME} characters without whitespace or braces"
            )
        try:
            check_run_id(self.name)
        except ConfigurationError:
            raise ConfigurationError(
                f"invalid schedule name {self.name!r}: use 1 to {_MAX_NAME} characters without whitespace or braces"
            ) from None
        what = f"schedule {self.name!r}"
        if not _is_workflow(self.workflow):
            raise ConfigurationError(f"{what}: {self.workflow!r} is not a workflow; decorate it with @workflow")
        if not _takes_the_tick(self.workflow.fn):
            raise ConfigurationError(
                f"{what}: workflow {self.workflow.id!r} cannot be called with the tick time as its one positional "
                f"argument; give it one parameter, like 'async def {getattr(self.workflow.fn, '__name__', 'f')}"
                f"(at: datetime)'"
            )
        if (self.cron is None) == (self.every is None):
            raise ConfigurationError(f"{what}: give either a cron expression or every=, not both and not neither")
        zone = _zone(self.timezone, what)
        every: int | None = None
        if self.cron is not None:
            _check_cron(self.cron, zone, what)
        else:
            assert self.every is not None
            seconds = parse_duration(self.every, what=f"every of {what}")
            if seconds < 1 or seconds != int(seconds):
                raise ConfigurationError(
                    f"{what}: every must be a whole number of seconds, at least 1 s, got {self.every!r}"
                )
            if self.timezone != "UTC":
                raise ConfigurationError(
                    f"{what}: an interval ticks on the Unix epoch (UTC); timezone={self.timezone!r} applies to cron "
                    f"expressions only (for wall-clock times, use one)"
                )
            every = int(seconds)
        if self.catch_up not in _CATCH_UPS:
            raise ConfigurationError(f"{what}: catch_up must be one of {', '.join(_CATCH_UPS)}, got {self.catch_up!r}")
        if self.overlap not in _OVERLAPS:
            raise ConfigurationError(f"{what}: overlap must be one of {', '.join(_OVERLAPS)}, got {self.overlap!r}")
        bad_bound = isinstance(self.max_catch_up, bool) or not isinstance(self.max_catch_up, int)
        if bad_bound or not 1 <= self.max_catch_up <= _MAX_CATCH_UP:
            raise ConfigurationError(
                f"{what}: max_catch_up must be a whole number from 1 to {_MAX_CATCH_UP}, got {self.max_catch_up!r}"
            )
        jitter = 0.0 if self.jitter is None else parse_duration(self.jitter, what=f"jitter of {what}")
        object.__setattr__(self, "timing", Timing(self.cron, every, self.timezone))
        object.__setattr__(self, "jitter_seconds", jitter)
        _register(self)

    def run_id(self, tick: int) -> str:
        """The run ID of the tick at `tick` (Unix ms): ``<name>@2026-03-29T01:00:00Z``."""
        return f"{self.name}@{tick_time(tick):%Y-%m-%dT%H:%M:%SZ}"

    def jitter_delay(self, run_id: str) -> float:
        """Seconds the run `run_id` waits after its tick: in ``[0, jitter)``, the same in every process."""
        if not self.jitter_seconds:
            return 0.0
        fraction = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "big") / 2**64
        return fraction * self.jitter_seconds

    def declaration(self) -> dict[str, Any]:
        """What the store keeps of it, for processes that do not import its module (the CLI)."""
        return {
            "name": self.name,
            "workflow": self.workflow.id,
            "queue": self.workflow.queue.name,
            "cron": self.cron,
            "every": self.timing.every,
            "timezone": self.timezone,
            "catch_up": self.catch_up,
            "max_catch_up": self.max_catch_up,
            "overlap": self.overlap,
            "jitter": self.jitter_seconds,
        }

    def encoded(self) -> str:
        """`declaration` as the store keeps it: JSON, keys sorted (equal declarations compare equal)."""
        return json.dumps(self.declaration(), sort_keys=True, separators=(",", ":"))

    def describe(self) -> str:
        """The declaration as code would spell it (for errors and the CLI)."""
        return describe_declaration(self.declaration())

    def __repr__(self) -> str:
        return f"<werkfluss {self.describe()}>"


def describe_declaration(declared: dict[str, Any]) -> str:
    """A stored declaration (`Schedule.declaration`) as code would spell it."""
    parts = [repr(declared.get("name")), repr(declared.get("workflow"))]
    if declared.get("cron") is not None:
        parts.append(f"cron={declared['cron']!r}")
    else:
        parts.append(f"every={spell_seconds(declared.get('every'))!r}")
    if declared.get("timezone", "UTC") != "UTC":
        parts.append(f"timezone={declared['timezone']!r}")
    for key, default in (("catch_up", "skip"), ("max_catch_up", 100), ("overlap", "skip")):
        if declared.get(key, default) != default:
            parts.append(f"{key}={declared[key]!r}")
    if declared.get("jitter"):
        parts.append(f"jitter={spell_seconds(declared['jitter'])!r}")
    return f"Schedule({', '.join(parts)})"


def spell_seconds(value: object) -> str:
    """Seconds as a declaration spells them: ``15m``, ``2h``, ``1.5s``."""
    if not isinstance(value, (int, float)):
        return str(value)
    seconds = float(value)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def timing_of(declared: dict[str, Any]) -> Timing | None:
    """The timing of a stored declaration (None when it is not one this version reads)."""
    try:
        every = declared.get("every")
        return Timing(declared.get("cron"), int(every) if every is not None else None, declared.get("timezone", "UTC"))
    except (ConfigurationError, TypeError, ValueError):
        return None


def trigger_run_id(name: str, number: int, at: int) -> str:
    """The run ID of schedule `name`'s `number`-th trigger, requested at `at` (Unix ms)."""
    moment = tick_time(at)
    return f"{name}@{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z~trigger-{number}"


_SCHEDULES: dict[str, Schedule] = {}


def _register(declared: Schedule) -> None:
    """Remember a declared schedule; a second declaration of a name must say the same."""
    known = _SCHEDULES.get(declared.name)
    if known is not None and known.encoded() != declared.encoded():
        raise ConfigurationError(
            f"schedule {declared.name!r} is declared twice in this process, differently: "
            f"{known.describe()} and {declared.describe()}"
        )
    _SCHEDULES[declared.name] = declared  # the latest: a module imported again brings its workflow again


def declared_schedules() -> list[Schedule]:
    """Every schedule declared in this process, by name."""
    return [_SCHEDULES[name] for name in sorted(_SCHEDULES)]


def schedule(
    cron: str | None = None,
    *,
    every: float | timedelta | str | None = None,
    timezone: str = "UTC",
    catch_up: CatchUp = "skip",
    max_catch_up: int = 100,
    overlap: Overlap = "skip",
    jitter: float | timedelta | str | None = None,
    name: str | None = None,
) -> Callable[[W], W]:
    """Declare a `Schedule` for the workflow it decorates (above ``@workflow``); returns the workflow unchanged.

    ``@schedule("0 9 * * MON-FRI", timezone="Europe/Berlin")`` or
    ``@schedule(every="15m")``; the arguments are `Schedule`'s, and `name`
    defaults to the workflow's ID.

    Raises:
        ConfigurationError: naming the schedule and the value at fault.
    """

    def decorate(workflow: W) -> W:
        if not _is_workflow(workflow):
            raise ConfigurationError(
                f"@schedule decorates a workflow, got {workflow!r}: put @schedule(...) above @workflow"
            )
        Schedule(
            name if name is not None else workflow.id,
            workflow,
            cron,
            every=every,
            timezone=timezone,
            catch_up=catch_up,
            max_catch_up=max_catch_up,
            overlap=overlap,
            jitter=jitter,
        )
        return workflow

    return decorate
