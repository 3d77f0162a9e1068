"""The queues seen from outside: their dead letters, re-driving them, and their depth
(each sync and async).

A dead letter is a queue message a worker gave up on (delivered
`max_deliveries` times, or malformed), or a hook payload no run could take;
re-driving one puts its run back on its queue as a fresh message (on a queue
with limits, to wait for admission). Each queue partition keeps its own dead
letters; these calls read one queue's (``queue="invoices"``) or every known
queue's (the default). They read and steer only the queues' keys, never a
run's log.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import msgspec

from ._errors import ConfigurationError
from ._options import Settings, check_limit
from ._queue_info import queue_tags
from ._queues import queue_of_tag
from ._store._keys import DEFAULT_TAG, GROUP
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

# A dead letter's ID: the entry ID its queue partition's dead letters stream gave it, and
# unless that is the default queue's, '@' and the partition's tag without its 'q:' (the
# queue's name, and ':<i>' on a partitioned queue). Entry IDs are per stream: two
# partitions may number a dead letter alike, so the ID says which one it is.
_DEAD_ID = re.compile(r"([0-9]+-[0-9]+)(?:@([A-Za-z0-9_.\-]{1,64}(?::[0-9]+)?))?")


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A message the queue gave up on, as `dead_letters` lists it.

    Attributes:
        id: The dead letter's ID, for `redrive`: the entry ID in its queue's dead
            letters (``1764590000000-0``), followed, unless it is the default
            queue's, by ``@<queue>`` (``@<queue>:<partition>`` on a partitioned one).
        run_id: The run it was about.
        reason: Why it was given up on (the last error, or what was malformed).
        at: When it was given up on, UTC (None if not recorded).
        deliveries: How many times it was delivered (queue messages only).
        source: Where it came from when it was not a queue message (a hook's mailbox).
        fields: Every field as stored, for tools that want them all.
        queue: The name of the queue whose dead letters hold it.
    """

    id: str
    run_id: str
    reason: str = ""
    at: datetime | None = None
    deliveries: int | None = None
    source: str | None = None
    fields: dict[str, str] = {}
    queue: str = "default"


class QueueDepth(msgspec.Struct, frozen=True, kw_only=True):
    """How much work a queue (or every queue) holds, as `queue_depth` reads it.

    Attributes:
        waiting: Messages no worker has read yet, and runs waiting for admission on
            a queue with limits (delayed runs not yet due are not counted).
        in_flight: Messages workers have read and not yet acknowledged (runs executing,
            or held by a worker that stopped, until the lease hands them on).
    """

    waiting: int
    in_flight: int


async def dead_letters_async(
    *, queue: str | None = None, limit: int = 100, settings: Settings | None = None
) -> list[DeadLetter]:
    """The dead letters of queue `queue` (by name), or of every known queue (None),
    oldest first (at most `limit`).

    Raises:
        ConfigurationError: `limit` is not a whole number of at least 1, or there is
            no queue `queue` (naming the known ones).
        StorageError: Redis/Valkey is unreachable.
    """
    check_limit(limit)
    store = await open_store(settings or Settings.from_env())
    found: list[tuple[tuple[int, int], DeadLetter]] = []
    for tag in await queue_tags(store, queue):
        for entry, fields in await store.dead_letters(limit, queue=tag):
            ms, _, seq = entry.partition("-")
            dead_id = entry if tag == DEFAULT_TAG else f"{entry}@{tag.removeprefix('q:')}"
            found.append(((int(ms), int(seq or 0)), _letter(dead_id, fields, queue_of_tag(tag))))
    found.sort(key=lambda pair: pair[0])  # stable: a tie keeps the queues' order
    return [letter for _, letter in found[:limit]]


def dead_letters(*, queue: str | None = None, limit: int = 100, settings: Settings | None = None) -> list[DeadLetter]:
    """Blocking twin of `dead_letters_async`."""
    return blocking("dead_letters", lambda: dead_letters_async(queue=queue, limit=limit, settings=settings))


async def redrive_async(dead_id: str, *, queue: str | None = None, settings: Settings | None = None) -> str | None:
    """Put dead letter `dead_id`'s run back on its queue, as a fresh message with no
    deliveries counted (on a queue with limits: to wait for admission); the dead letter
    is removed.

    An ID as `dead_letters` lists it names its queue. A bare entry ID (an
    older listing's) is looked for in queue `queue` (by name), or in every known
    queue (None), the default one first: the first one holding it is re-driven.

    Returns the dead letter's ID, or None when there is no such dead letter.

    Raises:
        ConfigurationError: `dead_id` is not a dead letter ID (as `dead_letters` lists
            them), it names another queue than `queue`, or there is no queue `queue`
            (naming the known ones).
        StorageError: Redis/Valkey is unreachable.
    """
    match = _DEAD_ID.fullmatch(dead_id) if isinstance(dead_id, str) else None
    if match is None:
        raise ConfigurationError(
            f"{dead_id!r} is not a dead letter ID: IDs look like '1764590000000-0' or '1764590000000-0@invoices', "
            f"as dead_letters() lists them"
        )
    entry, where = match.groups()
    store = await open_store(settings or Settings.from_env())
    if where is None:
        tags = await queue_tags(store, queue)
    else:
        name = where.partition(":")[0]
        if queue is not None and queue != name:
            raise ConfigurationError(f"dead letter {dead_id!r} is in queue {name!r}, not in queue {queue!r}")
        tags = [tag for tag in await queue_tags(store, name) if tag.removeprefix("q:") == where]
    for tag in tags:
        if await store.redrive(entry, queue=tag):
            return dead_id
    return None


def redrive(dead_id: str, *, queue: str | None = None, settings: Settings | None = None) -> str | None:
    """Blocking twin of `redrive_async`."""
    return blocking("redrive", lambda: redrive_async(dead_id, queue=queue, settings=settings))


async def queue_depth_async(*, queue: str | None = None, settings: Settings | None = None) -> QueueDepth:
    """How many runs wait for a worker, and how many messages workers hold unacknowledged,
    in queue `queue` (by name) or in every known queue together (None).

    Raises:
        ConfigurationError: there is no queue `queue` (naming the known ones).
        StorageError: Redis/Valkey is unreachable.
    """
    store = await open_store(settings or Settings.from_env())
    waiting = in_flight = 0
    for tag in await queue_tags(store, queue):
        figures = await store.queue_figures(tag, group=GROUP, keys=1)
        waiting, in_flight = waiting + figures.undelivered + figures.waiting, in_flight + figures.pending
    return QueueDepth(waiting=waiting, in_flight=in_flight)


def queue_depth(*, queue: str | None = None, settings: Settings | None = None) -> QueueDepth:
    """Blocking twin of `queue_depth_async`."""
    return blocking("queue_depth", lambda: queue_depth_async(queue=queue, settings=settings))


def _letter(dead_id: str, fields: dict[str, str], queue: str) -> DeadLetter:
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
        queue=queue,
    )
