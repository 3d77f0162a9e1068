"""The run family: a run's writes (``P{R}:state``, ``:log``, ``:steps``, and the run index) and their Lua.

Every write is one script that first checks the run's epoch (fencing: a
process whose lease was taken over cannot write) and is idempotent: redis-py
re-sends a command whose reply was lost, and a completion already recorded for
``(run, seq)`` is not recorded twice (first writer wins). The log is never
trimmed. Lease times come from the server's clock (``TIME``), never from a
worker's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import _Suspend
from ._connect import NOW, Arg, Connection, Script, text
from ._keys import LOG, STATE, STEPS
from ._lane import _MISS

# -- scripts: every run write first compares the run's epoch (fencing) ---------------------

# KEYS: state, log. ARGV: holder, lease_ms, workflow ('' accepts any), run-started
# event ('' never creates), run-resumed event, holder to take over ('' none),
# digest of the arguments ('' skips the check), '1' to resume a failed or
# blocked run, parent run ('' none), the caller's process prefix ('' none): a
# holder under it is busy even past its lease, since only that process can
# tell whether it still executes (it passes the holder to take over if not).
ACQUIRE = Script(
    "ACQUIRE",
    NOW
    + """
local holder, lease_ms, workflow, started, resumed = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local take_over, args, retry, parent, process = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local cur = redis.call('HMGET', KEYS[1], 'status', 'workflow', 'holder', 'lease', 'cancel')
if not cur[1] then
  if started == '' then return {'missing'} end
  redis.call('HSET', KEYS[1], 'status', 'running', 'workflow', workflow, 'holder', holder,
             'lease', now + tonumber(lease_ms), 'epoch', 1, 'n', 1, 'created', now, 'updated', now,
             'args', args, 'parent', parent)
  redis.call('XADD', KEYS[2], '0-1', 'e', started)
  return {'new', 1, now}
end
if workflow ~= '' and cur[2] ~= workflow then return {'conflict', cur[2]} end
if args ~= '' and redis.call('HGET', KEYS[1], 'args') ~= args then return {'other-arguments'} end
local status = cur[1]
if status == 'completed' then return {'completed', redis.call('HGET', KEYS[1], 'result')} end
if status == 'cancelled' then return {'cancelled', cur[5] or ''} end
if (status == 'failed' or status == 'blocked') and retry ~= '1' then return {'ended', status} end
if status == 'running' and cur[3] ~= '' and cur[3] ~= holder and cur[3] ~= take_over
   and (tonumber(cur[4]) > now or (process ~= '' and string.sub(cur[3], 1, #process) == process)) then
  return {'busy', cur[3], tonumber(cur[4]) - now, cur[2]}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', resumed)
redis.call('HSET', KEYS[1], 'status', 'running', 'holder', holder,
           'lease', now + tonumber(lease_ms), 'updated', now)
redis.call('HDEL', KEYS[1], 'waiting')
if status == 'failed' then
  -- Remember which step failed the run: the replay re-executes it instead
  -- of replaying its recorded failure (failures recorded up to index n).
  redis.call('HSET', KEYS[1], 'retry_seq', redis.call('HGET', KEYS[1], 'failed_seq') or '', 'retry_index', n)
end
local more = redis.call('HMGET', KEYS[1], 'retry_seq', 'retry_index')
return {'resumed', epoch, status, more[1] or '', more[2] or '', cur[2], cur[5] or ''}
""",
)

# KEYS: state, log. ARGV: workflow, run-started event, digest of the arguments.
# Creates a pending run for the queue; an existing run is reported, not touched.
CREATE = Script(
    "CREATE",
    NOW
    + """
local workflow, started, args = ARGV[1], ARGV[2], ARGV[3]
local cur = redis.call('HMGET', KEYS[1], 'status', 'workflow')
if not cur[1] then
  redis.call('HSET', KEYS[1], 'status', 'pending', 'workflow', workflow, 'holder', '', 'lease', 0,
             'epoch', 0, 'n', 1, 'created', now, 'updated', now, 'args', args, 'parent', '')
  redis.call('XADD', KEYS[2], '0-1', 'e', started)
  return {'new', now}
end
if cur[2] ~= workflow then return {'conflict', cur[2]} end
if redis.call('HGET', KEYS[1], 'args') ~= args then return {'other-arguments'} end
return {'exists', cur[1]}
""",
)

# KEYS: state. ARGV: epoch, lease_ms. Returns {1, cancel reason} or {0} if fenced.
RENEW = Script(
    "RENEW",
    NOW
    + """
local epoch, lease_ms = ARGV[1], ARGV[2]
if redis.call('HGET', KEYS[1], 'epoch') ~= epoch then return {0} end
redis.call('HSET', KEYS[1], 'lease', now + tonumber(lease_ms))
return {1, redis.call('HGET', KEYS[1], 'cancel') or ''}
""",
)

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

# KEYS: state. ARGV: epoch, '1' if the run goes back to the queue. Lets another
# process take over at once. A run handed back to the queue becomes 'pending'
# (waiting for a worker) instead of looking 'running' with nobody running it;
# ACQUIRE takes a pending run over like a released running one.
RELEASE = Script(
    "RELEASE",
    NOW
    + """
local epoch, pending = ARGV[1], ARGV[2]
if redis.call('HGET', KEYS[1], 'epoch') ~= epoch then return 0 end
redis.call('HSET', KEYS[1], 'lease', 0, 'holder', '')
if pending == '1' and redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'pending', 'updated', now)
end
return 1
""",
)

# KEYS: state, log. ARGV: reason, run-cancelled event.
# A run held by a live process is only marked: its holder stops at the next
# step boundary and records the end. Anything else ends here, fencing out
# whatever process may still think it holds the run.
CANCEL = Script(
    "CANCEL",
    NOW
    + """
local reason, event = ARGV[1], ARGV[2]
local cur = redis.call('HMGET', KEYS[1], 'status', 'holder', 'lease', 'parent')
if not cur[1] then return {'missing', ''} end
if cur[1] == 'completed' or cur[1] == 'cancelled' then return {'already-' .. cur[1], cur[4] or ''} end
if cur[1] == 'running' and cur[2] ~= '' and tonumber(cur[3]) > now then
  redis.call('HSET', KEYS[1], 'cancel', reason)
  return {'requested', cur[4] or ''}
end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', event)
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancel', reason, 'holder', '', 'lease', 0, 'updated', now)
redis.call('HDEL', KEYS[1], 'waiting')
return {'cancelled', cur[4] or ''}
""",
)

SCRIPTS = (ACQUIRE, CREATE, RENEW, APPEND, PAUSE, FINISH, RELEASE, CANCEL)


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """What `RedisStore.acquire` found: ``kind`` is new, resumed, completed, busy,
    cancelled, ended (failed or blocked, not resumed), missing, conflict
    (another workflow's run) or other-arguments. `cancel` is a pending
    cancel's reason."""

    kind: str
    epoch: int = 0
    previous: str = ""
    result: bytes = b""
    holder: str = ""
    lease_left: float = 0.0
    workflow: str = ""
    retry_seq: int | None = None
    retry_index: int = 0
    cancel: str | None = None


class RedisRuns(Connection):
    """A run's writes: create or take it over, record its events, end it."""

    async def _index_run(self, run_id: str, created_ms: int) -> None:
        """Add a new run to the index of runs by creation time."""
        if await self._fast([b"ZADD", self.runs_key, b"NX", created_ms, run_id]) is _MISS:
            await self._call(self.client.zadd(self.runs_key, {run_id: created_ms}, nx=True))

    def _run_keys(self, run_id: str, *parts: str) -> list[str]:
        return [self.key(run_id, part) for part in parts]

    async def acquire(
        self,
        run_id: str,
        *,
        workflow: str,
        holder: str,
        lease: float,
        started: bytes,
        resumed: bytes,
        take_over: str = "",
        args_digest: str = "",
        retry: bool = True,
        parent: str = "",
        process: str = "",
    ) -> AcquireResult:
        """Create run `run_id` or take it over; see `AcquireResult` for the outcomes.

        An empty `workflow`, `started` or `args_digest` means: accept any
        workflow, never create, do not compare arguments (what a worker
        passes, knowing only the run ID). `retry` lets a failed or blocked
        run resume. A holder whose name starts with `process` (the caller's
        own process) is reported busy even past its lease.
        """
        args: list[Arg] = [
            holder, int(lease * 1000), workflow, started, resumed, take_over, args_digest, "1" if retry else "", parent,
            process,
        ]  # fmt: skip
        reply = await self._run(ACQUIRE, self._run_keys(run_id, STATE, LOG), args)
        kind = text(reply[0])
        if kind == "new":
            await self._index_run(run_id, int(reply[2]))
            return AcquireResult("new", epoch=int(reply[1]), workflow=workflow)
        if kind == "resumed":
            return AcquireResult(
                "resumed",
                epoch=int(reply[1]),
                previous=text(reply[2]),
                retry_seq=int(reply[3]) if reply[3] else None,
                retry_index=int(reply[4]) if reply[4] else 0,
                workflow=text(reply[5]),
                cancel=text(reply[6]) if reply[6] else None,
            )
        if kind == "completed":
            return AcquireResult("completed", result=bytes(reply[1] or b""))
        if kind == "busy":
            return AcquireResult(
                "busy", holder=text(reply[1]), lease_left=int(reply[2]) / 1000, workflow=text(reply[3])
            )
        if kind == "conflict":
            return AcquireResult("conflict", workflow=text(reply[1]))
        if kind == "cancelled":
            return AcquireResult("cancelled", cancel=text(reply[1]))
        if kind == "ended":
            return AcquireResult("ended", previous=text(reply[1]))
        return AcquireResult(kind)  # missing, other-arguments

    async def create(self, run_id: str, *, workflow: str, started: bytes, args_digest: str) -> tuple[str, str]:
        """Create a pending run for the queue: ``("new", "")``, ``("exists", status)``,
        ``("conflict", workflow)`` or ``("other-arguments", "")``."""
        reply = await self._run(CREATE, self._run_keys(run_id, STATE, LOG), [workflow, started, args_digest])
        kind = text(reply[0])
        if kind == "new":
            await self._index_run(run_id, int(reply[1]))
            return kind, ""
        return kind, text(reply[1]) if len(reply) > 1 else ""

    async def renew(self, run_id: str, epoch: int, lease: float) -> tuple[bool, str | None]:
        """Extend the lease: ``(held, cancel reason or None)``; held is False once taken over."""
        reply = await self._run(RENEW, [self.key(run_id, STATE)], [epoch, int(lease * 1000)])
        if not int(reply[0]):
            return False, None
        return True, text(reply[1]) or None

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

    async def finish(
        self, run_id: str, epoch: int, *, status: str, event: bytes, field: str, value: bytes, failed_seq: int | None,
        seen: int | None = None,
    ) -> str:  # fmt: skip
        """Record the run's end (completed, failed, blocked or cancelled); returns its parent run or ``""``.

        Raises:
            _Suspend: the run was taken over (fenced), or its log rolled back (see `append`).
        """
        args: list[Arg] = [epoch, status, event, field, value, "" if failed_seq is None else failed_seq, _seen(seen)]
        reply = await self._run(FINISH, self._run_keys(run_id, STATE, LOG), args)
        if int(reply[0]) < 0:
            raise _refused(run_id, int(reply[0]))
        return text(reply[1])

    async def release(self, run_id: str, epoch: int, *, pending: bool = False) -> None:
        """Give up the lease at once (the run stays resumable by anyone).

        With `pending`, a running run also becomes ``pending``: it was handed
        back to the queue and waits for a worker. Fenced (nothing happens) once
        another holder took the run over.
        """
        await self._run(RELEASE, [self.key(run_id, STATE)], [epoch, "1" if pending else ""])

    async def cancel(self, run_id: str, reason: str, event: bytes) -> tuple[str, str]:
        """Cancel a run: ``(outcome, parent)``; outcome is cancelled, requested (its live
        holder stops at the next step), already-completed, already-cancelled or missing."""
        reply = await self._run(CANCEL, self._run_keys(run_id, STATE, LOG), [reason, event])
        return text(reply[0]), text(reply[1])


def _seen(seen: int | None) -> Arg:
    return "" if seen is None else seen


def _refused(run_id: str, code: int) -> _Suspend:
    """What a run write refused with `code` (-1 fenced, -2 rolled back) raises."""
    if code == -2:
        return _Suspend(run_id, "the server's log of this run is shorter than this process saw (the server came "
                        "back from an older state); this one stops, and the run resumes from the log")  # fmt: skip
    return _Suspend(run_id, "another process took this run over; this one stops writing")
