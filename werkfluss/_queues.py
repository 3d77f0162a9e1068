"""`Queue`: a named queue with its flow control, declared in code, and the registry of declared queues.

A queue is where a workflow's runs wait for a worker. The default queue has
no limits (its runs go straight to the workers' stream); a declared queue may
limit how many of its runs execute at once (across every worker), how many
per key, how many start per time window, and order them by priority. Its keys
live on their own hash slot (``{q:<name>}``, one per partition), so queues
spread across a Redis Cluster.

Pure: no I/O. The store (`_store._flow`) keeps the limits in force on the
server, in one Lua script per admission.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._errors import ConfigurationError
from ._options import parse_duration

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import timedelta

__all__ = [
    "DEFAULT_PRIORITY",
    "DEFAULT_QUEUE",
    "MAX_PRIORITY",
    "Queue",
    "Rate",
    "declared_queues",
    "default_queue",
    "parse_rate",
    "queue_named",
    "queue_of_tag",
    "tags_of",
]

DEFAULT_QUEUE = "default"
DEFAULT_PRIORITY = 5
MAX_PRIORITY = 9
MAX_PARTITIONS = 256
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_UNITS |= {"h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `limit` starts in any window of `seconds` (a sliding window on the server's clock)."""

    limit: int
    seconds: float

    def __str__(self) -> str:
        for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0)):
            if self.seconds >= size and self.seconds % size == 0:
                count = int(self.seconds // size)
                return f"{self.limit}/{'' if count == 1 else count}{unit}"
        return f"{self.limit}/{int(self.seconds * 1000)}ms"


def parse_rate(rate: str | tuple[int, float | timedelta | str] | Rate, *, what: str = "rate") -> Rate:
    """A rate from ``"100/min"``, ``"5/s"``, ``"1000/h"``, ``"10/30s"``, or ``(limit, window)``.

    Raises:
        ConfigurationError: naming `what` and the value, for anything else.
    """
    if isinstance(rate, Rate):
        return rate
    try:
        if isinstance(rate, str):
            match = _RATE.fullmatch(rate)
            if match is None or match.group(3) not in _UNITS:
                raise ValueError
            limit, count = int(match.group(1)), int(match.group(2) or 1)
            seconds = count * _UNITS[match.group(3)]
        elif isinstance(rate, tuple) and len(rate) == 2 and isinstance(rate[0], int):
            limit, seconds = rate[0], parse_duration(rate[1], what=what)
        else:
            raise ValueError
    except (ValueError, ConfigurationError):
        raise ConfigurationError(
            f"{what}: {rate!r} is not a rate: use '<count>/<unit>' like '100/min', '5/s' or '10/30s' "
            f"(units ms, s or sec or second, m or min or minute, h or hour, d or day), or (count, window)"
        ) from None
    if limit < 1 or not 0.001 <= seconds <= 86400 * 7:
        raise ConfigurationError(f"{what}: {rate!r}: the count must be >= 1 and the window 1 ms to 7 days")
    return Rate(limit, seconds)


def _positive(value: object, what: str, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"queue {name!r}: {what} must be a whole number >= 1 (or None for no limit), got {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True, eq=False)
class Queue:
    """A named queue and the flow control its runs get, across every worker.

    Declare it once, at import time, and give it to workflows
    (``@workflow(queue=invoices)``); ``werkfluss worker MODULE --queue NAME``
    serves it. A run remembers its queue: its resumes, timers, hook wake-ups
    and redrives come back to it.

    Args:
        name: Letters, digits, ``_ . -``; ``"default"`` is the queue of every
            workflow that names none.
        concurrency: At most this many of the queue's runs execute at once,
            across every worker and machine (None: no limit). Exact; split
            between partitions when there are several.
        per_key: At most this many runs per key (``options(key=...)``) execute
            at once. Keys take turns (round robin), so one key with a long
            backlog does not delay a key with one run.
        rate: At most this many runs start per window (``"100/min"``): a
            sliding window on the server's clock. Resumed runs do not count.
        key_rate: The same per key.
        priority: Whether runs may carry a priority (``options(priority=N)``,
            0 first, 9 last, default 5; first in, first out within one).
        partitions: Streams (hash slots) the queue is spread over, to go past
            one Redis node. Runs of one key share a partition, so per-key
            limits stay exact; `concurrency` and `rate` are split between
            partitions (shares that add up to the limit, so each must be at
            least `partitions`).
    """

    name: str
    concurrency: int | None = None
    per_key: int | None = None
    rate: str | Rate | None = None
    key_rate: str | Rate | None = None
    priority: bool = False
    partitions: int = 1
    _rate: Rate | None = field(init=False, repr=False, default=None)
    _key_rate: Rate | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigurationError(f"invalid queue name {self.name!r}: use 1 to 64 letters, digits, '_', '.' or '-'")
        _positive(self.concurrency, "concurrency", self.name)
        _positive(self.per_key, "per_key", self.name)
        if not isinstance(self.priority, bool):
            raise ConfigurationError(f"queue {self.name!r}: priority must be True or False, got {self.priority!r}")
        if isinstance(self.partitions, bool) or not isinstance(self.partitions, int):
            raise ConfigurationError(f"queue {self.name!r}: partitions must be a whole number, got {self.partitions!r}")
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ConfigurationError(
                f"queue {self.name!r}: partitions must be 1 to {MAX_PARTITIONS}, got {self.partitions}"
            )
        if self.name == DEFAULT_QUEUE and self.limited:
            raise ConfigurationError(f"the {DEFAULT_QUEUE!r} queue has no limits; declare a queue of another name")
        object.__setattr__(
            self, "_rate", None if self.rate is None else parse_rate(self.rate, what=f"rate of queue {self.name!r}")
        )
        object.__setattr__(
            self,
            "_key_rate",
            None if self.key_rate is None else parse_rate(self.key_rate, what=f"key_rate of queue {self.name!r}"),
        )
        for what, limit in (("concurrency", self.concurrency), ("rate", self._rate_limit())):
            if limit is not None and limit < self.partitions:
                raise ConfigurationError(
                    f"queue {self.name!r}: {what} {limit} cannot be split between {self.partitions} partitions "
                    f"(each enforces a share of at least 1): use at most {limit} partitions, or a higher {what}"
                )
        _register(self)

    def _rate_limit(self) -> int | None:
        return None if self._rate is None else self._rate.limit

    @property
    def limited(self) -> bool:
        """Whether its runs pass the admission (any limit or priority), or go straight to the stream."""
        return bool(self.concurrency or self.per_key or self.rate or self.key_rate or self.priority)

    def tags(self) -> list[str]:
        """The hash tags of its partitions (``q`` is the default queue's)."""
        return tags_of(self.name, self.partitions)

    def tag_for(self, key: str | None, run_id: str) -> str:
        """The partition a run goes to: by its key (so a key's runs share one), else by its run ID."""
        tags = self.tags()
        if len(tags) == 1:
            return tags[0]
        return tags[zlib.crc32((key if key is not None else run_id).encode()) % len(tags)]

    def config(self, partition: int = 0) -> dict[str, str]:
        """The limits partition `partition` enforces, as the store keeps them (``{q:<name>}:config``).

        `concurrency` and `rate` are split in shares that add up to them: the first
        ``limit % partitions`` partitions get one more.
        """
        parts = self.partitions

        def share(limit: int) -> int:
            return limit // parts + (1 if partition < limit % parts else 0)

        out = {"name": self.name, "partitions": str(parts), "flow": "1" if self.limited else "0"}
        out["priority"] = "1" if self.priority else "0"
        out["concurrency"] = str(share(self.concurrency)) if self.concurrency else "0"
        out["per_key"] = str(self.per_key or 0)
        if self._rate is not None:
            out["rate"], out["window"] = str(share(self._rate.limit)), str(int(self._rate.seconds * 1000))
        else:
            out["rate"], out["window"] = "0", "0"
        if self._key_rate is not None:
            out["key_rate"], out["key_window"] = str(self._key_rate.limit), str(int(self._key_rate.seconds * 1000))
        else:
            out["key_rate"], out["key_window"] = "0", "0"
        out["declared"] = self.describe()
        return out

    def describe(self) -> str:
        """The declaration as code would spell it (for errors and the CLI)."""
        parts = [repr(self.name)]
        for name in ("concurrency", "per_key"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={value}")
        if self._rate is not None:
            parts.append(f"rate={str(self._rate)!r}")
        if self._key_rate is not None:
            parts.append(f"key_rate={str(self._key_rate)!r}")
        if self.priority:
            parts.append("priority=True")
        if self.partitions != 1:
            parts.append(f"partitions={self.partitions}")
        return f"Queue({', '.join(parts)})"

    def __repr__(self) -> str:
        return f"<werkfluss {self.describe()}>"


_QUEUES: dict[str, Queue] = {}


def tags_of(name: str, partitions: int = 1) -> list[str]:
    """The hash tags of queue `name`'s partitions: ``q`` (the default queue), ``q:N``, or ``q:N:<i>``."""
    if name == DEFAULT_QUEUE:
        return ["q"]
    if partitions <= 1:
        return [f"q:{name}"]
    return [f"q:{name}:{i}" for i in range(partitions)]


def _register(queue: Queue) -> None:
    """Remember a declared queue; a second declaration of a name must say the same."""
    known = _QUEUES.get(queue.name)
    if known is not None and known.config() != queue.config():
        raise ConfigurationError(
            f"queue {queue.name!r} is declared twice in this process, differently: "
            f"{known.describe()} and {queue.describe()}"
        )
    if known is None:
        _QUEUES[queue.name] = queue


def default_queue() -> Queue:
    """The queue of workflows that name none: no limits, the ``{q}`` slot."""
    return _QUEUES.get(DEFAULT_QUEUE) or Queue(DEFAULT_QUEUE)


def queue_named(name: str | Queue) -> Queue:
    """The declared queue `name` (a `Queue` is returned as is).

    Raises:
        ConfigurationError: no queue of that name is declared here, naming those that are.
    """
    if isinstance(name, Queue):
        return name
    if name == DEFAULT_QUEUE:
        return default_queue()
    known = _QUEUES.get(name)
    if known is None:
        names = ", ".join(sorted({DEFAULT_QUEUE, *_QUEUES}))
        raise ConfigurationError(f"there is no queue {name!r} declared in this process; known queues: {names}")
    return known


def declared_queues() -> list[Queue]:
    """Every queue declared in this process, the default one first."""
    default = default_queue()
    return [default, *sorted((q for q in _QUEUES.values() if q is not default), key=lambda q: q.name)]


def queue_of_tag(tag: str) -> str:
    """The queue name a hash tag belongs to (``q`` -> default, ``q:N`` and ``q:N:i`` -> N)."""
    if tag in ("", "q"):
        return DEFAULT_QUEUE
    return tag.split(":")[1]


def all_tags(queues: Iterable[Queue]) -> list[str]:
    """The hash tags of `queues`' partitions, in order, each once."""
    seen: dict[str, None] = {}
    for queue in queues:
        for tag in queue.tags():
            seen.setdefault(tag, None)
    return list(seen)
