"""The queue family: each queue partition's stream of "run or resume R" (``P{q}:queue``), dead letters, and their Lua.

Workers read a queue in one consumer group; a message idle past the lease
(its worker is gone) is reclaimed by another, and one delivered too often goes
to the dead letters (``P{q}:dead``) with its last error (``P{q}:errors``).
Every method takes the queue partition's tag (`queue`, default ``q``). On a
queue with limits, finishing a message also frees its run's slot (`_flow`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .._errors import StorageError
from ._connect import Connection, Script, entry_fields, text
from ._flow import FLOW, SUBMIT
from ._keys import DEAD, DEFAULT_TAG, DELAYED, ERRORS, PROBATION, QUEUE, RUN, WAIT

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._lane import Arg

# KEYS: queue, dead, errors, probation. ARGV: group, consumer, min idle ms, how many
# to look at, max deliveries, cursor ('-' at first), '1' if this consumer may take a
# suspect, how many others it takes at most, then the IDs of the messages it holds
# (idle past the lease only while its renewals stall: claiming them would count a
# delivery that never happened).
# Claims messages idle past the lease (their worker is gone). A worker that died
# while a message was on probation there (`probation`: consumer -> message) is
# taken to have been killed by that message: its other messages are claimed with
# their delivery count unchanged. Any other message of a dead worker is a suspect:
# claimed one at a time (its count raised, the claimer's probation naming it), so
# that a run killing every worker it lands on is the only one whose count grows.
# Deliveries counted before a hand-back come in field 'd'; a message delivered
# max deliveries times goes to the dead letters with its last error instead.
# Returns {next cursor or '0-0', {id, fields, 1 if suspect}..., {run, reason}...}.
RECLAIM = Script(
    "RECLAIM",
    FLOW
    + """
local L = limits()
local group, me, min_idle_ms, limit, max = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local cursor, may, wanted = ARGV[6], ARGV[7] == '1', tonumber(ARGV[8])
local held = {}
for i = 9, #ARGV do held[ARGV[i]] = true end
local pending = redis.call('XPENDING', KEYS[1], group, 'IDLE', min_idle_ms, cursor, '+', limit)
local out, dead, last = {}, {}, ''
for _, p in ipairs(pending) do
  local id, owner, times = p[1], p[2], tonumber(p[4])
  last = id
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found == 0 then
    redis.call('XACK', KEYS[1], group, id)  -- deleted while pending
  elseif not (owner == me and held[id]) then
    local fields, run, before = found[1][2], '', 0
    for i = 1, #fields, 2 do
      if fields[i] == 'r' then run = fields[i + 1] end
      if fields[i] == 'd' then before = tonumber(fields[i + 1]) or 0 end
    end
    local blamed = redis.call('HGET', KEYS[4], owner)
    if blamed and blamed ~= id then
      if wanted > 0 then
        wanted = wanted - 1
        redis.call('XCLAIM', KEYS[1], group, me, 0, id, 'RETRYCOUNT', times)
        table.insert(out, {id, fields, 0})
      end
    elseif times + before >= max then
      local err = redis.call('HGET', KEYS[3], id) or 'no worker finished it'
      local total = times + before
      local reason = 'delivered ' .. total .. ' times without finishing; last error: ' .. err
      redis.call('XADD', KEYS[2], '*', 'r', run, 'message', id, 'deliveries', total, 'at', now, 'reason', reason)
      table.insert(dead, {run, reason})
      redis.call('XACK', KEYS[1], group, id)
      redis.call('XDEL', KEYS[1], id)
      redis.call('HDEL', KEYS[3], id)
      release(L, run, true)
    elseif may then
      may = false
      redis.call('XCLAIM', KEYS[1], group, me, 0, id)
      redis.call('HSET', KEYS[4], me, id)
      table.insert(out, {id, fields, 1})
    end
    if blamed and #redis.call('XPENDING', KEYS[1], group, '-', '+', 1, owner) == 0 then
      redis.call('HDEL', KEYS[4], owner)
    end
  end
end
local nxt = '0-0'
if #pending == limit then nxt = '(' .. last end
return {nxt, out, dead}
""",
)

# KEYS: probation. ARGV: consumer, message. Ends that message's probation, and only
# its: the consumer's next suspect may be on probation already.
END_PROBATION = Script(
    "END_PROBATION",
    """
local consumer, message = ARGV[1], ARGV[2]
if redis.call('HGET', KEYS[1], consumer) == message then return redis.call('HDEL', KEYS[1], consumer) end
return 0
""",
)

# KEYS: queue. ARGV: group, consumer, ids...
# Resets the idle time of the messages this consumer still owns (never steals
# one back from a worker that claimed it); returns the ids still owned.
TOUCH = Script(
    "TOUCH",
    """
local group, consumer = ARGV[1], ARGV[2]
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], group, ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == consumer then
    redis.call('XCLAIM', KEYS[1], group, consumer, 0, ARGV[i], 'JUSTID')
    table.insert(owned, ARGV[i])
  end
end
return owned
""",
)

# KEYS: queue, errors. ARGV: group, then (id, run, '1' if the run ended) for each
# message done with: acknowledged and deleted, its run's slot freed.
ACK = Script(
    "ACK",
    FLOW
    + """
local group, L = ARGV[1], limits()
for i = 2, #ARGV, 3 do
  redis.call('XACK', KEYS[1], group, ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  if ARGV[i + 1] ~= '' then release(L, ARGV[i + 1], ARGV[i + 2] == '1') end
end
return (#ARGV - 1) / 3
""",
)

# KEYS: queue. ARGV: group, id, run, '1' if it may resume a failed run. A fresh
# message replaces one handed back (a graceful stop): readable at once by any
# worker. It carries the deliveries counted so far in 'd', but for this one,
# which ended cleanly, so that a run that keeps killing workers still reaches
# the dead letters, and one handed back at every deploy never does.
REQUEUE = Script(
    "REQUEUE",
    FLOW
    + """
local group, id, run, retry = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local fields = {'r', run}
if retry == '1' then table.insert(fields, 'x'); table.insert(fields, '1') end
local before = 0
local found = redis.call('XRANGE', KEYS[1], id, id)
if #found > 0 then
  local old = found[1][2]
  for i = 1, #old, 2 do if old[i] == 'd' then before = tonumber(old[i + 1]) or 0 end end
end
local p = redis.call('XPENDING', KEYS[1], group, id, id, 1)
local counted = before + (p[1] and tonumber(p[1][4]) or 1) - 1
if counted > 0 then table.insert(fields, 'd'); table.insert(fields, counted) end
local fresh = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('XACK', KEYS[1], group, id)
redis.call('XDEL', KEYS[1], id)
if limits().flow then  -- it keeps its slot: one more admitted message for a worker to read
  redis.call('HINCRBY', K('config'), 'ready', 1)
  ring('requeue')
end
return fresh
""",
)

# KEYS: queue, dead, errors. ARGV: group, id, run, reason.
DEAD_LETTER = Script(
    "DEAD_LETTER",
    FLOW
    + """
local group, id, run, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local p = redis.call('XPENDING', KEYS[1], group, id, id, 1)
local times = p[1] and tonumber(p[1][4]) or 1
redis.call('XADD', KEYS[2], '*', 'r', run, 'message', id, 'deliveries', times, 'at', now, 'reason', reason)
redis.call('XACK', KEYS[1], group, id)
redis.call('XDEL', KEYS[1], id)
redis.call('HDEL', KEYS[3], id)
release(limits(), run, true)
return 1
""",
)

# KEYS: queue, dead. ARGV: dead-letter id. Puts the run back on the queue,
# allowed to resume even a failed or blocked run (on a queue with limits, it waits
# for admission). Returns the dead letter's id, or '' if there is none.
REDRIVE = Script(
    "REDRIVE",
    FLOW
    + """
local dead_id = ARGV[1]
local found = redis.call('XRANGE', KEYS[2], dead_id, dead_id)
if #found == 0 then return '' end
local fields, run = found[1][2], ''
for i = 1, #fields, 2 do if fields[i] == 'r' then run = fields[i + 1] end end
redis.call('XDEL', KEYS[2], dead_id)
if run == '' then return '' end
enqueue(limits(), run, '1')
return dead_id
""",
)

SCRIPTS = (RECLAIM, END_PROBATION, TOUCH, ACK, REQUEUE, DEAD_LETTER, REDRIVE)


class RedisQueue(Connection):
    """A queue partition: enqueue, read, reclaim, acknowledge, dead-letter and redrive messages."""

    async def queued_runs(self, limit: int, *, queue: str = DEFAULT_TAG) -> set[str] | None:
        """The runs with a message in the queue (waiting, or taken and not yet
        acknowledged), waiting for admission or for a delayed start, or None when
        it holds more than `limit` messages."""
        key = self.queue_key(QUEUE, queue)
        if int(await self._call(self.client.xlen(key))) > limit:
            return None
        runs: set[str] = set()
        start = "-"
        while True:
            entries = await self._send("XRANGE", key, start, "+", "COUNT", 1000)
            runs.update(entry_fields(fields).get(RUN, "") for _, fields in entries)
            if len(entries) < 1000:
                break
            start = f"({text(entries[-1][0])}"
        waiting = await self._call(self.client.hkeys(self.queue_key(WAIT, queue)))
        delayed = await self._call(self.client.zrange(self.queue_key(DELAYED, queue), 0, -1))
        runs.update(text(r) for r in [*waiting, *delayed])
        runs.discard("")
        return runs

    # -- the queue --------------------------------------------------------------------

    async def ensure_group(self, group: str, *, queue: str = DEFAULT_TAG) -> None:
        """Create the consumer group (reading from the start of the queue) if missing."""
        try:
            await self._call(self.client.xgroup_create(self.queue_key(QUEUE, queue), group, id="0", mkstream=True))
        except StorageError as exc:
            if "BUSYGROUP" not in str(exc):  # it exists: what was asked for
                raise

    async def enqueue(self, run_id: str, *, retry: bool = False, queue: str = DEFAULT_TAG) -> None:
        """Put "run or resume `run_id`" on the queue (on one with limits: to wait for admission)."""
        await self._run(SUBMIT, [self.queue_key(QUEUE, queue)], [run_id, "1" if retry else "", "", 0])

    async def read_queue(
        self, group: str, consumer: str, count: int, block: float, *, queue: str = DEFAULT_TAG
    ) -> list[tuple[str, dict[str, str]]]:
        """Up to `count` new messages for `consumer`, waiting up to `block` seconds."""
        key, ms = self.queue_key(QUEUE, queue), int(block * 1000)
        reply = await self._send(
            "XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", ms, "STREAMS", key, ">"
        )
        # RESP3 answers with a map, stream -> entries (None when BLOCK ran out).
        return [(text(i), entry_fields(f)) for entries in (reply or {}).values() for i, f in entries]

    async def reclaim(
        self,
        group: str,
        consumer: str,
        min_idle: float,
        count: int,
        max_deliveries: int,
        *,
        suspect: bool = True,
        held: Sequence[str] = (),
        queue: str = DEFAULT_TAG,
    ) -> tuple[list[tuple[str, dict[str, str], bool]], list[tuple[str, str]]]:
        """Claim messages idle longer than `min_idle` seconds (their worker is gone),
        dead-lettering those delivered `max_deliveries` times.

        A message of a worker that died with nothing on probation is a suspect: at
        most one is claimed (with `suspect`), and this consumer's probation names
        it until `end_probation`. Messages in `held` (this consumer's own, in
        progress) are left alone. Returns ``(id, fields, is suspect)`` of each
        claimed message, and ``(run ID, reason)`` of each dead letter.
        """
        keys = [self.queue_key(part, queue) for part in (QUEUE, DEAD, ERRORS, PROBATION)]
        claimed: list[tuple[str, dict[str, str], bool]] = []
        buried: list[tuple[str, str]] = []
        cursor, wanted = "-", count
        # Only messages idle past the lease come back from the scan: normally none at all.
        while wanted > 0 or suspect:
            args: list[Arg] = [
                group,
                consumer,
                int(min_idle * 1000),
                max(wanted, 16),
                max_deliveries,
                cursor,
                "1" if suspect else "",
                wanted,
                *held,
            ]
            nxt, entries, dead = await self._run(RECLAIM, keys, args)
            for i, f, flag in entries:
                claimed.append((text(i), entry_fields(f), bool(int(flag))))
                if int(flag):
                    suspect = False
                else:
                    wanted -= 1
            buried.extend((text(run), text(reason)) for run, reason in dead)
            cursor = text(nxt)
            if cursor == "0-0":
                break
        return claimed, buried

    async def end_probation(self, consumer: str, message: str, *, queue: str = DEFAULT_TAG) -> None:
        """`consumer`'s suspect `message` proved itself (or ended): a crash there now blames
        nobody in particular (unless its next suspect is on probation already)."""
        await self._run(END_PROBATION, [self.queue_key(PROBATION, queue)], [consumer, message])

    async def touch(self, group: str, consumer: str, ids: list[str], *, queue: str = DEFAULT_TAG) -> set[str]:
        """Reset the idle time of messages `consumer` still owns; returns those."""
        if not ids:
            return set()
        owned = await self._run(TOUCH, [self.queue_key(QUEUE, queue)], [group, consumer, *ids])
        return {text(i) for i in owned}

    async def ack(
        self, group: str, message: str, run_id: str = "", *, ended: bool = False, queue: str = DEFAULT_TAG
    ) -> None:
        """Acknowledge and delete a message whose progress is in the log; on a queue with
        limits, `run_id`'s slot is freed (and, once it `ended`, its key forgotten)."""
        keys = [self.queue_key(QUEUE, queue), self.queue_key(ERRORS, queue)]
        await self._run(ACK, keys, [group, message, run_id, "1" if ended else ""])

    async def requeue(
        self, group: str, message: str, run_id: str, *, retry: bool = False, queue: str = DEFAULT_TAG
    ) -> None:
        """Hand a message back as a fresh one, readable at once; the deliveries that
        failed before this one still count toward the dead letters."""
        await self._run(REQUEUE, [self.queue_key(QUEUE, queue)], [group, message, run_id, "1" if retry else ""])

    async def note_error(self, message: str, error: str, *, queue: str = DEFAULT_TAG) -> None:
        """Remember the last error a worker hit on `message` (for its dead letter)."""
        await self._call(self.client.hset(self.queue_key(ERRORS, queue), message, error[:2000]))

    async def dead_letter(
        self, group: str, message: str, run_id: str, reason: str, *, queue: str = DEFAULT_TAG
    ) -> None:
        """Move `message` to the dead letters with `reason`."""
        keys = [self.queue_key(QUEUE, queue), self.queue_key(DEAD, queue), self.queue_key(ERRORS, queue)]
        await self._run(DEAD_LETTER, keys, [group, message, run_id, reason[:2000]])

    async def bury(self, run_id: str, source: str, reason: str, *, queue: str = DEFAULT_TAG) -> None:
        """Add a dead letter for something other than a queue message (a malformed
        hook payload): `source` says where it came from."""
        at = int(time.time() * 1000)
        fields = {"r": run_id, "source": source, "at": at, "reason": reason[:2000]}
        await self._call(self.client.xadd(self.queue_key(DEAD, queue), fields))  # type: ignore[arg-type]

    async def dead_letters(self, limit: int, *, queue: str = DEFAULT_TAG) -> list[tuple[str, dict[str, str]]]:
        """The dead letters, oldest first."""
        entries = await self._send("XRANGE", self.queue_key(DEAD, queue), "-", "+", "COUNT", limit)
        return [(text(i), entry_fields(f)) for i, f in entries]

    async def redrive(self, dead_id: str, *, queue: str = DEFAULT_TAG) -> str:
        """Put a dead letter's run back on its queue; returns the dead letter's ID, ``""`` if there is none."""
        keys = [self.queue_key(QUEUE, queue), self.queue_key(DEAD, queue)]
        return text(await self._run(REDRIVE, keys, [dead_id]))

    async def queue_depth(self, group: str, *, queue: str = DEFAULT_TAG) -> tuple[int, int]:
        """``(messages not yet delivered, messages pending)`` for `group`."""
        try:
            groups = await self._call(self.client.xinfo_groups(self.queue_key(QUEUE, queue)))
        except StorageError as exc:
            if "no such key" in str(exc).lower():
                return 0, 0
            raise
        for info in groups:
            if text(info.get("name", b"")) == group:
                lag = info.get("lag")
                return int(lag or 0), int(info.get("pending", 0))
        return 0, 0
