"""The run family's log writes: a step's event, a pause, the run's end (``P{R}:log`` and ``:state``), and their Lua.

A holder writes at its epoch (an older one is fenced out: refused with -1)
and says how much of the log it has seen (a shorter log was rolled back under
it: refused with -2); either refusal raises `_Suspend`, and the run resumes
elsewhere from what the log has. A live step is one `append`: the hot path.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec

from .._errors import _Suspend
from .._events import ErrorInfo, RunBlocked, RunCancelled, RunCompleted, RunFailed, RunStatus, encode_event
from ._connect import NOW, Connection, Script, text
from ._keys import CANCEL, ERROR, LOG, RESULT, STATE, STEPS

if TYPE_CHECKING:
    from ._lane import Arg

# A holder also says how long it has seen the log (the 'seen' argument, '' for no
# check): a log shorter than that was rolled back under it (a server restarted from an
# older append-only file, a failover to a replica that lagged). Writing on would leave a
# hole where the lost events were, so the holder is refused (-2) and the run resumes
# from what the log still has.
_ROLLED_BACK = """
local function rolled_back(seen)
  return seen ~= '' and tonumber(redis.call('HGET', KEYS[1], 'n') or 0) < tonumber(seen)
end
"""

# KEYS: state, log, steps. ARGV: epoch, dedup field, event, lease_ms, seen.
# Returns {index, cancel reason}; index 0 if this dedup field was recorded
# before (a re-sent command or a competing writer: first writer wins), -1 if
# fenced, -2 if the log was rolled back.
APPEND = Script(
    "APPEND",
    NOW
    + _ROLLED_BACK
    + """
local epoch, dedup, event, lease_ms, seen = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'cancel')
if cur[1] ~= epoch then return {-1, ''} end
if rolled_back(seen) then return {-2, ''} end
local cancel = cur[2] or ''
if redis.call('HEXISTS', KEYS[3], dedup) == 1 then return {0, cancel} end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', event)
redis.call('HSET', KEYS[3], dedup, n)
redis.call('HSET', KEYS[1], 'updated', now, 'lease', now + tonumber(lease_ms))
return {n, cancel}
""",
)

# KEYS: state, log. ARGV: epoch, run-paused event, encoded waits, seen.
# Returns {index, ''}, {0, cancel reason} when a cancel is pending, {-1} if fenced,
# {-2} if the log was rolled back.
PAUSE = Script(
    "PAUSE",
    NOW
    + _ROLLED_BACK
    + """
local epoch, event, waiting, seen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('HGET', KEYS[1], 'epoch') ~= epoch then return {-1, ''} end
if rolled_back(seen) then return {-2, ''} end
local cancel = redis.call('HGET', KEYS[1], 'cancel')
if cancel then return {0, cancel} end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', event)
redis.call('HSET', KEYS[1], 'status', 'paused', 'waiting', waiting, 'holder', '', 'lease', 0, 'updated', now)
return {n, ''}
""",
)

# KEYS: state, log. ARGV: epoch, status, event, result-or-error field, its value,
# failed_seq, seen. Returns {index, parent run}; index -1 if fenced, -2 if the log
# was rolled back, 0 if already completed.
FINISH = Script(
    "FINISH",
    NOW
    + _ROLLED_BACK
    + """
local epoch, status, event, field, value = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local failed_seq, seen = ARGV[6], ARGV[7]
if redis.call('HGET', KEYS[1], 'epoch') ~= epoch then return {-1, ''} end
if rolled_back(seen) then return {-2, ''} end
local parent = redis.call('HGET', KEYS[1], 'parent') or ''
if redis.call('HGET', KEYS[1], 'status') == 'completed' then return {0, parent} end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', event)
redis.call('HSET', KEYS[1], 'status', status, field, value, 'failed_seq', failed_seq,
           'holder', '', 'lease', 0, 'updated', now)
redis.call('HDEL', KEYS[1], 'waiting')
return {n, parent}
""",
)

SCRIPTS = (APPEND, PAUSE, FINISH)


class RedisRunLog(Connection):
    """A holder's writes to its run's log: steps, pauses, and the end."""

    async def append(
        self, run_id: str, epoch: int, dedup: str, event: bytes, lease: float, *, seen: int | None = None
    ) -> tuple[int, str | None]:
        """Append an event once per `dedup` field: ``(index or 0 if recorded before, cancel reason)``.

        `seen` is the highest log index the caller has seen, if it checks that the
        log was not rolled back under it.

        Raises:
            _Suspend: the run was taken over (fenced), or its log rolled back.
        """
        keys = self._run_keys(run_id, STATE, LOG, STEPS)
        reply = await self._run(APPEND, keys, [epoch, dedup, event, int(lease * 1000), _seen(seen)])
        n = int(reply[0])
        if n < 0:
            raise _refused(run_id, n)
        return n, text(reply[1]) or None

    async def pause(
        self, run_id: str, epoch: int, event: bytes, waiting: bytes, *, seen: int | None = None
    ) -> str | None:
        """Park the run; returns a pending cancel's reason instead of parking, if there is one.

        Raises:
            _Suspend: the run was taken over (fenced), or its log rolled back (see `append`).
        """
        reply = await self._run(PAUSE, self._run_keys(run_id, STATE, LOG), [epoch, event, waiting, _seen(seen)])
        if int(reply[0]) < 0:
            raise _refused(run_id, int(reply[0]))
        return text(reply[1]) or None

    async def complete(self, run_id: str, epoch: int, result: bytes, *, seen: int | None = None) -> str:
        """Record that the run returned `result` (encoded); returns its parent run or ``""``.

        Raises:
            _Suspend: the run was taken over (fenced), or its log rolled back (see `append`).
        """
        event = encode_event(RunCompleted(time.time(), msgspec.Raw(result)))
        return await self._finish(run_id, epoch, "completed", event, RESULT, result, None, seen)

    async def fail(
        self, run_id: str, epoch: int, error: ErrorInfo, *, seq: int | None = None, seen: int | None = None
    ) -> str:
        """Record that the run failed with `error` (step `seq` caused it, if one did); returns its parent or ``""``.

        Raises:
            _Suspend: the run was taken over (fenced), or its log rolled back (see `append`).
        """
        event = encode_event(RunFailed(time.time(), error, seq))
        return await self._finish(run_id, epoch, "failed", event, ERROR, msgspec.msgpack.encode(error), seq, seen)

    async def block(self, run_id: str, epoch: int, error: ErrorInfo, *, seen: int | None = None) -> str:
        """Record that the run's replay diverged from its log (`error` says where): it waits
        for fixed code. Returns its parent run or ``""``.

        Raises:
            _Suspend: the run was taken over (fenced), or its log rolled back (see `append`).
        """
        event = encode_event(RunBlocked(time.time(), error))
        return await self._finish(run_id, epoch, "blocked", event, ERROR, msgspec.msgpack.encode(error), None, seen)

    async def mark_cancelled(self, run_id: str, epoch: int, reason: str, *, seen: int | None = None) -> str:
        """Record that the run's holder stopped it for a cancel with `reason`; returns its parent or ``""``.

        Raises:
            _Suspend: the run was taken over (fenced), or its log rolled back (see `append`).
        """
        event = encode_event(RunCancelled(time.time(), reason))
        return await self._finish(run_id, epoch, "cancelled", event, CANCEL, reason.encode(), None, seen)

    async def _finish(
        self,
        run_id: str,
        epoch: int,
        status: RunStatus,
        event: bytes,
        field: str,
        value: bytes,
        failed_seq: int | None,
        seen: int | None,
    ) -> str:
        """Record the run's end: `status`, its `event`, and `value` in state `field`."""
        args: list[Arg] = [epoch, status, event, field, value, "" if failed_seq is None else failed_seq, _seen(seen)]
        reply = await self._run(FINISH, self._run_keys(run_id, STATE, LOG), args)
        if int(reply[0]) < 0:
            raise _refused(run_id, int(reply[0]))
        return text(reply[1])


def _seen(seen: int | None) -> Arg:
    return "" if seen is None else seen


def _refused(run_id: str, code: int) -> _Suspend:
    """What a run write refused with `code` (-1 fenced, -2 rolled back) raises."""
    if code == -2:
        return _Suspend(
            run_id,
            "the server's log of this run is shorter than this process saw (the server came "
            "back from an older state); this one stops, and the run resumes from the log",
        )
    return _Suspend(run_id, "another process took this run over; this one stops writing")
