"""The queue seen from outside: its dead letters, re-driving them, and its depth
(each sync and async).

A dead letter is a queue message a worker gave up on (delivered
`max_deliveries` times, or malformed), or a hook payload no run could take;
re-driving one puts its run back on the queue as a fresh message. These read
and steer only the queue's keys, never a run's log.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import msgspec

from ._errors import ConfigurationError
from ._options import Settings, check_limit
from ._store._keys import GROUP
from ._store._open import open_store
from ._sync import blocking

__all__ = [
    "DeadLetter",
    "QueueDepth",
    "dead_letters",
    "dead_letters_async",
    "queue_depth",
    "queue_depth_async",
    "redrive",
    "redrive_async",
]

# A stream entry ID, as the dead letters stream numbers its entries.
_ENTRY_ID = re.compile(r"[0-9]+-[0-9]+")


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A message the queue gave up on, as `dead_letters` lists it.

    Attributes:
        id: The dead letter's ID, for `redrive`.
        run_id: The run it was about.
        reason: Why it was given up on (the last error, or what was malformed).
        at: When it was given up on, UTC (None if not recorded).
        deliveries: How many times it was delivered (queue messages only).
        source: Where it came from when it was not a queue message (a hook's mailbox).
        fields: Every field as stored, for tools that want them all.
    """

    id: str
    run_id: str
    reason: str = ""
    at: datetime | None = None
    deliveries: int | None = None
    source: str | None = None
    fields: dict[str, str] = {}


class QueueDepth(msgspec.Struct, frozen=True, kw_only=True):
    """How much work the queue holds, as `queue_depth` reads it.

    Attributes:
        waiting: Messages no worker has read yet.
        in_flight: Messages workers have read and not yet acknowledged (runs executing,
            or held by a worker that stopped, until the lease hands them on).
    """

    waiting: int
    in_flight: int


async def dead_letters_async(*, limit: int = 100, settings: Settings | None = None) -> list[DeadLetter]:
    """The queue's dead letters, oldest first (at most `limit`).

    Raises:
        ConfigurationError: `limit` is not a whole number of at least 1.
        StorageError: Redis/Valkey is unreachable.
    """
    check_limit(limit)
    store = await open_store(settings or Settings.from_env())
    return [_letter(dead_id, fields) for dead_id, fields in await store.dead_letters(limit)]


def dead_letters(*, limit: int = 100, settings: Settings | None = None) -> list[DeadLetter]:
    """Blocking twin of `dead_letters_async`."""
    return blocking("dead_letters", lambda: dead_letters_async(limit=limit, settings=settings))


async def redrive_async(dead_id: str, *, settings: Settings | None = None) -> str | None:
    """Put dead letter `dead_id`'s run back on the queue, as a fresh message with
    no deliveries counted; the dead letter is removed.

    Returns the new message's ID, or None when there is no such dead letter.

    Raises:
        ConfigurationError: `dead_id` is not a dead letter ID (as `dead_letters` lists them).
        StorageError: Redis/Valkey is unreachable.
    """
    if not isinstance(dead_id, str) or _ENTRY_ID.fullmatch(dead_id) is None:
        raise ConfigurationError(
            f"{dead_id!r} is not a dead letter ID: IDs look like '1764590000000-0', as dead_letters() lists them"
        )
    store = await open_store(settings or Settings.from_env())
    return await store.redrive(dead_id) or None


def redrive(dead_id: str, *, settings: Settings | None = None) -> str | None:
    """Blocking twin of `redrive_async`."""
    return blocking("redrive", lambda: redrive_async(dead_id, settings=settings))


async def queue_depth_async(*, settings: Settings | None = None) -> QueueDepth:
    """How many messages wait for a worker, and how many workers hold unacknowledged.

    Raises:
        StorageError: Redis/Valkey is unreachable.
    """
    store = await open_store(settings or Settings.from_env())
    waiting, in_flight = await store.queue_depth(GROUP)
    return QueueDepth(waiting=waiting, in_flight=in_flight)


def queue_depth(*, settings: Settings | None = None) -> QueueDepth:
    """Blocking twin of `queue_depth_async`."""
    return blocking("queue_depth", lambda: queue_depth_async(settings=settings))


def _letter(dead_id: str, fields: dict[str, str]) -> DeadLetter:
    at = fields.get("at", "")
    deliveries = fields.get("deliveries", "")
    return DeadLetter(
        id=dead_id,
        run_id=fields.get("r", ""),
        reason=fields.get("reason", ""),
        at=datetime.fromtimestamp(int(at) / 1000, UTC) if at.isdigit() else None,
        deliveries=int(deliveries) if deliveries.isdigit() else None,
        source=fields.get("source") or None,
        fields=fields,
    )
