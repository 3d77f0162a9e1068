"""Run deadlines: how long a run may take from its creation, and what happens past it.

A deadline (``@workflow(deadline="2h")``, ``options(deadline=...)``) is
stored with the run when it is created (the ``deadline`` field of its state
hash: a time on the timer clock, `_clock`), so every process that executes
the run sees it, after any restart. Past it the run is cancelled:

- a holder executing the run waits for the deadline beside the body
  (`watch`) and cancels it as `cancel()` would, through anyio cancellation;
- a paused run's timer is due no later than its deadline (`_executor._park`),
  and whoever takes a run past its deadline (a worker, a ``start()``) finds
  it ``expired`` (`_store._runs.ACQUIRE`) and cancels it without executing
  anything (`_attach.acquire`).

The recorded cancel reason names the deadline and when it passed
(`reason`); that is how a cancelled run is told apart as timed out
(`is_deadline_reason`), and why its callers get a `RunTimeoutError`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .._clock import nap
from .._errors import ConfigurationError, RunCancelledError, RunTimeoutError
from .._options import parse_duration

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import timedelta

    from .._store import Store

__all__ = [
    "MAX_DEADLINE",
    "cancelled_error",
    "check_deadline",
    "duration_text",
    "is_deadline_reason",
    "reason",
    "watch",
]

MAX_DEADLINE = 100 * 365 * 86400.0
"""The longest deadline accepted (seconds): about a century, far past any run's life."""

# The longest single wait for a deadline: a nap also ends early when a test clock moves,
# and the loop compares the timer clock again, so long deadlines need no precise sleep.
_LONGEST_NAP = 60.0

_REASON = re.compile(r"deadline \S+ passed at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z")


def check_deadline(value: float | timedelta | str, owner: str) -> float:
    """Seconds in deadline `value` of workflow `owner` (seconds, a `timedelta` or text like ``"2h"``).

    Raises:
        ConfigurationError: naming `owner` and the value, for one that is not
            a duration, zero or negative, or longer than `MAX_DEADLINE`.
    """
    seconds = parse_duration(value, what=f"deadline of workflow {owner!r}")
    if seconds <= 0:
        raise ConfigurationError(
            f"invalid deadline of workflow {owner!r}: {value!r} is not after the run's start; "
            f"give a positive duration (seconds, a timedelta, or text like '30m', '2h')"
        )
    if seconds > MAX_DEADLINE:
        raise ConfigurationError(
            f"invalid deadline of workflow {owner!r}: {value!r} is longer than a century; "
            f"leave the deadline out for a run without one"
        )
    return seconds


def duration_text(seconds: float) -> str:
    """`seconds` as the duration text a user writes: ``"2h"``, ``"1h30m"``, ``"500ms"``."""
    ms = round(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    parts = []
    whole, rest = divmod(ms, 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    if whole or rest:
        parts.append(f"{whole}.{rest:03d}".rstrip("0").rstrip(".") + "s")
    return "".join(parts)


def _iso(at: float) -> str:
    moment = datetime.fromtimestamp(at, tz=UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond // 1000:03d}"
    return text + "Z"


def reason(allowed: float, due: float) -> str:
    """The cancel reason of a run whose deadline (`allowed` seconds after its creation,
    due at Unix time `due` on the timer clock) passed: ``deadline 2h passed at 2026-12-02T10:00:00Z``."""
    return f"deadline {duration_text(allowed)} passed at {_iso(due)}"


def is_deadline_reason(text: str | None) -> bool:
    """Whether a recorded cancel reason is a deadline's (`reason`)."""
    return text is not None and _REASON.fullmatch(text) is not None


def cancelled_error(run_id: str, why: str) -> RunCancelledError:
    """What a caller of a cancelled run gets: `RunTimeoutError` when its deadline passed."""
    if is_deadline_reason(why):
        return RunTimeoutError(run_id, why)
    return RunCancelledError(run_id, why)


async def watch(store: Store, due: float, allowed: float, cancel: Callable[[str], None]) -> None:
    """Wait until the timer clock reaches `due`, then `cancel` with the deadline's reason.

    Waits through `_clock.nap`, so a test clock moved past `due` ends the wait at once.
    """
    while True:
        left = due - store.now()
        if left <= 0:
            cancel(reason(allowed, due))
            return
        await nap(store.prefix, min(left, _LONGEST_NAP), due=due)
