"""The run family's forks: a new run whose log starts with another run's recorded calls, and their Lua.

A fork touches two runs, so two slots: the new run is written in one script
on its own keys (``P{R}:state``, ``:log``, ``:steps``), from events the caller
read from the original's log first; the original then learns of its fork in a
second script on its state. Both are idempotent (redis-py may re-send them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from ._connect import CLOCK, Connection, Script, text
from ._keys import LOG, STATE, STEPS

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._lane import Arg

# KEYS: state, log, steps of the new run. ARGV: workflow, digest of the arguments,
# queue partition tag ('' the default queue), ms its deadline allows (0 none; from
# now on the timer clock), forked_from ('<run>@<seq>'), its run-started event, then
# (dedup field, event) pairs: the log's entries 0-2, 0-3, ... Creates the run
# pending; an existing run is reported with what it was forked from ('' none).
FORK = Script(
    "FORK",
    CLOCK
    + """
local workflow, args, queue, allowed, origin = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]) or 0, ARGV[5]
local cur = redis.call('HMGET', KEYS[1], 'status', 'forked_from')
if cur[1] then return {'exists', cur[2] or ''} end
redis.call('XADD', KEYS[2], '0-1', 'e', ARGV[6])
local n = 1
for i = 7, #ARGV - 2, 2 do
  n = n + 1
  redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[i + 1])
  redis.call('HSET', KEYS[3], ARGV[i], n)
end
redis.call('HSET', KEYS[1], 'status', 'pending', 'workflow', workflow, 'holder', '', 'lease', 0,
           'epoch', 0, 'n', n, 'created', now, 'updated', now, 'args', args, 'parent', '',
           'forked_from', origin)
if queue ~= '' then redis.call('HSET', KEYS[1], 'queue', queue) end
if allowed > 0 then
  redis.call('HSET', KEYS[1], 'deadline', clock + allowed, 'allowed', allowed)
end
return {'new', now}
""",
    clocked=True,
)

# KEYS: state of the original run. ARGV: the fork's run ID. Adds it to the
# space-separated 'forks' field once (run IDs hold no whitespace).
FORKED = Script(
    "FORKED",
    """
local fork = ARGV[1]
if not redis.call('HGET', KEYS[1], 'status') then return 0 end
local forks = redis.call('HGET', KEYS[1], 'forks') or ''
for id in string.gmatch(forks, '%S+') do
  if id == fork then return 1 end
end
if forks == '' then forks = fork else forks = forks .. ' ' .. fork end
redis.call('HSET', KEYS[1], 'forks', forks)
return 1
""",
)

SCRIPTS = (FORK, FORKED)


class RedisForks(Connection):
    """A run started from another run's recorded calls, and the link back to it."""

    async def create_fork(
        self,
        run_id: str,
        *,
        workflow: str,
        args_digest: str,
        started: bytes,
        events: Sequence[tuple[str, bytes]],
        forked_from: str,
        queue: str = "",
        deadline: float | None = None,
    ) -> tuple[Literal["new", "exists"], str]:
        """Create pending run `run_id` whose log is `started` then `events` (each with the
        dedup field a holder would have recorded it under): ``("new", "")``, or
        ``("exists", what that run was forked from, "" for none)``. `deadline`: the seconds
        the run may take, counted on the timer clock from now."""
        args: list[Arg] = [workflow, args_digest, queue, int(deadline * 1000) if deadline else 0, forked_from, started]
        for dedup, event in events:
            args += [dedup, event]
        reply = await self._run(FORK, self._run_keys(run_id, STATE, LOG, STEPS), args)
        if text(reply[0]) == "new":
            await self._send("ZADD", self.runs_key, "NX", int(reply[1]), run_id)
            return "new", ""
        return "exists", text(reply[1])

    async def link_fork(self, run_id: str, fork: str) -> None:
        """Record on run `run_id` that run `fork` was forked from it (once)."""
        await self._run(FORKED, [self.key(run_id, STATE)], [fork])
