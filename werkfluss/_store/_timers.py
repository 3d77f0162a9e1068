"""The timers: when each run is due next (``P{q}:timers``), the nudge workers wait on (``P{q}:nudge``), and their Lua.

Timers share their queue partition's hash slot (``{q}``, ``{q:N}``): a due
timer moves to the queue in the same script, and so does a delayed start
(``P{q}:delayed``). Every method takes the partition's tag (`queue`).
"""

from __future__ import annotations

from ._connect import CLOCK, Connection, Script
from ._deadline import SOCKET_TIMEOUT
from ._flow import FLOW
from ._keys import DEFAULT_TAG, NUDGE, QUEUE, SWEEP, TIMERS

# Wake-ups are pushed: a timer entry that is due at once, or sooner than every other,
# also leaves a nudge in the list KEYS[2] (at most one: LTRIM), for which each
# worker's timer loop waits with BLPOP. It moves the due entries at once, and
# otherwise sleeps until the next one is due, without polling.
_NUDGE = """
local function nudge(run_ms)
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if run_ms <= clock or not head[2] or run_ms <= tonumber(head[2]) then
    redis.call('LPUSH', KEYS[2], 1)
    redis.call('LTRIM', KEYS[2], 0, 0)
  end
end
"""

# KEYS: timers, nudge. ARGV: run, ms from now. Makes the run due then, unless it is due
# sooner (a delay, not a time: the server's clock, never the caller's).
WAKE = Script(
    "WAKE",
    CLOCK
    + _NUDGE
    + """
local run, delay_ms = ARGV[1], ARGV[2]
local at = clock + tonumber(delay_ms)
nudge(at)
redis.call('ZADD', KEYS[1], 'LT', at, run)
return 1
""",
    clocked=True,
)

# KEYS: queue, timers. ARGV: how many at most. Moves due timers and due delayed
# starts to the queue (on one with limits: to wait for admission); returns
# {moved, ms until the next is due or -1}.
MOVE_DUE = Script(
    "MOVE_DUE",
    FLOW
    + """
local clock = now + tonumber(ARGV[#ARGV])
local limit, L = tonumber(ARGV[1]), limits()
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', clock, 'LIMIT', 0, limit)
for _, run in ipairs(due) do
  enqueue(L, run, '0')
  redis.call('ZREM', KEYS[2], run)
end
local starts = redis.call('ZRANGEBYSCORE', K('delayed'), '-inf', clock, 'LIMIT', 0, limit)
for _, run in ipairs(starts) do
  enqueue(L, run, redis.call('HGET', K('delayedx'), run) or '0')
  redis.call('ZREM', K('delayed'), run)
  redis.call('HDEL', K('delayedx'), run)
end
local wait = -1
for _, key in ipairs({KEYS[2], K('delayed')}) do
  local nxt = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if nxt[2] then
    local ms = math.max(tonumber(nxt[2]) - clock, 0)
    if wait < 0 or ms < wait then wait = ms end
  end
end
return {#due + #starts, wait}
""",
    clocked=True,
)

# KEYS: timers. ARGV: run, ms to push the entry by.
# A process waiting on its own run takes a due entry by pushing it forward
# (if the process then dies, the entry comes due again). Returns 1 if taken.
CLAIM_TIMER = Script(
    "CLAIM_TIMER",
    CLOCK
    + """
local run, push_ms = ARGV[1], ARGV[2]
local s = redis.call('ZSCORE', KEYS[1], run)
if s and tonumber(s) <= clock then
  redis.call('ZADD', KEYS[1], clock + tonumber(push_ms), run)
  return 1
end
return 0
""",
    clocked=True,
)

# KEYS: timers, nudge. ARGV: run, due ms ('' removes the entry).
# A due entry is a wake-up nobody has handled yet: it is kept. Returns 1 if set.
RESCHEDULE = Script(
    "RESCHEDULE",
    CLOCK
    + _NUDGE
    + """
local run, due_ms = ARGV[1], ARGV[2]
local s = redis.call('ZSCORE', KEYS[1], run)
if s and tonumber(s) <= clock then return 0 end
if due_ms == '' then redis.call('ZREM', KEYS[1], run)
else
  nudge(tonumber(due_ms))
  redis.call('ZADD', KEYS[1], tonumber(due_ms), run)
end
return 1
""",
    clocked=True,
)

SCRIPTS = (WAKE, MOVE_DUE, CLAIM_TIMER, RESCHEDULE)


class RedisTimers(Connection):
    """Timers: set, moved to the queue when due, and waited for."""

    async def wake(self, run_id: str, after: float = 0.0, *, queue: str = DEFAULT_TAG) -> None:
        """Make run `run_id` due `after` seconds from now (default: now), unless it is due sooner.

        Workers learn of it at once (a nudge), not at their next look. The time
        counts from the server's clock, never the caller's.
        """
        delay = max(int(after * 1000), 0)
        await self._run(WAKE, [self.queue_key(TIMERS, queue), self.queue_key(NUDGE, queue)], [run_id, delay])

    async def reschedule(self, run_id: str, at: float | None, *, queue: str = DEFAULT_TAG) -> None:
        """Set (or with None remove) the run's timer, keeping a wake-up that is already due."""
        keys = [self.queue_key(TIMERS, queue), self.queue_key(NUDGE, queue)]
        await self._run(RESCHEDULE, keys, [run_id, "" if at is None else int(at * 1000)])

    async def unschedule(self, run_id: str, *, queue: str = DEFAULT_TAG) -> None:
        """Remove the run's timer entry."""
        # On the fast lane: every start() run that ends removes its watchdog (see _engine._drive).
        await self._send("ZREM", self.queue_key(TIMERS, queue), run_id)

    async def due(self, run_ids: list[str], *, queue: str = DEFAULT_TAG) -> list[float | None]:
        """When each run is due next (Unix time), None for no entry."""
        scores = await self._call(self.client.zmscore(self.queue_key(TIMERS, queue), run_ids))
        return [None if s is None else float(s) / 1000 for s in scores]

    async def claim_timer(self, run_id: str, push: float, *, queue: str = DEFAULT_TAG) -> bool:
        """Take the run's due timer entry by pushing it `push` seconds ahead."""
        return bool(await self._run(CLAIM_TIMER, [self.queue_key(TIMERS, queue)], [run_id, int(push * 1000)]))

    async def move_due(self, limit: int = 100, *, queue: str = DEFAULT_TAG) -> tuple[int, float | None]:
        """Move due timers and delayed starts to the queue: ``(moved, seconds until the next is due, or None)``."""
        keys = [self.queue_key(QUEUE, queue), self.queue_key(TIMERS, queue)]
        moved, wait = await self._run(MOVE_DUE, keys, [limit])
        return int(moved), None if int(wait) < 0 else int(wait) / 1000

    async def wait_for_nudge(self, block: float, *, queue: str = DEFAULT_TAG) -> bool:
        """Block up to `block` seconds for a nudge (a timer entry due now or sooner than
        the rest); returns whether one came. One waiting worker takes each nudge."""
        key = self.queue_key(NUDGE, queue)
        # Within the socket timeout, which a longer BLPOP would run into.
        seconds = f"{min(max(block, 0.001), SOCKET_TIMEOUT - 2):.3f}"
        return await self._send("BLPOP", key, seconds) is not None

    async def claim_sweep(self, holder: str, seconds: float, *, key: str = SWEEP) -> bool:
        """Whether `holder` may sweep the run index for stuck runs now: one sweep per
        `seconds` among all workers of this prefix (the queue's `key`, expiring)."""
        key = self.queue_key(key)
        return bool(await self._call(self.client.set(key, holder, nx=True, px=max(1, int(seconds * 1000)))))
