"""The timers: when each run is due next (``P{q}:timers``), the nudge workers wait on (``P{q}:nudge``), and their Lua.

Timers share the queue's hash slot (``{q}``): a due timer moves to the queue
in the same script.
"""

from __future__ import annotations

import time

from ._connect import NOW, Connection, Script
from ._deadline import SOCKET_TIMEOUT
from ._keys import NUDGE, QUEUE, SWEEP, TIMERS

# Wake-ups are pushed: a timer entry that is due at once, or sooner than every other,
# also leaves a nudge in the list KEYS[2] (at most one: LTRIM), for which each
# worker's timer loop waits with BLPOP. It moves the due entries at once, and
# otherwise sleeps until the next one is due, without polling.
_NUDGE = """
local function nudge(run_ms)
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if run_ms <= now or not head[2] or run_ms <= tonumber(head[2]) then
    redis.call('LPUSH', KEYS[2], 1)
    redis.call('LTRIM', KEYS[2], 0, 0)
  end
end
"""

# KEYS: timers, nudge. ARGV: run, ms from now. Makes the run due then, unless it is due
# sooner (a delay, not a time: the server's clock, never the caller's).
WAKE = Script(
    "WAKE",
    NOW
    + _NUDGE
    + """
local run, delay_ms = ARGV[1], ARGV[2]
local at = now + tonumber(delay_ms)
nudge(at)
redis.call('ZADD', KEYS[1], 'LT', at, run)
return 1
""",
)

# KEYS: timers, queue. ARGV: how many at most.
# Moves due timers to the queue; returns {moved, ms until the next is due or -1}.
MOVE_DUE = Script(
    "MOVE_DUE",
    NOW
    + """
local limit = ARGV[1]
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(limit))
for _, run in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'r', run)
  redis.call('ZREM', KEYS[1], run)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if not nxt[2] then return {#due, -1} end
return {#due, math.max(tonumber(nxt[2]) - now, 0)}
""",
)

# KEYS: timers. ARGV: run, ms to push the entry by.
# A process waiting on its own run takes a due entry by pushing it forward
# (if the process then dies, the entry comes due again). Returns 1 if taken.
CLAIM_TIMER = Script(
    "CLAIM_TIMER",
    NOW
    + """
local run, push_ms = ARGV[1], ARGV[2]
local s = redis.call('ZSCORE', KEYS[1], run)
if s and tonumber(s) <= now then
  redis.call('ZADD', KEYS[1], now + tonumber(push_ms), run)
  return 1
end
return 0
""",
)

# KEYS: timers, nudge. ARGV: run, due ms ('' removes the entry).
# A due entry is a wake-up nobody has handled yet: it is kept. Returns 1 if set.
RESCHEDULE = Script(
    "RESCHEDULE",
    NOW
    + _NUDGE
    + """
local run, due_ms = ARGV[1], ARGV[2]
local s = redis.call('ZSCORE', KEYS[1], run)
if s and tonumber(s) <= now then return 0 end
if due_ms == '' then redis.call('ZREM', KEYS[1], run)
else
  nudge(tonumber(due_ms))
  redis.call('ZADD', KEYS[1], tonumber(due_ms), run)
end
return 1
""",
)

SCRIPTS = (WAKE, MOVE_DUE, CLAIM_TIMER, RESCHEDULE)


class RedisTimers(Connection):
    """Timers: set, moved to the queue when due, and waited for."""

    async def wake(self, run_id: str, at: float | None = None) -> None:
        """Make run `run_id` due at Unix time `at` (default now), unless it is due sooner.

        Workers learn of it at once (a nudge), not at their next look. The time
        counts from the server's clock: `at` is taken as a delay from now here.
        """
        delay = 0 if at is None else max(int((at - time.time()) * 1000), 0)
        await self._run(WAKE, [self.queue_key(TIMERS), self.queue_key(NUDGE)], [run_id, delay])

    async def reschedule(self, run_id: str, at: float | None) -> None:
        """Set (or with None remove) the run's timer, keeping a wake-up that is already due."""
        keys = [self.queue_key(TIMERS), self.queue_key(NUDGE)]
        await self._run(RESCHEDULE, keys, [run_id, "" if at is None else int(at * 1000)])

    async def unschedule(self, run_id: str) -> None:
        """Remove the run's timer entry."""
        # On the fast lane: every start() run that ends removes its watchdog (see _engine._drive).
        await self._send("ZREM", self.queue_key(TIMERS), run_id)

    async def due(self, run_ids: list[str]) -> list[float | None]:
        """When each run is due next (Unix time), None for no entry."""
        scores = await self._call(self.client.zmscore(self.queue_key(TIMERS), run_ids))
        return [None if s is None else float(s) / 1000 for s in scores]

    async def claim_timer(self, run_id: str, push: float) -> bool:
        """Take the run's due timer entry by pushing it `push` seconds ahead."""
        return bool(await self._run(CLAIM_TIMER, [self.queue_key(TIMERS)], [run_id, int(push * 1000)]))

    async def move_due(self, limit: int = 100) -> tuple[int, float | None]:
        """Move due timers to the queue: ``(moved, seconds until the next is due, or None)``."""
        moved, wait = await self._run(MOVE_DUE, [self.queue_key(TIMERS), self.queue_key(QUEUE)], [limit])
        return int(moved), None if int(wait) < 0 else int(wait) / 1000

    async def wait_for_nudge(self, block: float) -> bool:
        """Block up to `block` seconds for a nudge (a timer entry due now or sooner than
        the rest); returns whether one came. One waiting worker takes each nudge."""
        key = self.queue_key(NUDGE)
        # Within the socket timeout, which a longer BLPOP would run into.
        seconds = f"{min(max(block, 0.001), SOCKET_TIMEOUT - 2):.3f}"
        return await self._send("BLPOP", key, seconds) is not None

    async def claim_sweep(self, holder: str, seconds: float, *, key: str = SWEEP) -> bool:
        """Whether `holder` may sweep the run index for stuck runs now: one sweep per
        `seconds` among all workers of this prefix (the queue's `key`, expiring)."""
        key = self.queue_key(key)
        return bool(await self._call(self.client.set(key, holder, nx=True, px=max(1, int(seconds * 1000)))))
