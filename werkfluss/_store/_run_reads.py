"""The run family's reads: a run's state and log, and the index of runs; no Lua, no writes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._connect import Connection, text
from ._keys import DEFAULT_TAG, EVENT, LOG, QUEUE_TAG, STATE, STATUS, RunState, StateField

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

_LOG_BATCH = 2000  # log entries per XRANGE


class RedisRunReads(Connection):
    """What a run's keys and the run index hold."""

    async def state(self, run_id: str) -> RunState:
        """The run's state (its `status` is ``""`` if there is no such run)."""
        return RunState.from_hash(await self._call(self.client.hgetall(self.key(run_id, STATE))))

    async def log_ends(self, run_id: str, newest: int) -> tuple[bytes | None, list[bytes | None]]:
        """The run's first event and its `newest` last ones (newest first), undecoded."""
        key = self.key(run_id, LOG)
        first = await self._send("XRANGE", key, "-", "+", "COUNT", 1)
        last = await self._send("XREVRANGE", key, "+", "-", "COUNT", newest)
        head = _field(first[0][1], EVENT) if first else None
        return head, [_field(fields, EVENT) for _, fields in last]

    async def runs_by_time(self, top: str, offset: int, count: int) -> list[tuple[str, int]]:
        """``(run ID, creation ms)`` from the run index, newest first, created at or before `top`
        (a score, ``+inf`` or ``(<score>`` for strictly before), skipping `offset`."""
        batch = await self._call(
            self.client.zrange(
                self.runs_key, top, "-inf", desc=True, byscore=True, offset=offset, num=count, withscores=True
            )
        )
        return [(text(member), int(score)) for member, score in batch]

    async def states(self, run_ids: list[str], fields: tuple[StateField, ...]) -> list[RunState]:
        """`fields` of many runs' states in one round trip (the other fields at their defaults)."""
        if not run_ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hmget(self.key(run_id, STATE), fields)
        replies = await self._call(pipe.execute())
        return [RunState.from_hash(dict(zip(fields, reply, strict=True))) for reply in replies]

    async def status(self, run_id: str) -> str:
        """The run's status, ``""`` if there is no such run."""
        return text(await self._send("HGET", self.key(run_id, STATE), STATUS) or b"")

    async def queue_of(self, run_id: str) -> str:
        """The tag of the run's queue partition (``q`` for the default queue, or no such run)."""
        return text(await self._send("HGET", self.key(run_id, STATE), QUEUE_TAG) or b"") or DEFAULT_TAG

    async def read_log(self, run_id: str) -> AsyncIterator[list[tuple[int, bytes | None]]]:
        """The run's log in batches of ``(index, encoded event)``, oldest first.

        An entry without the expected field yields ``None`` for its body, so
        the caller can report it instead of crashing.
        """
        key = self.key(run_id, LOG)
        start = "-"
        while True:
            entries = await self._send("XRANGE", key, start, "+", "COUNT", _LOG_BATCH)
            if not entries:
                return
            yield [(_entry_index(entry_id), _field(fields, EVENT)) for entry_id, fields in entries]
            if len(entries) < _LOG_BATCH:
                return
            start = f"({text(entries[-1][0])}"


def _entry_index(entry_id: bytes) -> int:
    """The sequence part of a stream entry ID: ``0-<n>`` is event index n."""
    return int(entry_id[entry_id.index(b"-") + 1 :])


def _field(fields: list[bytes] | None, name: bytes) -> bytes | None:
    """Field `name` of a stream entry given as a flat ``[field, value, ...]`` list."""
    if fields:
        if fields[0] == name:  # the only field werkfluss writes
            return fields[1]
        for i in range(2, len(fields) - 1, 2):
            if fields[i] == name:
                return fields[i + 1]
    return None
