"""Flow control on a queue's own slot: admission by concurrency, per-key turns, rate windows and priority, and its Lua.

A queue with limits (a declared `Queue` with any) keeps its waiting runs out
of the stream: each run waits in its key's sorted set (``P{q:N}:k:<key>``,
by priority, then arrival), and the keys with a run that may start take
turns in the ring (``P{q:N}:ring``). A worker asks for as many runs as it has
free slots (`ADMIT`): the script admits runs while the limits allow, adds them
to the stream, and reads them for the worker in the same call, so the
priority and the turns hold at the moment a worker asks. An admitted run
holds its slot (``P{q:N}:active``) until its message is acknowledged (it
ended or paused), dead-lettered, or handed back and done elsewhere; a
worker that dies keeps it for the worker that claims its message. The slot
is never freed by a clock, so no crash lets more runs execute than the limit.

Every script here derives its keys from ``KEYS[1]``, the queue's stream
(``P{q:N}:queue``): the keys of one queue share its hash tag, so on a Redis
Cluster they all live on that stream's slot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._errors import QueueDeclarationWarning
from .._queues import DEFAULT_QUEUE
from ._connect import NOW, Connection, Script, entry_fields, text, warn_user
from ._deadline import SOCKET_TIMEOUT
from ._keys import BELL, CONFIG, QUEUE, QUEUES

if TYPE_CHECKING:
    from .._queues import Queue
    from ._lane import Arg

# How long a declaration of a queue stands against a different one after the last
# process made it (workers make theirs again at every look at their timers): a
# deploy that changes a queue's limits takes over once the old processes are gone.
DECLARATION_STANDS = 60.0

# The queue's other keys, from its stream's name; the queue's limits; a run's
# priority, whether its next admission is its start, and its key ('prio|start|key'
# in 'meta'); and how runs wait, take turns and are admitted.
FLOW = (
    NOW
    + """
local SHIFT, HALF = 4398046511104, 2199023255552  -- 2^42 scores per priority; resumes first within one
local base = string.sub(KEYS[1], 1, #KEYS[1] - 5)
local function K(part) return base .. part end
local function limits()
  local c = redis.call('HMGET', K('config'), 'flow', 'concurrency', 'per_key', 'rate', 'window', 'key_rate',
                       'key_window')
  return {flow = c[1] == '1', concurrency = tonumber(c[2]) or 0, per_key = tonumber(c[3]) or 0,
          rate = tonumber(c[4]) or 0, window = tonumber(c[5]) or 0, key_rate = tonumber(c[6]) or 0,
          key_window = tonumber(c[7]) or 0}
end
local function meta_of(run)
  local m = redis.call('HGET', K('meta'), run)
  if m then
    local prio, start, key = string.match(m, '^(%d+)|(%d)|(.*)$')
    if prio then return tonumber(prio), start == '1', key end
  end
  return 5, false, ''
end
local function ring(who)
  redis.call('LPUSH', K('bell'), who)
  redis.call('LTRIM', K('bell'), 0, 0)
end
local function running(key) return tonumber(redis.call('HGET', K('running'), key)) or 0 end
-- The key takes its turn in the ring if a run of it may start: by its head's
-- priority, then by when it last had a turn (round robin across keys).
local function ring_add(L, key)
  if L.per_key > 0 and running(key) >= L.per_key then redis.call('ZREM', K('ring'), key) return end
  if redis.call('ZSCORE', K('later'), key) then return end
  local head = redis.call('ZRANGE', K('k:' .. key), 0, 0, 'WITHSCORES')
  if not head[1] then redis.call('ZREM', K('ring'), key) return end
  local prio = math.floor((tonumber(head[2]) + HALF) / SHIFT)
  local cur = redis.call('ZSCORE', K('ring'), key)
  local turn
  if cur then
    cur = tonumber(cur)
    turn = cur - math.floor(cur / SHIFT) * SHIFT
  else
    turn = redis.call('HINCRBY', K('config'), 'turn', 1)
  end
  redis.call('ZADD', K('ring'), prio * SHIFT + turn, key)
end
-- A run waits for admission (once: a second wake-up of a waiting run only adds its retry flag).
local function submit(L, run, retry)
  local w = redis.call('HGET', K('wait'), run)
  if w then
    if retry == '1' then redis.call('HSET', K('wait'), run, '1') end
    return 0
  end
  local prio, start, key = meta_of(run)
  local seq = redis.call('HINCRBY', K('config'), 'seq', 1)
  local score = prio * SHIFT + seq
  if not start then score = score - HALF end
  redis.call('HSET', K('wait'), run, retry == '1' and '1' or '0')
  redis.call('ZADD', K('k:' .. key), score, run)
  ring_add(L, key)
  return 1
end
-- Into the stream: admitted (flow) or at once (no limits).
local function enqueue(L, run, retry)
  if L.flow then
    if submit(L, run, retry) == 1 then ring('submit') end
    return
  end
  if retry == '1' then redis.call('XADD', KEYS[1], '*', 'r', run, 'x', '1')
  else redis.call('XADD', KEYS[1], '*', 'r', run) end
end
-- ms until a start fits in the sliding window `rkey`, nil if one fits now.
local function full(rkey, limit, window)
  redis.call('ZREMRANGEBYSCORE', rkey, '-inf', now - window)
  if redis.call('ZCARD', rkey) < limit then return nil end
  local oldest = redis.call('ZRANGE', rkey, 0, 0, 'WITHSCORES')
  return math.max(tonumber(oldest[2]) + window - now, 1)
end
local function count_start(rkey, window, run)  -- a run starts once: its ID is a unique member
  redis.call('ZADD', rkey, now, run)
  redis.call('PEXPIRE', rkey, window)
end
-- Admits up to `max` runs into the stream; returns {admitted, ms until a rate window reopens or -1}.
local function admit(L, max)
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', K('later'), '-inf', now, 'LIMIT', 0, 100)) do
    redis.call('ZREM', K('later'), key)
    ring_add(L, key)
  end
  local admitted, wait, guard = 0, -1, 0
  local busy = L.concurrency > 0 and redis.call('HLEN', K('active')) or 0
  local function soonest(ms) if wait < 0 or ms < wait then wait = ms end end
  while admitted < max and guard < max + 100 do
    guard = guard + 1
    if L.concurrency > 0 and busy >= L.concurrency then break end
    local top = redis.call('ZRANGE', K('ring'), 0, 0)
    if not top[1] then break end
    local key = top[1]
    local head = redis.call('ZRANGE', K('k:' .. key), 0, 0)
    if not head[1] then
      redis.call('ZREM', K('ring'), key)
    else
      local run = head[1]
      local retry = redis.call('HGET', K('wait'), run) or '0'
      if redis.call('HEXISTS', K('active'), run) == 1 then
        -- Executing already: this wake-up waits for that execution to end (see release).
        redis.call('ZREM', K('k:' .. key), run)
        redis.call('HDEL', K('wait'), run)
        if redis.call('HGET', K('again'), run) ~= '1' then redis.call('HSET', K('again'), run, retry) end
        ring_add(L, key)
      else
        local prio, start = meta_of(run)
        local blocked = false
        if start and L.rate > 0 then
          local ms = full(K('rate'), L.rate, L.window)
          if ms then soonest(ms) break end
        end
        if start and L.key_rate > 0 then
          local ms = full(K('rate:' .. key), L.key_rate, L.key_window)
          if ms then
            soonest(ms)
            blocked = true
            redis.call('ZREM', K('ring'), key)
            redis.call('ZADD', K('later'), now + ms, key)
          end
        end
        if not blocked then
          redis.call('ZREM', K('k:' .. key), run)
          redis.call('HDEL', K('wait'), run)
          redis.call('HSET', K('active'), run, key)
          local held = redis.call('HINCRBY', K('running'), key, 1)
          if retry == '1' then redis.call('XADD', KEYS[1], '*', 'r', run, 'x', '1')
          else redis.call('XADD', KEYS[1], '*', 'r', run) end
          if start then
            if L.rate > 0 then count_start(K('rate'), L.window, run) end
            if L.key_rate > 0 then count_start(K('rate:' .. key), L.key_window, run) end
            redis.call('HSET', K('meta'), run, prio .. '|0|' .. key)
          end
          -- The key's turn is over: behind the other keys, if it may start another run.
          local nxt = {}
          if L.per_key == 0 or held < L.per_key then nxt = redis.call('ZRANGE', K('k:' .. key), 0, 0, 'WITHSCORES') end
          if nxt[1] then
            local turn = redis.call('HINCRBY', K('config'), 'turn', 1)
            redis.call('ZADD', K('ring'), math.floor((tonumber(nxt[2]) + HALF) / SHIFT) * SHIFT + turn, key)
          else
            redis.call('ZREM', K('ring'), key)
          end
          admitted, busy = admitted + 1, busy + 1
        end
      end
    end
  end
  if admitted > 0 then redis.call('HINCRBY', K('config'), 'ready', admitted) end
  return admitted, wait
end
-- The run's message is done with: its slot is free (the key may take a turn again);
-- a wake-up that came while it executed waits for admission now; an ended run's
-- meta and deduplication ID are forgotten.
local function release(L, run, ended)
  local key = redis.call('HGET', K('active'), run)
  if key then
    redis.call('HDEL', K('active'), run)
    if redis.call('HINCRBY', K('running'), key, -1) <= 0 then redis.call('HDEL', K('running'), key) end
    ring_add(L, key)
    ring('release')
  end
  local again = redis.call('HGET', K('again'), run)
  if again then redis.call('HDEL', K('again'), run) end
  if ended then
    redis.call('HDEL', K('meta'), run)
    local d = redis.call('HGET', K('dedupof'), run)
    if d then
      if redis.call('HGET', K('dedup'), d) == run then redis.call('HDEL', K('dedup'), d) end
      redis.call('HDEL', K('dedupof'), run)
    end
  elseif again and L.flow then
    submit(L, run, again)
  end
end
"""
)

# KEYS: queue. ARGV: run, '1' if it may resume a failed run, its meta ('' keeps what
# there is), ms to wait before it may start (0: now). A delayed run waits in
# 'delayed' (the workers' timer loops move it when due); any other goes into the
# stream (no limits) or waits for admission. Returns when it is due (server ms).
SUBMIT = Script(
    "SUBMIT",
    FLOW
    + """
local run, retry, meta, delay = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local clock = now + tonumber(ARGV[#ARGV])
if meta ~= '' then redis.call('HSET', K('meta'), run, meta) end
if delay > 0 then
  redis.call('ZADD', K('delayed'), clock + delay, run)
  if retry == '1' then redis.call('HSET', K('delayedx'), run, '1') end
  redis.call('LPUSH', K('nudge'), 1)
  redis.call('LTRIM', K('nudge'), 0, 0)
  return clock + delay
end
redis.call('ZREM', K('delayed'), run)
enqueue(limits(), run, retry)
return clock
""",
    clocked=True,
)

# KEYS: queue. ARGV: group, consumer, how many. Admits up to that many waiting
# runs and reads them (and any admitted before, not yet read) for the consumer.
# Returns {entries, ms until a rate window reopens or -1, runs still waiting}.
ADMIT = Script(
    "ADMIT",
    FLOW
    + """
local group, me, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
local L = limits()
local ready = tonumber(redis.call('HGET', K('config'), 'ready')) or 0
local _, wait = admit(L, math.max(want - ready, 0))
local reply = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', want, 'STREAMS', KEYS[1], '>')
local entries = {}
if reply then entries = reply[1][2] end
ready = tonumber(redis.call('HGET', K('config'), 'ready')) or 0
if #entries < want then ready = 0 else ready = math.max(ready - #entries, 0) end
redis.call('HSET', K('config'), 'ready', ready)
local left = redis.call('ZCARD', K('ring'))
-- Runs that may start are left, and this worker took all it asked for: the next worker's turn.
if left > 0 and #entries == want then ring('more') end
return {entries, wait, left}
""",
)

# KEYS: queue. ARGV: the declaration's fields and values (see `Queue.config`), then
# for how many ms a different declaration stands after it was last made. A
# different one made more recently is kept: returns {'other', declared, ms ago};
# else this one is stored (or refreshed): {'ok'}.
DECLARE = Script(
    "DECLARE",
    NOW
    + """
local base = string.sub(KEYS[1], 1, #KEYS[1] - 5)
local key = base .. 'config'
local stands = tonumber(ARGV[#ARGV])
local cur = redis.call('HMGET', key, 'declared', 'seen')
local mine
for i = 1, #ARGV - 1, 2 do if ARGV[i] == 'declared' then mine = ARGV[i + 1] end end
local ago = now - (tonumber(cur[2]) or 0)
if cur[1] and cur[1] ~= mine and ago < stands then return {'other', cur[1], ago} end
for i = 1, #ARGV - 1, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
redis.call('HSET', key, 'seen', now)
return {'ok'}
""",
)

# KEYS: queue. ARGV: deduplication ID, run, the run it may replace ('' none). Claims
# the ID for the run; returns '' when it did, else the run that holds it.
DEDUP = Script(
    "DEDUP",
    """
local base = string.sub(KEYS[1], 1, #KEYS[1] - 5)
local d, run, previous = ARGV[1], ARGV[2], ARGV[3]
local cur = redis.call('HGET', base .. 'dedup', d)
if cur and cur ~= run and cur ~= previous then return cur end
if cur and cur ~= run then redis.call('HDEL', base .. 'dedupof', cur) end
redis.call('HSET', base .. 'dedup', d, run)
redis.call('HSET', base .. 'dedupof', run, d)
return ''
""",
)

# KEYS: queue. ARGV: run. A cancelled (or otherwise ended) run stops waiting for
# admission and forgets its meta; a slot it holds stays until its message is done.
FORGET = Script(
    "FORGET",
    FLOW
    + """
local run = ARGV[1]
local _, _, key = meta_of(run)
if redis.call('HDEL', K('wait'), run) == 1 then
  redis.call('ZREM', K('k:' .. key), run)
  ring_add(limits(), key)
end
redis.call('ZREM', K('delayed'), run)
redis.call('HDEL', K('delayedx'), run)
if not redis.call('HGET', K('active'), run) then release(limits(), run, true) end
return 1
""",
)

# KEYS: queue. ARGV: group, how many keys to look at. Reads a queue partition's figures
# (read only): {runs waiting for admission, slots held, delayed runs, stream length,
# messages pending in `group`, undelivered messages (-1: unknown), the oldest undelivered
# entry's ID or '', whether keys were left out, then per key looked at: key, its
# admitted runs, its waiting runs, the run at the head of its line ('' none)}. The keys
# with waiting runs are those in the ring (a run may start), in 'later' (rate window
# full) and in 'running' (the others wait for their key's slots).
FIGURES = Script(
    "FIGURES",
    """
local base = string.sub(KEYS[1], 1, #KEYS[1] - 5)
local function K(part) return base .. part end
local group, budget = ARGV[1], tonumber(ARGV[2])
local pending, lag, last = 0, -1, nil
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g - 1, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then
      pending, last = tonumber(info['pending']) or 0, info['last-delivered-id']
      if type(info['lag']) == 'number' then lag = info['lag'] end
    end
  end
end
local length = redis.call('XLEN', KEYS[1])
if lag < 0 then lag = math.max(length - pending, 0) end  -- delivered messages are deleted once done with
local first = redis.call('XRANGE', KEYS[1], last and ('(' .. last) or '-', '+', 'COUNT', 1)
local oldest = first[1] and first[1][1] or ''
local seen, keys, cut = {}, {}, 0
local function add(key)
  if seen[key] then return end
  if #keys >= budget then cut = 1 return end
  seen[key] = true
  keys[#keys + 1] = key
end
for _, part in ipairs({'ring', 'later'}) do
  if redis.call('ZCARD', K(part)) > budget then cut = 1 end
  for _, key in ipairs(redis.call('ZRANGE', K(part), 0, budget - 1)) do add(key) end
end
if redis.call('HLEN', K('running')) > budget then
  cut = 1
  local scan = redis.call('HSCAN', K('running'), 0, 'COUNT', budget)
  for i = 1, #scan[2], 2 do add(scan[2][i]) end
else
  for _, key in ipairs(redis.call('HKEYS', K('running'))) do add(key) end
end
local out = {redis.call('HLEN', K('wait')), redis.call('HLEN', K('active')), redis.call('ZCARD', K('delayed')),
             length, pending, lag, oldest, cut}
for _, key in ipairs(keys) do
  local head = redis.call('ZRANGE', K('k:' .. key), 0, 0)
  out[#out + 1] = key
  out[#out + 1] = tonumber(redis.call('HGET', K('running'), key)) or 0
  out[#out + 1] = redis.call('ZCARD', K('k:' .. key))
  out[#out + 1] = head[1] or ''
end
return out
""",
)

# KEYS: queue. ARGV: run, group, how many undelivered messages to look through. Why the
# run has not started (read only): {'delayed', due ms}; {'per_key', key, admitted, limit};
# {'concurrency', held, limit}; {'key_rate', key, limit, window ms}; {'rate', limit,
# window ms}; {'turn', runs ahead} (waiting for admission, nothing full: its turn);
# {'stream', messages ahead or -1 for more than looked through} (a queue without limits);
# {''} (not waiting here: admitted, read by a worker, or not on this queue).
WHY = Script(
    "WHY",
    NOW
    + """
local base = string.sub(KEYS[1], 1, #KEYS[1] - 5)
local function K(part) return base .. part end
local run, group, budget = ARGV[1], ARGV[2], tonumber(ARGV[3])
local due = redis.call('ZSCORE', K('delayed'), run)
if due then return {'delayed', tonumber(due)} end
local c = redis.call('HMGET', K('config'), 'flow', 'concurrency', 'per_key', 'rate', 'window', 'key_rate',
                     'key_window')
if c[1] == '1' then
  if redis.call('HEXISTS', K('wait'), run) == 0 then return {''} end
  local prio, start, key = string.match(redis.call('HGET', K('meta'), run) or '', '^(%d+)|(%d)|(.*)$')
  if not prio then start, key = '0', '' end
  local per_key, running = tonumber(c[3]) or 0, tonumber(redis.call('HGET', K('running'), key)) or 0
  if per_key > 0 and running >= per_key then return {'per_key', key, running, per_key} end
  local concurrency, held = tonumber(c[2]) or 0, redis.call('HLEN', K('active'))
  if concurrency > 0 and held >= concurrency then return {'concurrency', held, concurrency} end
  if start == '1' then
    local key_rate, key_window = tonumber(c[6]) or 0, tonumber(c[7]) or 0
    if key_rate > 0 and (redis.call('ZSCORE', K('later'), key)
        or redis.call('ZCOUNT', K('rate:' .. key), '(' .. (now - key_window), '+inf') >= key_rate) then
      return {'key_rate', key, key_rate, key_window}
    end
    local rate, window = tonumber(c[4]) or 0, tonumber(c[5]) or 0
    if rate > 0 and redis.call('ZCOUNT', K('rate'), '(' .. (now - window), '+inf') >= rate then
      return {'rate', rate, window}
    end
  end
  local ahead = redis.call('ZRANK', K('k:' .. key), run) or 0
  return {'turn', ahead + (redis.call('ZRANK', K('ring'), key) or 0)}
end
local last = nil
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g - 1, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then last = info['last-delivered-id'] end
  end
end
local entries = redis.call('XRANGE', KEYS[1], last and ('(' .. last) or '-', '+', 'COUNT', budget)
for i, entry in ipairs(entries) do
  local fields = entry[2]
  for j = 1, #fields - 1, 2 do
    if fields[j] == 'r' and fields[j + 1] == run then return {'stream', i - 1} end
  end
end
if #entries >= budget then return {'stream', -1} end
return {''}
""",
)

SCRIPTS = (SUBMIT, ADMIT, DECLARE, DEDUP, FORGET, FIGURES, WHY)


class RedisFlow(Connection):
    """A queue's flow control: declare its limits, submit runs, take admitted ones, read its figures."""

    async def declare_queue(
        self, tag: str, config: dict[str, str], *, stands: float = DECLARATION_STANDS
    ) -> str | None:
        """Store (or refresh) a queue partition's limits; returns None, or a different
        declaration made less than `stands` seconds ago, with how long ago."""
        args: list[Arg] = [v for pair in config.items() for v in pair]
        reply = await self._run(DECLARE, [self.queue_key(QUEUE, tag)], [*args, int(stands * 1000)])
        if text(reply[0]) == "ok":
            return None
        return f"{text(reply[1])} ({int(reply[2]) / 1000:.0f} s ago)"

    async def ensure_queue(self, queue: Queue, *, refresh: bool = False) -> str | None:
        """Declare `queue`'s limits on the server, once per connection (again with `refresh`).

        The limits in force are the store's, whoever declared them: a different
        declaration another process made (or renewed) in the last
        `DECLARATION_STANDS` seconds stays in force, and this one waits. That is
        reported (an error on the werkfluss logger, else a `QueueDeclarationWarning`)
        naming both, once per process, and returned; this
        declaration takes over at a later `refresh` (a worker's, every 20 s)
        once the other is no longer renewed: a deploy that changes a queue's
        limits needs no step by hand, and old and new workers never flap.
        """
        declared: dict[str, str | None] = self.__dict__.setdefault("_declared", {})
        if queue.name == DEFAULT_QUEUE or (queue.name in declared and not refresh):
            return declared.get(queue.name)
        if queue.name not in declared:
            await self._call(self.client.hset(self.prefix + QUEUES, queue.name, queue.partitions))
        conflict = None
        for partition, tag in enumerate(queue.tags()):
            other = await self.declare_queue(tag, queue.config(partition))
            if other is not None:
                conflict = (
                    f"queue {queue.name!r} is declared as {queue.describe()} here, but another process "
                    f"declared it as {other}: those limits stay in force while a process keeps declaring "
                    f"them; this declaration takes over {DECLARATION_STANDS:.0f} s after the last one stopped"
                )
                break
        if conflict is not None and declared.get(queue.name) != conflict:
            warn_user(QueueDeclarationWarning, logging.ERROR, "%s", conflict)
        declared[queue.name] = conflict
        return conflict

    async def known_queues(self) -> dict[str, int]:
        """The queues declared on this server (with limits): name -> partitions."""
        raw = await self._call(self.client.hgetall(self.prefix + QUEUES))
        return {text(k): int(v) if text(v).isdigit() else 1 for k, v in raw.items()}

    async def submit(self, run_id: str, *, queue: str, retry: bool = False, meta: str = "", delay: float = 0) -> int:
        """Put "run or resume `run_id`" on queue partition `queue`: into its stream (no limits),
        to wait for admission, or (with `delay` seconds) into its delayed set. Returns when
        it is due (server ms)."""
        args: list[Arg] = [run_id, "1" if retry else "", meta, max(int(delay * 1000), 0)]
        return int(await self._run(SUBMIT, [self.queue_key(QUEUE, queue)], args))

    async def admit(
        self, group: str, consumer: str, count: int, *, queue: str
    ) -> tuple[list[tuple[str, dict[str, str]]], float | None, int]:
        """Admit up to `count` runs of a limited queue and read them for `consumer`:
        ``(messages, seconds until a rate window reopens or None, keys with a run that may start)``."""
        entries, wait, left = await self._run(ADMIT, [self.queue_key(QUEUE, queue)], [group, consumer, count])
        messages = [(text(i), entry_fields(f)) for i, f in entries or []]
        return messages, None if int(wait) < 0 else int(wait) / 1000, int(left)

    async def wait_for_bell(self, block: float, *, queue: str) -> bool:
        """Block up to `block` seconds until a limited queue may admit a run (one was
        submitted, or a slot freed); one waiting worker takes each ring."""
        seconds = f"{min(max(block, 0.001), SOCKET_TIMEOUT - 2):.3f}"
        return await self._send("BLPOP", self.queue_key(BELL, queue), seconds) is not None

    async def claim_dedup(self, dedup: str, run_id: str, *, queue: str, previous: str = "") -> str:
        """Claim deduplication ID `dedup` for `run_id`; ``""`` if claimed, else the run holding it."""
        return text(await self._run(DEDUP, [self.queue_key(QUEUE, queue)], [dedup, run_id, previous]))

    async def forget_waiting(self, run_id: str, *, queue: str) -> None:
        """Stop a run (cancelled) from waiting for admission or its delayed start."""
        await self._run(FORGET, [self.queue_key(QUEUE, queue)], [run_id])

    async def queue_config(self, tag: str) -> dict[str, str]:
        """A queue partition's stored declaration and counters (empty if never declared)."""
        raw = await self._call(self.client.hgetall(self.queue_key(CONFIG, tag)))
        return {text(k): text(v) for k, v in raw.items()}

    async def queue_figures(self, tag: str, *, group: str, keys: int = 1000) -> QueueFigures:
        """A queue partition's figures, read in one call (see `QueueFigures`); at most `keys`
        of its keys with runs are looked at."""
        raw = await self._run(FIGURES, [self.queue_key(QUEUE, tag)], [group, max(keys, 1)])
        head = [int(v) for v in raw[:6]]
        found = [(text(raw[i]), int(raw[i + 1]), int(raw[i + 2]), text(raw[i + 3])) for i in range(8, len(raw) - 3, 4)]
        return QueueFigures(
            waiting=head[0],
            active=head[1],
            delayed=head[2],
            length=head[3],
            pending=head[4],
            undelivered=head[5],
            oldest_entry=text(raw[6]),
            keys=found,
            keys_cut=bool(int(raw[7])),
        )

    async def why_waiting(self, run_id: str, *, queue: str, group: str, look: int = 1000) -> list[str]:
        """Why run `run_id` has not started on queue partition `queue`: the reply of the WHY
        script as text (``[""]`` when it does not wait there)."""
        raw = await self._run(WHY, [self.queue_key(QUEUE, queue)], [run_id, group, max(look, 1)])
        return [text(v) for v in raw]


@dataclass(frozen=True, slots=True)
class QueueFigures:
    """What one queue partition holds, as `RedisFlow.queue_figures` reads it.

    `waiting`: runs waiting for admission; `active`: slots held (admitted runs);
    `delayed`: runs waiting for their delayed start; `length`, `pending` and
    `undelivered`: the stream's messages, those read and not yet done with, those
    no worker read; `oldest_entry`: the ID of the oldest undelivered message (its
    time is when it was added), ``""`` none; `keys`: ``(key, admitted, waiting,
    run at the head of its line)`` for the keys with runs; `keys_cut`: whether
    some were left out.
    """

    waiting: int
    active: int
    delayed: int
    length: int
    pending: int
    undelivered: int
    oldest_entry: str
    keys: list[tuple[str, int, int, str]]
    keys_cut: bool
