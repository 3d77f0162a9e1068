"""The queues seen from outside: `list_queues` and `queue_info` (each sync and async), their
typed answers (`QueueInfo`, `KeyLoad`), and why a run waits (`waiting_on`, for `get_run`).

The limits shown are the ones the store holds (the declaration a worker or an
enqueue last made), so a process that never imported the module declaring a
queue -- the command line -- sees them too. The figures add up a queue's
partitions; each partition's are read in one call, so they are consistent per
partition, not across partitions. These only read.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from ._errors import ConfigurationError
from ._options import Settings
from ._queues import DEFAULT_QUEUE, Rate, declared_queues, queue_of_tag, tags_of
from ._store._keys import DEFAULT_TAG, GROUP
from ._store._open import open_store
from ._sync import blocking

if TYPE_CHECKING:
    from ._store import QueueFigures, RedisStore, RunState

__all__ = [
    "KeyLoad",
    "QueueInfo",
    "known_queues",
    "list_queues",
    "list_queues_async",
    "queue_info",
    "queue_info_async",
    "queue_tags",
    "waiting_on",
]

# Keys looked at per partition for the busiest keys and the oldest waiting run: a
# queue with more keys holding runs shows figures for these (the counts stay exact).
KEYS_LOOKED_AT = 1000
# Messages of a queue without limits looked through to place a run in line.
MESSAGES_LOOKED_AT = 1000
# A declaration as `Queue.describe` spells it: ``name=value`` with a number, ``True`` or a quoted rate.
_SETTING = re.compile(r"\b(\w+)=(\d+|True|'[^']*')")


class KeyLoad(msgspec.Struct, frozen=True, kw_only=True):
    """One key of a queue (``options(key=...)``) and its runs, as `queue_info` counts them.

    Attributes:
        key: The key (``""`` for the queue's runs without a key).
        running: Its runs admitted (executing, or read by a worker about to).
        waiting: Its runs waiting for admission.
    """

    key: str
    running: int
    waiting: int


class QueueInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A queue: the limits in force and what it holds now, added up over its partitions.

    Attributes:
        name: The queue's name (``"default"``: workflows that name none).
        partitions: How many streams (hash slots) it is spread over.
        declared: The declaration in force, as code spells it (``Queue('invoices', concurrency=20)``).
        limited: Whether its runs wait for admission (any limit or priority).
        concurrency: At most this many of its runs execute at once (None: no limit).
            With several partitions each enforces its share, rounded up.
        per_key: At most this many per key (None: no limit).
        rate: Starts allowed per window, like ``"100/min"`` (None: no limit).
        key_rate: The same per key.
        priority: Whether its runs may carry a priority.
        waiting: Runs waiting to be taken: waiting for admission (a queue with
            limits), or messages no worker has read (a queue without).
        running: Runs taken: admitted and holding a slot (with limits), or read
            by a worker and not yet done with (without).
        delayed: Runs whose delayed start (``delay=``, ``at=``) is not due yet.
        ready: Runs admitted that no worker has read yet (with limits; 0 without).
        oldest_waiting: Seconds the oldest run waiting to start has waited (since
            it was enqueued, or was due), None when none waits. Exact without
            limits; with limits, the oldest of the runs at the head of each key's
            line, and resumed runs waiting for a slot do not count.
        busiest_keys: The keys with the most runs running and waiting, most
            first (`queue_info` only; a queue with limits only).
    """

    name: str
    partitions: int
    declared: str
    limited: bool
    concurrency: int | None = None
    per_key: int | None = None
    rate: str | None = None
    key_rate: str | None = None
    priority: bool = False
    waiting: int = 0
    running: int = 0
    delayed: int = 0
    ready: int = 0
    oldest_waiting: float | None = None
    busiest_keys: list[KeyLoad] = []


# -- the queues there are --------------------------------------------------------------


async def known_queues(store: RedisStore) -> dict[str, int]:
    """Every queue there is: the default one, those declared on the server, those declared
    in this process; name -> partitions, the default first, then by name."""
    found = await store.known_queues()
    for queue in declared_queues():
        found.setdefault(queue.name, queue.partitions)
    found.pop(DEFAULT_QUEUE, None)
    return {DEFAULT_QUEUE: 1, **dict(sorted(found.items()))}


async def queue_tags(store: RedisStore, name: str | None) -> list[str]:
    """The partition tags of queue `name`, or of every known queue (None).

    Raises:
        ConfigurationError: no queue `name` is known, naming those that are.
    """
    known = await known_queues(store)
    if name is None:
        return [tag for queue, partitions in known.items() for tag in tags_of(queue, partitions)]
    if not isinstance(name, str) or name not in known:
        raise ConfigurationError(
            f"there is no queue {name!r}: none of that name is declared on the server or in this process; "
            f"known queues: {', '.join(known)}"
        )
    return tags_of(name, known[name])


# -- list_queues, queue_info -----------------------------------------------------------


async def list_queues_async(*, settings: Settings | None = None) -> list[QueueInfo]:
    """Every queue, the default one first, then by name: its limits and what it holds.

    Raises:
        StorageError: Redis/Valkey is unreachable.
    """
    store = await open_store(settings or Settings.from_env())
    return [await _info(store, name, partitions, top=0) for name, partitions in (await known_queues(store)).items()]


def list_queues(*, settings: Settings | None = None) -> list[QueueInfo]:
    """Blocking twin of `list_queues_async`."""
    return blocking("list_queues", lambda: list_queues_async(settings=settings))


async def queue_info_async(name: str, *, top: int = 10, settings: Settings | None = None) -> QueueInfo:
    """Queue `name`: its limits, what it holds, and its `top` busiest keys.

    Raises:
        ConfigurationError: there is no queue `name` (naming the known ones), or
            `top` is not a whole number of at least 0.
        StorageError: Redis/Valkey is unreachable.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ConfigurationError(f"top must be a whole number of at least 0, got {top!r}")
    store = await open_store(settings or Settings.from_env())
    tags = await queue_tags(store, name)
    return await _info(store, name, len(tags), top=top)


def queue_info(name: str, *, top: int = 10, settings: Settings | None = None) -> QueueInfo:
    """Blocking twin of `queue_info_async`."""
    return blocking("queue_info", lambda: queue_info_async(name, top=top, settings=settings))


async def _info(store: RedisStore, name: str, partitions: int, *, top: int) -> QueueInfo:
    tags = tags_of(name, partitions)
    config = await store.queue_config(tags[0]) if name != DEFAULT_QUEUE else {}
    if not config.get("declared"):
        local = next((q for q in declared_queues() if q.name == name), None)
        config = local.config() if local is not None else {"declared": f"Queue({name!r})"}
    limited = config.get("flow") == "1"
    concurrency, per_key, rate, key_rate = _limits(config, partitions)
    figures = [await store.queue_figures(tag, group=GROUP, keys=KEYS_LOOKED_AT) for tag in tags]
    now = store.server_now()  # message IDs are the server's times
    if limited:
        waiting, running = sum(f.waiting for f in figures), sum(f.active for f in figures)
        ready = sum(f.undelivered for f in figures)
        oldest = await _oldest_head(store, figures, now)
    else:
        waiting, running, ready = sum(f.undelivered for f in figures), sum(f.pending for f in figures), 0
        entries = [int(f.oldest_entry.partition("-")[0]) for f in figures if f.oldest_entry]
        oldest = max(now - min(entries) / 1000, 0.0) if entries else None
    return QueueInfo(
        name=name,
        partitions=partitions,
        declared=config["declared"],
        limited=limited,
        concurrency=concurrency,
        per_key=per_key,
        rate=rate,
        key_rate=key_rate,
        priority=config.get("priority") == "1",
        waiting=waiting,
        running=running,
        delayed=sum(f.delayed for f in figures),
        ready=ready,
        oldest_waiting=oldest,
        busiest_keys=_busiest(figures, top) if limited and top else [],
    )


def _limits(config: dict[str, str], partitions: int) -> tuple[int | None, int | None, str | None, str | None]:
    """The limits of a stored declaration, for the whole queue: concurrency, per_key, rate, key_rate.

    The store keeps what one partition enforces (its share of `concurrency` and
    `rate`); the whole queue's figures are read from the declaration's
    spelling, else the shares times the partitions.
    """
    spelled: dict[str, str] = {k: v.strip("'") for k, v in _SETTING.findall(config.get("declared", ""))}

    def number(field: str) -> int:
        value = config.get(field, "")
        return int(value) if value.isdigit() else 0

    def rate(field: str, window: str, *, shared: bool) -> str | None:
        if field in spelled:
            return spelled[field]
        limit, ms = number(field), number(window)
        if not limit or not ms:
            return None
        return str(Rate(limit * (partitions if shared else 1), ms / 1000))

    concurrency = int(spelled["concurrency"]) if "concurrency" in spelled else number("concurrency") * partitions
    per_key = number("per_key") or None
    queue_rate, key_rate = rate("rate", "window", shared=True), rate("key_rate", "key_window", shared=False)
    return concurrency or None, per_key, queue_rate, key_rate


async def _oldest_head(store: RedisStore, figures: list[QueueFigures], now: float) -> float | None:
    """Seconds the oldest run at the head of a key's line has waited to start (pending runs only)."""
    heads = [head for f in figures for _, _, waiting, head in f.keys if head and waiting]
    since = [
        max(state.created, state.due or 0)
        for state in await store.states(heads, ("status", "created", "due"))
        if state.status == "pending"
    ]
    return max(now - min(since) / 1000, 0.0) if since else None


def _busiest(figures: list[QueueFigures], top: int) -> list[KeyLoad]:
    counts: dict[str, list[int]] = {}
    for f in figures:
        for key, running, waiting, _ in f.keys:
            both = counts.setdefault(key, [0, 0])
            both[0] += running
            both[1] += waiting
    ranked = sorted(((k, r, w) for k, (r, w) in counts.items() if r + w), key=lambda c: (-(c[1] + c[2]), c[0]))
    return [KeyLoad(key=k, running=r, waiting=w) for k, r, w in ranked[:top]]


# -- why a run waits -------------------------------------------------------------------


async def waiting_on(store: RedisStore, run_id: str, state: RunState) -> str | None:
    """Why a pending (or woken paused) run has not started, in words, None when nothing
    holds it on its queue (a worker has it, or it waits for a hook, a timer or a child)."""
    if state.status not in ("pending", "paused"):
        return None
    tag = state.queue or DEFAULT_TAG
    name = queue_of_tag(tag)
    why = await store.why_waiting(run_id, queue=tag, group=GROUP, look=MESSAGES_LOOKED_AT)
    kind, rest = why[0], why[1:]
    parts = tag.split(":")
    where = f" in partition {parts[2]}" if len(parts) == 3 else ""
    if kind == "delayed":
        return f"delayed until {datetime.fromtimestamp(int(rest[0]) / 1000, UTC):%Y-%m-%d %H:%M:%S} UTC"
    if kind == "per_key":
        return f"concurrency of {_key(rest[0])} in {name} ({rest[1]}/{rest[2]})"
    if kind == "concurrency":
        return f"concurrency of {name} ({rest[0]}/{rest[1]}{where})"
    if kind == "key_rate":
        return f"rate of {_key(rest[0])} in {name} ({Rate(int(rest[1]), int(rest[2]) / 1000)})"
    if kind == "rate":
        return f"rate of {name} ({Rate(int(rest[0]), int(rest[1]) / 1000)}{where})"
    if kind in ("turn", "stream"):
        ahead = int(rest[0])
        if ahead < 0:
            return f"its turn in {name} (more than {MESSAGES_LOOKED_AT} runs ahead)"
        return f"its turn in {name} ({ahead} run{'' if ahead == 1 else 's'} ahead)"
    return None


def _key(key: str) -> str:
    return f"key {key!r}" if key else "runs without a key"
