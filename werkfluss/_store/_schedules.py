"""A schedule's state on the server (``P{s:<name>}:schedule``, one hash per schedule) and its Lua.

Each script touches that one hash, so schedules spread over a Redis Cluster
like queues do. The hash says which tick was handled last (fired or
skipped), which run fired last, whether the schedule is paused, the trigger
requests no worker has fired yet, and the declaration in force (JSON, for
the command line, which does not import the schedule's module). ``last``
only moves forward, so workers do not redo a tick; exactly one run per tick
does not depend on it (the tick's run ID does). The names of the schedules
are kept in ``Pschedules``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._connect import CLOCK, NOW, Connection, Script, text
from ._keys import SCHEDULE, SCHEDULES, schedule_key

if TYPE_CHECKING:
    from ._lane import Arg

__all__ = ["SCRIPTS", "RedisSchedules", "ScheduleState"]

# How long a declaration of a schedule stands against a different one after the last
# worker renewed it, as for queues (`_flow.DECLARATION_STANDS`).
DECLARATION_STANDS = 60.0

# KEYS: the schedule. ARGV: the declaration (JSON), ms it stands against another.
# A different declaration renewed more recently than that is kept: {'other', it, ms
# ago}. Else this one is stored (renewed): {'ok'}. A new schedule starts from now:
# ticks before its first declaration are not missed ticks.
DECLARE = Script(
    "SCHEDULE_DECLARE",
    CLOCK
    + """
local mine, stands = ARGV[1], tonumber(ARGV[2])
local cur = redis.call('HMGET', KEYS[1], 'declared', 'seen', 'last')
local ago = now - (tonumber(cur[2]) or 0)
if cur[1] and cur[1] ~= mine and ago < stands then return {'other', cur[1], ago} end
redis.call('HSET', KEYS[1], 'declared', mine, 'seen', now)
if not cur[3] then redis.call('HSET', KEYS[1], 'last', clock) end
return {'ok'}
""",
    clocked=True,
)

# KEYS: the schedule. ARGV: tick (ms), holder, ms the claim lasts. One worker at a
# time decides a tick: 'done' (handled already), 'busy' (another's claim holds) or 'mine'.
CLAIM = Script(
    "SCHEDULE_CLAIM",
    NOW
    + """
local tick, me, lasts = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
if (tonumber(redis.call('HGET', KEYS[1], 'last')) or 0) >= tick then return 'done' end
local claim = redis.call('HGET', KEYS[1], 'claim')
if claim then
  local at, who, til = string.match(claim, '^(%d+)|(.*)|(%d+)$')
  if who and who ~= me and tonumber(til) > now then return 'busy' end
end
redis.call('HSET', KEYS[1], 'claim', tick .. '|' .. me .. '|' .. (now + lasts))
return 'mine'
""",
)

# KEYS: the schedule. ARGV: tick (ms), outcome ('fired', 'skipped' or 'held'), run
# ID (fired), how many ticks it stands for (skipped), '1' to end an overlap's wait.
# Moves 'last' forward to the tick (never back) and counts; 'held' notes the first
# tick waiting for the previous run instead. Returns 1 if it moved.
ADVANCE = Script(
    "SCHEDULE_ADVANCE",
    """
local tick, outcome, run, count, unhold = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local claim = redis.call('HGET', KEYS[1], 'claim')
local claimed = claim and tonumber(string.match(claim, '^(%d+)|'))
if claimed and claimed <= tick then redis.call('HDEL', KEYS[1], 'claim') end  -- a later tick's claim stays
if outcome == 'held' then
  if not redis.call('HGET', KEYS[1], 'held') then redis.call('HSET', KEYS[1], 'held', tick) end
  return 0
end
if (tonumber(redis.call('HGET', KEYS[1], 'last')) or 0) >= tick then return 0 end
redis.call('HSET', KEYS[1], 'last', tick)
if outcome == 'fired' then
  redis.call('HSET', KEYS[1], 'last_run', run, 'last_at', tick)
  redis.call('HINCRBY', KEYS[1], 'fired', 1)
else
  redis.call('HINCRBY', KEYS[1], 'skipped', count)
end
if unhold == '1' then redis.call('HDEL', KEYS[1], 'held') end
return 1
""",
)

# KEYS: the schedule. Stores a trigger request for a worker: {number, when (ms)},
# or {0} when no worker ever declared the schedule.
TRIGGER = Script(
    "SCHEDULE_TRIGGER",
    CLOCK
    + """
if redis.call('HEXISTS', KEYS[1], 'declared') == 0 then return {0, 0} end
local n = redis.call('HINCRBY', KEYS[1], 'triggers', 1)
redis.call('HSET', KEYS[1], 't:' .. n, clock)
return {n, clock}
""",
    clocked=True,
)

# KEYS: the schedule. ARGV: the trigger's number, its run ID, when it was requested.
# The trigger's run is on the queue: the request is done (once).
TRIGGERED = Script(
    "SCHEDULE_TRIGGERED",
    """
if redis.call('HDEL', KEYS[1], 't:' .. ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'last_run', ARGV[2], 'last_at', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'fired', 1)
end
return 1
""",
)

# KEYS: the schedule. ARGV: '1' pause, '0' resume. Resuming counts from now: the ticks of
# the pause are not missed ticks. Returns 0 when no worker ever declared the schedule.
PAUSE = Script(
    "SCHEDULE_PAUSE",
    CLOCK
    + """
if redis.call('HEXISTS', KEYS[1], 'declared') == 0 then return 0 end
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'paused', clock)
elseif redis.call('HDEL', KEYS[1], 'paused') == 1 then
  local last = tonumber(redis.call('HGET', KEYS[1], 'last')) or 0
  if clock > last then redis.call('HSET', KEYS[1], 'last', clock) end
  redis.call('HDEL', KEYS[1], 'held')
end
return 1
""",
    clocked=True,
)

# KEYS: the schedule. ARGV: the declaration. A worker stopping gracefully withdraws its
# declaration: a different one (a deploy's) takes over at once instead of a minute later.
# Workers that keep the same declaration renew it as before. Returns 1 if withdrawn.
WITHDRAW = Script(
    "SCHEDULE_WITHDRAW",
    """
if redis.call('HGET', KEYS[1], 'declared') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'seen', 0)
return 1
""",
)

SCRIPTS = (DECLARE, CLAIM, ADVANCE, TRIGGER, TRIGGERED, PAUSE, WITHDRAW)


def _int(value: str | None) -> int:
    return int(value) if value and value.lstrip("-").isdigit() else 0


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """A schedule's hash, read (times are Unix ms; `last` and `paused` on the timer clock, `seen` the server's)."""

    declared: str = ""
    seen: int = 0
    last: int = 0
    last_run: str = ""
    last_at: int = 0
    fired: int = 0
    skipped: int = 0
    paused: int = 0
    held: int = 0
    claim_until: int = 0  # when the latest claim on a tick runs out (the server's clock), 0 none
    triggers: list[tuple[int, int]] = field(default_factory=list)  # (number, requested at), oldest first

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> ScheduleState:
        """The state from the hash's fields (anything unreadable reads as absent)."""
        triggers = sorted((_int(k[2:]), _int(v)) for k, v in raw.items() if k.startswith("t:"))
        claim = raw.get("claim", "").rsplit("|", 1)
        return cls(
            declared=raw.get("declared", ""),
            seen=_int(raw.get("seen")),
            last=_int(raw.get("last")),
            last_run=raw.get("last_run", ""),
            last_at=_int(raw.get("last_at")),
            fired=_int(raw.get("fired")),
            skipped=_int(raw.get("skipped")),
            paused=_int(raw.get("paused")),
            held=_int(raw.get("held")),
            claim_until=_int(claim[1]) if len(claim) == 2 else 0,
            triggers=triggers,
        )


class RedisSchedules(Connection):
    """The schedules' state: declare, claim and advance ticks, pause, resume, trigger, read."""

    def _schedule(self, name: str) -> str:
        return schedule_key(self.prefix, name, SCHEDULE)

    async def declare_schedule(self, name: str, declared: str, *, stands: float = DECLARATION_STANDS) -> str | None:
        """Store (renew) schedule `name`'s declaration; returns None, or a different one renewed less
        than `stands` seconds ago (which stays in force), with how long ago."""
        await self._call(self.client.hset(self.prefix + SCHEDULES, name, ""))
        reply = await self._run(DECLARE, [self._schedule(name)], [declared, int(stands * 1000)])
        if text(reply[0]) == "ok":
            return None
        return f"{text(reply[1])} ({int(reply[2]) / 1000:.0f} s ago)"

    async def withdraw_schedule(self, name: str, declared: str) -> bool:
        """Stop standing for declaration `declared` of schedule `name` (a worker stopping).

        Returns False when another declaration is in force.
        """
        return bool(int(await self._run(WITHDRAW, [self._schedule(name)], [declared])))

    async def schedule_names(self) -> list[str]:
        """The names of the schedules ever declared on this server (and prefix), sorted."""
        return sorted(text(name) for name in await self._call(self.client.hkeys(self.prefix + SCHEDULES)))

    async def schedule_state(self, name: str) -> ScheduleState:
        """Schedule `name`'s state (empty when it was never declared)."""
        raw = await self._call(self.client.hgetall(self._schedule(name)))
        return ScheduleState.from_hash({text(k): text(v) for k, v in raw.items()})

    async def claim_tick(self, name: str, tick: int, holder: str, lasts: float) -> str:
        """Claim the tick at `tick` (ms) for `holder` for `lasts` seconds: ``done``, ``busy`` or ``mine``."""
        return text(await self._run(CLAIM, [self._schedule(name)], [tick, holder, int(lasts * 1000)]))

    async def advance_schedule(
        self, name: str, tick: int, outcome: str, *, run_id: str = "", count: int = 1, unhold: bool = False
    ) -> bool:
        """Record the tick at `tick` as ``fired`` (with `run_id`), ``skipped`` (standing for `count`
        ticks) or ``held`` (waiting for the previous run); returns whether `last` moved."""
        args: list[Arg] = [tick, outcome, run_id, count, "1" if unhold else ""]
        return bool(int(await self._run(ADVANCE, [self._schedule(name)], args)))

    async def trigger_schedule(self, name: str) -> tuple[int, int]:
        """Request a run of schedule `name` now: ``(its number, when, ms)``; ``(0, 0)``: never declared."""
        number, at = await self._run(TRIGGER, [self._schedule(name)], [])
        return int(number), int(at)

    async def triggered(self, name: str, number: int, run_id: str, at: int) -> None:
        """Trigger `number` of schedule `name` is on the queue as run `run_id`."""
        await self._run(TRIGGERED, [self._schedule(name)], [number, run_id, at])

    async def pause_schedule(self, name: str, paused: bool) -> bool:
        """Pause (or resume) schedule `name`; False when it was never declared."""
        return bool(int(await self._run(PAUSE, [self._schedule(name)], ["1" if paused else "0"])))
