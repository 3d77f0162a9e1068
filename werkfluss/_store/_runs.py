"""The run family's ownership: create a run, take it over, renew and release its lease, cancel it, and their Lua.

Every write is one script on the run's keys (``P{R}:state``, ``:log``) that
is idempotent: redis-py re-sends a command whose reply was lost. A takeover
raises the run's epoch, which fences out the previous holder's writes (see
`_run_log`). Lease times come from the server's clock (``TIME``), never from
a worker's. A new run also enters the run index (``Pruns``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from ._connect import CLOCK, NOW, Connection, Script, text
from ._keys import LOG, STATE

if TYPE_CHECKING:
    from ._lane import Arg

# KEYS: state, log. ARGV: holder, lease_ms, workflow ('' accepts any), run-started
# event ('' never creates), run-resumed event, holder to take over ('' none),
# digest of the arguments ('' skips the check), '1' to resume a failed or
# blocked run, parent run ('' none), the caller's process prefix ('' none): a
# holder under it is busy even past its lease, since only that process can
# tell whether it still executes (it passes the holder to take over if not),
# the tag of the queue partition a new run belongs to ('' the default queue), and
# the tag a worker's message came from ('' any): a run of another queue partition
# is reported 'elsewhere', not taken (a wake-up that reached the wrong queue), and
# the ms a new run's deadline allows ('' or 0: none; due on the timer clock). A
# run past its deadline that nobody live holds is reported 'expired', not taken:
# the caller cancels it (`_engine._run_deadline`).
ACQUIRE = Script(
    "ACQUIRE",
    CLOCK
    + """
local holder, lease_ms, workflow, started, resumed = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local take_over, args, retry, parent, process = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local queue, route, allowed = ARGV[11], ARGV[12], tonumber(ARGV[13]) or 0
local cur = redis.call('HMGET', KEYS[1], 'status', 'workflow', 'holder', 'lease', 'cancel', 'queue',
                       'deadline', 'allowed')
if not cur[1] then
  if started == '' then return {'missing'} end
  redis.call('HSET', KEYS[1], 'status', 'running', 'workflow', workflow, 'holder', holder,
             'lease', now + tonumber(lease_ms), 'epoch', 1, 'n', 1, 'created', now, 'updated', now,
             'args', args, 'parent', parent)
  if queue ~= '' then redis.call('HSET', KEYS[1], 'queue', queue) end
  local deadline = ''
  if allowed > 0 then
    deadline = clock + allowed
    redis.call('HSET', KEYS[1], 'deadline', deadline, 'allowed', allowed)
  end
  redis.call('XADD', KEYS[2], '0-1', 'e', started)
  return {'new', 1, now, deadline, allowed}
end
if workflow ~= '' and cur[2] ~= workflow then return {'conflict', cur[2]} end
local home = cur[6] or ''
if home == '' then home = 'q' end
if route ~= '' and route ~= home then return {'elsewhere', home} end
if args ~= '' and redis.call('HGET', KEYS[1], 'args') ~= args then return {'other-arguments'} end
local status = cur[1]
if status == 'completed' then return {'completed', redis.call('HGET', KEYS[1], 'result')} end
if status == 'cancelled' then return {'cancelled', cur[5] or ''} end
if (status == 'failed' or status == 'blocked') and retry ~= '1' then return {'ended', status} end
if status == 'running' and cur[3] ~= '' and cur[3] ~= holder and cur[3] ~= take_over
   and (tonumber(cur[4]) > now or (process ~= '' and string.sub(cur[3], 1, #process) == process)) then
  return {'busy', cur[3], tonumber(cur[4]) - now, cur[2], cur[6] or ''}
end
if cur[7] and tonumber(cur[7]) <= clock then return {'expired', cur[7], cur[8] or '0', cur[6] or ''} end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', resumed)
redis.call('HSET', KEYS[1], 'status', 'running', 'holder', holder,
           'lease', now + tonumber(lease_ms), 'updated', now)
redis.call('HDEL', KEYS[1], 'waiting', 'due')
if status == 'failed' then
  -- Remember which step failed the run: the replay re-executes it instead
  -- of replaying its recorded failure (failures recorded up to index n).
  redis.call('HSET', KEYS[1], 'retry_seq', redis.call('HGET', KEYS[1], 'failed_seq') or '', 'retry_index', n)
end
local more = redis.call('HMGET', KEYS[1], 'retry_seq', 'retry_index')
return {'resumed', epoch, status, more[1] or '', more[2] or '', cur[2], cur[5] or '', cur[6] or '',
        cur[7] or '', cur[8] or ''}
""",
    clocked=True,
)

# KEYS: state, log. ARGV: workflow, run-started event, digest of the arguments,
# its queue partition's tag ('' the default queue), ms until its delayed start (0 none),
# ms its deadline allows (0 none; counted from now on the timer clock).
# Creates a pending run for the queue; an existing run is reported, not touched.
CREATE = Script(
    "CREATE",
    CLOCK
    + """
local workflow, started, args, queue, delay = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local allowed = tonumber(ARGV[6]) or 0
local cur = redis.call('HMGET', KEYS[1], 'status', 'workflow', 'queue')
if not cur[1] then
  redis.call('HSET', KEYS[1], 'status', 'pending', 'workflow', workflow, 'holder', '', 'lease', 0,
             'epoch', 0, 'n', 1, 'created', now, 'updated', now, 'args', args, 'parent', '')
  if queue ~= '' then redis.call('HSET', KEYS[1], 'queue', queue) end
  if delay > 0 then redis.call('HSET', KEYS[1], 'due', clock + delay) end
  if allowed > 0 then redis.call('HSET', KEYS[1], 'deadline', clock + allowed, 'allowed', allowed) end
  redis.call('XADD', KEYS[2], '0-1', 'e', started)
  return {'new', now, queue}
end
if cur[2] ~= workflow then return {'conflict', cur[2], cur[3] or ''} end
if redis.call('HGET', KEYS[1], 'args') ~= args then return {'other-arguments', '', cur[3] or ''} end
return {'exists', cur[1], cur[3] or ''}
""",
    clocked=True,
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

# KEYS: state, log. ARGV: reason, run-cancelled event, a holder known to be gone ('' none).
# A run held by a live process is only marked: its holder stops at the next
# step boundary and records the end. Anything else ends here, fencing out
# whatever process may still think it holds the run.
CANCEL = Script(
    "CANCEL",
    NOW
    + """
local reason, event, gone = ARGV[1], ARGV[2], ARGV[3] or ''
local cur = redis.call('HMGET', KEYS[1], 'status', 'holder', 'lease', 'parent')
if not cur[1] then return {'missing', ''} end
if cur[1] == 'completed' or cur[1] == 'cancelled' then return {'already-' .. cur[1], cur[4] or ''} end
if cur[1] == 'running' and cur[2] ~= '' and cur[2] ~= gone and tonumber(cur[3]) > now then
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

SCRIPTS = (ACQUIRE, CREATE, RENEW, RELEASE, CANCEL)


AcquireKind = Literal[
    "new",
    "resumed",
    "completed",
    "busy",
    "cancelled",
    "ended",
    "missing",
    "conflict",
    "other-arguments",
    "elsewhere",
    "expired",
]
"""What `RedisStore.acquire` found (see `AcquireResult`)."""


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """What `RedisStore.acquire` found: ``kind`` is new, resumed, completed, busy,
    cancelled, ended (failed or blocked, not resumed), missing, conflict
    (another workflow's run), other-arguments, or elsewhere (a run of another
    queue partition, `queue`, than the worker's message came from), or expired (its
    deadline passed and no live process holds it: not taken). `cancel` is a pending
    cancel's reason. `deadline` is when the run's deadline passes (Unix time on the
    timer clock, None for none), `allowed` how long it allowed (seconds).

    `deadline` is known for new, resumed and expired runs."""

    kind: AcquireKind
    epoch: int = 0
    previous: str = ""
    result: bytes = b""
    holder: str = ""
    lease_left: float = 0.0
    workflow: str = ""
    retry_seq: int | None = None
    retry_index: int = 0
    cancel: str | None = None
    queue: str = ""
    deadline: float | None = None
    allowed: float = 0.0


def _deadline(due: Any, allowed: Any) -> tuple[float | None, float]:
    """A run's ``deadline`` and ``allowed`` fields as a script returns them (ms, ``''`` for none)."""
    try:
        due_ms, allowed_ms = int(due), int(allowed or 0)
    except (TypeError, ValueError):
        return None, 0.0
    return (due_ms / 1000 if due_ms else None), allowed_ms / 1000


class RedisRuns(Connection):
    """Who holds a run: create it, take it over, renew or give up the lease, cancel it."""

    async def _index_run(self, run_id: str, created_ms: int) -> None:
        """Add a new run to the index of runs by creation time."""
        await self._send("ZADD", self.runs_key, "NX", created_ms, run_id)

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
        queue: str = "",
        route: str = "",
        deadline: float | None = None,
    ) -> AcquireResult:
        """Create run `run_id` or take it over; see `AcquireResult` for the outcomes.

        An empty `workflow`, `started` or `args_digest` means: accept any
        workflow, never create, do not compare arguments (what a worker
        passes, knowing only the run ID). `retry` lets a failed or blocked
        run resume. A holder whose name starts with `process` (the caller's
        own process) is reported busy even past its lease. `deadline`: the
        seconds a new run may take, counted on the timer clock from now.
        """
        args: list[Arg] = [
            holder,
            int(lease * 1000),
            workflow,
            started,
            resumed,
            take_over,
            args_digest,
            "1" if retry else "",
            parent,
            process,
            queue,
            route,
            int(deadline * 1000) if deadline else "",
        ]
        reply = await self._run(ACQUIRE, self._run_keys(run_id, STATE, LOG), args)
        kind = text(reply[0])
        if kind == "new":
            await self._index_run(run_id, int(reply[2]))
            due, allowed = _deadline(reply[3], reply[4])
            return AcquireResult(
                "new", epoch=int(reply[1]), workflow=workflow, queue=queue, deadline=due, allowed=allowed
            )
        if kind == "resumed":
            due, allowed = _deadline(reply[8], reply[9])
            return AcquireResult(
                "resumed",
                epoch=int(reply[1]),
                previous=text(reply[2]),
                retry_seq=int(reply[3]) if reply[3] else None,
                retry_index=int(reply[4]) if reply[4] else 0,
                workflow=text(reply[5]),
                cancel=text(reply[6]) if reply[6] else None,
                queue=text(reply[7]),
                deadline=due,
                allowed=allowed,
            )
        if kind == "expired":
            due, allowed = _deadline(reply[1], reply[2])
            return AcquireResult("expired", deadline=due, allowed=allowed, queue=text(reply[3]))
        if kind == "completed":
            return AcquireResult("completed", result=bytes(reply[1] or b""))
        if kind == "busy":
            return AcquireResult(
                "busy",
                holder=text(reply[1]),
                lease_left=int(reply[2]) / 1000,
                workflow=text(reply[3]),
                queue=text(reply[4]),
            )
        if kind == "conflict":
            return AcquireResult("conflict", workflow=text(reply[1]))
        if kind == "cancelled":
            return AcquireResult("cancelled", cancel=text(reply[1]))
        if kind == "ended":
            return AcquireResult("ended", previous=text(reply[1]))
        if kind == "elsewhere":
            return AcquireResult("elsewhere", queue=text(reply[1]))
        return AcquireResult(cast("AcquireKind", kind))  # missing, other-arguments

    async def create(
        self,
        run_id: str,
        *,
        workflow: str,
        started: bytes,
        args_digest: str,
        queue: str = "",
        delay: float = 0,
        deadline: float | None = None,
    ) -> tuple[str, str, str]:
        """Create a pending run for queue partition `queue`, due in `delay` seconds, with
        `deadline` seconds to finish (counted from now on the timer clock; None for no deadline):
        ``(kind, detail, queue)``: ``("new", "", queue)``, ``("exists", status, its queue)``,
        ``("conflict", workflow, its queue)`` or ``("other-arguments", "", its queue)``."""
        allowed = int(deadline * 1000) if deadline else 0
        args: list[Arg] = [workflow, started, args_digest, queue, max(int(delay * 1000), 0), allowed]
        reply = await self._run(CREATE, self._run_keys(run_id, STATE, LOG), args)
        kind = text(reply[0])
        if kind == "new":
            await self._index_run(run_id, int(reply[1]))
            return kind, "", queue
        return kind, text(reply[1]), text(reply[2])

    async def renew(self, run_id: str, epoch: int, lease: float) -> tuple[bool, str | None]:
        """Extend the lease: ``(held, cancel reason or None)``; held is False once taken over."""
        reply = await self._run(RENEW, [self.key(run_id, STATE)], [epoch, int(lease * 1000)])
        if not int(reply[0]):
            return False, None
        return True, text(reply[1]) or None

    async def release(self, run_id: str, epoch: int, *, pending: bool = False) -> None:
        """Give up the lease at once (the run stays resumable by anyone).

        With `pending`, a running run also becomes ``pending``: it was handed
        back to the queue and waits for a worker. Fenced (nothing happens) once
        another holder took the run over.
        """
        await self._run(RELEASE, [self.key(run_id, STATE)], [epoch, "1" if pending else ""])

    async def cancel(self, run_id: str, reason: str, event: bytes, *, gone: str = "") -> tuple[str, str]:
        """Cancel a run: ``(outcome, parent)``; outcome is cancelled, requested (its live
        holder stops at the next step), already-completed, already-cancelled or missing.
        `gone` names a holder known to be gone: its lease does not make the run live."""
        reply = await self._run(CANCEL, self._run_keys(run_id, STATE, LOG), [reason, event, gone])
        return text(reply[0]), text(reply[1])
