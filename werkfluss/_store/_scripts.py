"""Every Lua script werkfluss runs, with the keys and arguments each takes.

Three families, one per Redis Cluster hash slot they touch:

- run scripts on ``P{R}:state``, ``P{R}:log``, ``P{R}:steps`` (one run);
- hook scripts on ``P{hook:T}:box``, ``P{hook:T}:meta``, ``P{hook:T}:keys``
  (one token);
- queue scripts on ``P{q}:queue``, ``P{q}:timers``, ``P{q}:dead``,
  ``P{q}:errors``, ``P{q}:probation`` (the queue is single-slot by design: one stream and one
  timer set that every worker shares).

A script never touches two families, so each is atomic on a Cluster too.
Every run write first compares the run's epoch (fencing) and is idempotent
where redis-py may re-send it. Times come from the server's clock (``TIME``),
in milliseconds.
"""

from __future__ import annotations

__all__ = [
    "ACK",
    "ACQUIRE",
    "APPEND",
    "CANCEL",
    "CLAIM_TIMER",
    "CONSUMED",
    "CREATE",
    "DEAD",
    "DELIVER",
    "END_PROBATION",
    "FINISH",
    "MOVE_DUE",
    "PAUSE",
    "RECLAIM",
    "REDRIVE",
    "RELEASE",
    "RENEW",
    "REQUEUE",
    "RESCHEDULE",
    "TAKE",
    "TOUCH",
    "WAKE",
]

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# -- run scripts ----------------------------------------------------------------------

# KEYS: state, log. ARGV: holder, lease_ms, workflow ('' accepts any), run-started
# event ('' never creates), run-resumed event, holder to take over ('' none),
# digest of the arguments ('' skips the check), '1' to resume a failed or
# blocked run, parent run ('' none), the caller's process prefix ('' none): a
# holder under it is busy even past its lease, since only that process can
# tell whether it still executes (it passes the holder to take over if not).
ACQUIRE = (
    _NOW
    + """
local cur = redis.call('HMGET', KEYS[1], 'status', 'workflow', 'holder', 'lease', 'cancel')
if not cur[1] then
  if ARGV[4] == '' then return {'missing'} end
  redis.call('HSET', KEYS[1], 'status', 'running', 'workflow', ARGV[3], 'holder', ARGV[1],
             'lease', now + tonumber(ARGV[2]), 'epoch', 1, 'n', 1, 'created', now, 'updated', now,
             'args', ARGV[7], 'parent', ARGV[9])
  redis.call('XADD', KEYS[2], '0-1', 'e', ARGV[4])
  return {'new', 1, now}
end
if ARGV[3] ~= '' and cur[2] ~= ARGV[3] then return {'conflict', cur[2]} end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'args') ~= ARGV[7] then return {'other-arguments'} end
local status = cur[1]
if status == 'completed' then return {'completed', redis.call('HGET', KEYS[1], 'result')} end
if status == 'cancelled' then return {'cancelled', cur[5] or ''} end
if (status == 'failed' or status == 'blocked') and ARGV[8] ~= '1' then return {'ended', status} end
if status == 'running' and cur[3] ~= '' and cur[3] ~= ARGV[1] and cur[3] ~= ARGV[6]
   and (tonumber(cur[4]) > now or (ARGV[10] ~= '' and string.sub(cur[3], 1, #ARGV[10]) == ARGV[10])) then
  return {'busy', cur[3], tonumber(cur[4]) - now, cur[2]}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[5])
redis.call('HSET', KEYS[1], 'status', 'running', 'holder', ARGV[1],
           'lease', now + tonumber(ARGV[2]), 'updated', now)
redis.call('HDEL', KEYS[1], 'waiting')
if status == 'failed' then
  -- Remember which step failed the run: the replay re-executes it instead
  -- of replaying its recorded failure (failures recorded up to index n).
  redis.call('HSET', KEYS[1], 'retry_seq', redis.call('HGET', KEYS[1], 'failed_seq') or '', 'retry_index', n)
end
local more = redis.call('HMGET', KEYS[1], 'retry_seq', 'retry_index')
return {'resumed', epoch, status, more[1] or '', more[2] or '', cur[2], cur[5] or ''}
"""
)

# KEYS: state, log. ARGV: workflow, run-started event, digest of the arguments.
# Creates a pending run for the queue; an existing run is reported, not touched.
CREATE = (
    _NOW
    + """
local cur = redis.call('HMGET', KEYS[1], 'status', 'workflow')
if not cur[1] then
  redis.call('HSET', KEYS[1], 'status', 'pending', 'workflow', ARGV[1], 'holder', '', 'lease', 0,
             'epoch', 0, 'n', 1, 'created', now, 'updated', now, 'args', ARGV[3], 'parent', '')
  redis.call('XADD', KEYS[2], '0-1', 'e', ARGV[2])
  return {'new', now}
end
if cur[2] ~= ARGV[1] then return {'conflict', cur[2]} end
if redis.call('HGET', KEYS[1], 'args') ~= ARGV[3] then return {'other-arguments'} end
return {'exists', cur[1]}
"""
)

# KEYS: state. ARGV: epoch, lease_ms. Returns {1, cancel reason} or {0} if fenced.
RENEW = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return {0} end
redis.call('HSET', KEYS[1], 'lease', now + tonumber(ARGV[2]))
return {1, redis.call('HGET', KEYS[1], 'cancel') or ''}
"""
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
APPEND = (
    _NOW
    + _ROLLED_BACK
    + """
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'cancel')
if cur[1] ~= ARGV[1] then return {-1, ''} end
if rolled_back(ARGV[5]) then return {-2, ''} end
local cancel = cur[2] or ''
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then return {0, cancel} end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], n)
redis.call('HSET', KEYS[1], 'updated', now, 'lease', now + tonumber(ARGV[4]))
return {n, cancel}
"""
)

# KEYS: state, log. ARGV: epoch, run-paused event, encoded waits, seen.
# Returns {index, ''}, {0, cancel reason} when a cancel is pending, {-1} if fenced,
# {-2} if the log was rolled back.
PAUSE = (
    _NOW
    + _ROLLED_BACK
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return {-1, ''} end
if rolled_back(ARGV[4]) then return {-2, ''} end
local cancel = redis.call('HGET', KEYS[1], 'cancel')
if cancel then return {0, cancel} end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'paused', 'waiting', ARGV[3], 'holder', '', 'lease', 0, 'updated', now)
return {n, ''}
"""
)

# KEYS: state, log. ARGV: epoch, status, event, result-or-error field, its value,
# failed_seq, seen. Returns {index, parent run}; index -1 if fenced, -2 if the log
# was rolled back, 0 if already completed.
FINISH = (
    _NOW
    + _ROLLED_BACK
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return {-1, ''} end
if rolled_back(ARGV[7]) then return {-2, ''} end
local parent = redis.call('HGET', KEYS[1], 'parent') or ''
if redis.call('HGET', KEYS[1], 'status') == 'completed' then return {0, parent} end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[3])
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[4], ARGV[5], 'failed_seq', ARGV[6],
           'holder', '', 'lease', 0, 'updated', now)
redis.call('HDEL', KEYS[1], 'waiting')
return {n, parent}
"""
)

# KEYS: state. ARGV: epoch, '1' if the run goes back to the queue. Lets another
# process take over at once. A run handed back to the queue becomes 'pending'
# (waiting for a worker) instead of looking 'running' with nobody running it;
# ACQUIRE takes a pending run over like a released running one.
RELEASE = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease', 0, 'holder', '')
if ARGV[2] == '1' and redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'pending', 'updated', now)
end
return 1
"""
)

# KEYS: state, log. ARGV: reason, run-cancelled event.
# A run held by a live process is only marked: its holder stops at the next
# step boundary and records the end. Anything else ends here, fencing out
# whatever process may still think it holds the run.
CANCEL = (
    _NOW
    + """
local cur = redis.call('HMGET', KEYS[1], 'status', 'holder', 'lease', 'parent')
if not cur[1] then return {'missing', ''} end
if cur[1] == 'completed' or cur[1] == 'cancelled' then return {'already-' .. cur[1], cur[4] or ''} end
if cur[1] == 'running' and cur[2] ~= '' and tonumber(cur[3]) > now then
  redis.call('HSET', KEYS[1], 'cancel', ARGV[1])
  return {'requested', cur[4] or ''}
end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancel', ARGV[1], 'holder', '', 'lease', 0, 'updated', now)
redis.call('HDEL', KEYS[1], 'waiting')
return {'cancelled', cur[4] or ''}
"""
)

# -- hook scripts ---------------------------------------------------------------------

# KEYS: box, meta, keys. ARGV: encoded payload, delivery key ('' none), the
# call's nonce. Returns {entry id, owning run or '', 'stored' | 'waiting' |
# 'duplicate'}. A key already in `keys` (kept after its payload was consumed)
# stores nothing and returns the first delivery's entry: 'waiting' while that
# payload is still in the mailbox (its sender may have died before waking the
# run), 'duplicate' once taken; 'stored' again if that delivery was this very
# call, re-sent by redis-py after a lost reply.
DELIVER = (
    _NOW
    + """
local owner = redis.call('HGET', KEYS[2], 'owner') or ''
if ARGV[2] ~= '' then
  local seen = redis.call('HGET', KEYS[3], ARGV[2])
  if seen then
    local cut = string.find(seen, '/', 1, true)
    local by = cut and string.sub(seen, cut + 1) or ''
    local entry = cut and string.sub(seen, 1, cut - 1) or seen
    if by == ARGV[3] then return {entry, owner, 'stored'} end
    local waiting = #redis.call('XRANGE', KEYS[1], entry, entry) > 0
    return {entry, owner, waiting and 'waiting' or 'duplicate'}
  end
end
local id = redis.call('XADD', KEYS[1], '*', 'p', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], id .. '/' .. ARGV[3]) end
redis.call('HSETNX', KEYS[2], 'first', now)
redis.call('HSET', KEYS[2], 'last', now)
return {id, owner, 'stored'}
"""
)

# KEYS: box, meta. ARGV: run, entry after which to look.
# Claims the token for the run, then returns the next payload, if any:
# {'payload', entry, payload}, {'empty'} or {'conflict', owner}.
TAKE = """
local owner = redis.call('HGET', KEYS[2], 'owner')
if owner and owner ~= ARGV[1] then return {'conflict', owner} end
if not owner then redis.call('HSET', KEYS[2], 'owner', ARGV[1]) end
local found = redis.call('XRANGE', KEYS[1], '(' .. ARGV[2], '+', 'COUNT', 1)
if #found == 0 then return {'empty'} end
local fields = found[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'p' then return {'payload', found[1][1], fields[i + 1]} end
end
return {'payload', found[1][1], false}
"""

# KEYS: box. ARGV: entry. Drops a payload the run has recorded; returns how many are left.
CONSUMED = """
redis.call('XDEL', KEYS[1], ARGV[1])
return redis.call('XLEN', KEYS[1])
"""

# -- queue scripts --------------------------------------------------------------------

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
WAKE = (
    _NOW
    + _NUDGE
    + """
local at = now + tonumber(ARGV[2])
nudge(at)
redis.call('ZADD', KEYS[1], 'LT', at, ARGV[1])
return 1
"""
)

# KEYS: timers, queue. ARGV: how many at most.
# Moves due timers to the queue; returns {moved, ms until the next is due or -1}.
MOVE_DUE = (
    _NOW
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, run in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'r', run)
  redis.call('ZREM', KEYS[1], run)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if not nxt[2] then return {#due, -1} end
return {#due, math.max(tonumber(nxt[2]) - now, 0)}
"""
)

# KEYS: timers. ARGV: run, ms to push the entry by.
# A process waiting on its own run takes a due entry by pushing it forward
# (if the process then dies, the entry comes due again). Returns 1 if taken.
CLAIM_TIMER = (
    _NOW
    + """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= now then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
"""
)

# KEYS: timers, nudge. ARGV: run, due ms ('' removes the entry).
# A due entry is a wake-up nobody has handled yet: it is kept. Returns 1 if set.
RESCHEDULE = (
    _NOW
    + _NUDGE
    + """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= now then return 0 end
if ARGV[2] == '' then redis.call('ZREM', KEYS[1], ARGV[1])
else
  nudge(tonumber(ARGV[2]))
  redis.call('ZADD', KEYS[1], tonumber(ARGV[2]), ARGV[1])
end
return 1
"""
)

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
RECLAIM = (
    _NOW
    + """
local group, me, max = ARGV[1], ARGV[2], tonumber(ARGV[5])
local may, wanted = ARGV[7] == '1', tonumber(ARGV[8])
local limit = tonumber(ARGV[4])
local held = {}
for i = 9, #ARGV do held[ARGV[i]] = true end
local pending = redis.call('XPENDING', KEYS[1], group, 'IDLE', ARGV[3], ARGV[6], '+', limit)
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
      local total = times + before + 1
      local reason = 'delivered ' .. total .. ' times without finishing; last error: ' .. err
      redis.call('XADD', KEYS[2], '*', 'r', run, 'message', id, 'deliveries', total, 'at', now, 'reason', reason)
      table.insert(dead, {run, reason})
      redis.call('XACK', KEYS[1], group, id)
      redis.call('XDEL', KEYS[1], id)
      redis.call('HDEL', KEYS[3], id)
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
"""
)

# KEYS: probation. ARGV: consumer, message. Ends that message's probation, and only
# its: the consumer's next suspect may be on probation already.
END_PROBATION = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""

# KEYS: queue. ARGV: group, consumer, ids...
# Resets the idle time of the messages this consumer still owns (never steals
# one back from a worker that claimed it); returns the ids still owned.
TOUCH = """
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    table.insert(owned, ARGV[i])
  end
end
return owned
"""

# KEYS: queue, errors. ARGV: group, ids... Done with: acknowledged and deleted.
ACK = """
for i = 2, #ARGV do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return #ARGV - 1
"""

# KEYS: queue. ARGV: group, id, run, '1' if it may resume a failed run. A fresh
# message replaces one handed back (a graceful stop): readable at once by any
# worker. It carries the deliveries counted so far in 'd', but for this one,
# which ended cleanly, so that a run that keeps killing workers still reaches
# the dead letters, and one handed back at every deploy never does.
REQUEUE = """
local fields = {'r', ARGV[3]}
if ARGV[4] == '1' then table.insert(fields, 'x'); table.insert(fields, '1') end
local before = 0
local found = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #found > 0 then
  local old = found[1][2]
  for i = 1, #old, 2 do if old[i] == 'd' then before = tonumber(old[i + 1]) or 0 end end
end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
local counted = before + (p[1] and tonumber(p[1][4]) or 1) - 1
if counted > 0 then table.insert(fields, 'd'); table.insert(fields, counted) end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return id
"""

# KEYS: queue, dead, errors. ARGV: group, id, run, reason.
DEAD = (
    _NOW
    + """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
local times = p[1] and tonumber(p[1][4]) or 1
redis.call('XADD', KEYS[2], '*', 'r', ARGV[3], 'message', ARGV[2], 'deliveries', times, 'at', now,
           'reason', ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
"""
)

# KEYS: queue, dead. ARGV: dead-letter id. Puts the run back on the queue,
# allowed to resume even a failed or blocked run. Returns the new message id or ''.
REDRIVE = """
local found = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1])
if #found == 0 then return '' end
local fields, run = found[1][2], ''
for i = 1, #fields, 2 do if fields[i] == 'r' then run = fields[i + 1] end end
redis.call('XDEL', KEYS[2], ARGV[1])
if run == '' then return '' end
return redis.call('XADD', KEYS[1], '*', 'r', run, 'x', '1')
"""
