"""The run family's reads: a run's state and log, and the index of runs; no Lua, no writes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from redis.exceptions import ResponseError

from .._errors import StorageError
from ._connect import Connection, text
from ._keys import LOG, STATE, RunState, StateField
from ._lane import _MISS

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
        first = await self._call(self.client.xrange(key, count=1))
        last = await self._call(self.client.xrevrange(key, count=newest))
        head = (first[0][1] or {}).get(b"e") if first else None
        return head, [(fields or {}).get(b"e") for _, fields in last]

    async def runs_by_time(self, top: str, offset: int, count: int) -> list[tuple[str, int]]:
        """``(run ID, creation ms)`` from the run index, newest first, created at or before `top`
        (a score, ``+inf`` or ``(<score>`` for strictly before), skipping `offset`."""
        batch = await self._call(
            self.client.zrange(self.runs_key, top, "-inf", desc=True, byscore=True, offset=offset, num=count,
                               withscores=True)
        )  # fmt: skip
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
        status = await self._fast([b"HGET", self.key(run_id, STATE), b"status"])
        if status is _MISS:
            status = await self._call(self.client.hget(self.key(run_id, STATE), "status"))
        return text(status or b"")

    async def read_log(self, run_id: str) -> AsyncIterator[list[tuple[int, bytes | None]]]:
        """The run's log in batches of ``(index, encoded event)``, oldest first.

        An entry without the expected field yields ``None`` for its body, so
        the caller can report it instead of crashing.
        """
        key = self.key(run_id, LOG)
        start = "-"
        while True:
            entries = _MISS
            if self._lane is not None:
                try:
                    entries = await self._lane.call([b"XRANGE", key, start, b"+", b"COUNT", _LOG_BATCH])
                except ResponseError as exc:
                    raise StorageError(f"{self.where} refused a command: {exc}") from None
            if entries is _MISS:
                parsed = await self._call(self.client.xrange(key, min=start, max="+", count=_LOG_BATCH))
                entries = [(entry_id, [k for kv in (fields or {}).items() for k in kv]) for entry_id, fields in parsed]
            if not entries:
                return
            yield [(_entry_index(entry_id), _field(fields, b"e")) for entry_id, fields in entries]
            if len(entries) < _LOG_BATCH:
                return
            start = f"({text(entries[-1][0])}"

    # -- hooks ------------------------------------------------------------------------


def _entry_index(entry_id: bytes | str) -> int:
    """The sequence part of a stream entry ID: ``0-<n>`` is event index n."""
    raw = entry_id if isinstance(entry_id, bytes) else entry_id.encode()
    return int(raw[raw.index(b"-") + 1 :])


def _field(fields: list[bytes] | None, name: bytes) -> bytes | None:
    """Field `name` of a stream entry given as a flat ``[field, value, ...]`` list."""
    if fields:
        if fields[0] == name:  # the only field werkfluss writes
            return fields[1]
        for i in range(2, len(fields) - 1, 2):
            if fields[i] == name:
                return fields[i + 1]
    return None
