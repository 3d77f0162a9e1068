"""The hook family: a token's mailbox (``P{hook:T}:box``, ``:meta``, ``:keys``, and the hooks index) and its Lua.

A payload is delivered once per delivery key, claimed by one run (the token's
owner), and dropped from the mailbox once the run recorded it.
"""

from __future__ import annotations

import os

from ._connect import NOW, Connection, Script, text
from ._keys import BOX, DELIVERY_KEYS, HOOK_PARTS, META, OWNER

# KEYS: box, meta, keys. ARGV: encoded payload, delivery key ('' none), the
# call's nonce. Returns {entry id, owning run or '', 'stored' | 'waiting' |
# 'duplicate'}. A key already in `keys` (kept after its payload was consumed)
# stores nothing and returns the first delivery's entry: 'waiting' while that
# payload is still in the mailbox (its sender may have died before waking the
# run), 'duplicate' once taken; 'stored' again if that delivery was this very
# call, re-sent by redis-py after a lost reply.
DELIVER = Script(
    "DELIVER",
    NOW
    + """
local payload, key, nonce = ARGV[1], ARGV[2], ARGV[3]
local owner = redis.call('HGET', KEYS[2], 'owner') or ''
if key ~= '' then
  local seen = redis.call('HGET', KEYS[3], key)
  if seen then
    local cut = string.find(seen, '/', 1, true)
    local by = cut and string.sub(seen, cut + 1) or ''
    local entry = cut and string.sub(seen, 1, cut - 1) or seen
    if by == nonce then return {entry, owner, 'stored'} end
    local waiting = #redis.call('XRANGE', KEYS[1], entry, entry) > 0
    return {entry, owner, waiting and 'waiting' or 'duplicate'}
  end
end
local id = redis.call('XADD', KEYS[1], '*', 'p', payload)
if key ~= '' then redis.call('HSET', KEYS[3], key, id .. '/' .. nonce) end
redis.call('HSETNX', KEYS[2], 'first', now)
redis.call('HSET', KEYS[2], 'last', now)
return {id, owner, 'stored'}
""",
)

# KEYS: box, meta. ARGV: run, entry after which to look.
# Claims the token for the run, then returns the next payload, if any:
# {'payload', entry, payload}, {'empty'} or {'conflict', owner}.
TAKE = Script(
    "TAKE",
    """
local run, after = ARGV[1], ARGV[2]
local owner = redis.call('HGET', KEYS[2], 'owner')
if owner and owner ~= run then return {'conflict', owner} end
if not owner then redis.call('HSET', KEYS[2], 'owner', run) end
local found = redis.call('XRANGE', KEYS[1], '(' .. after, '+', 'COUNT', 1)
if #found == 0 then return {'empty'} end
local fields = found[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'p' then return {'payload', found[1][1], fields[i + 1]} end
end
return {'payload', found[1][1], false}
""",
)

# KEYS: box. ARGV: entry. Drops a payload the run has recorded; returns how many are left.
CONSUMED = Script(
    "CONSUMED",
    """
local entry = ARGV[1]
redis.call('XDEL', KEYS[1], entry)
return redis.call('XLEN', KEYS[1])
""",
)

SCRIPTS = (DELIVER, TAKE, CONSUMED)


class RedisHooks(Connection):
    """Hook payloads: delivered by anyone, taken by the run that owns the token."""

    async def deliver(self, token: str, payload: bytes, key: str = "") -> tuple[bool, str]:
        """Store a payload for `token`, once per delivery `key` (``""``: always).

        Returns ``(stored, owner)``: False if an earlier delivery had the same
        key (nothing is stored), and the run to wake: the one that owns the
        token, or ``""`` (also for a duplicate whose payload the run has taken
        already: waking it would only replay and pause it again).
        """
        keys = [self.hook_key(token, BOX), self.hook_key(token, META), self.hook_key(token, DELIVERY_KEYS)]
        # The nonce tells this call's own write, re-sent after a lost reply, from another's.
        entry, owner, outcome = await self._run(DELIVER, keys, [payload, key, os.urandom(8).hex() if key else ""])
        if text(outcome) != "stored":
            # A duplicate must not bring a consumed token back into the index.
            return False, text(owner) if text(outcome) == "waiting" else ""
        ms = int(text(entry).split("-", 1)[0])
        await self._call(self.client.zadd(self.hooks_key, {token: ms}))
        return True, text(owner)

    async def delivered(self, token: str, key: str) -> bool:
        """Whether a delivery with `key` was stored for `token` (and not discarded since)."""
        return bool(await self._call(self.client.hexists(self.hook_key(token, DELIVERY_KEYS), key)))

    async def take(self, token: str, run_id: str, after: str) -> tuple[str, str, bytes | None]:
        """Claim `token` for `run_id` and peek at its next payload after entry `after`.

        Returns ``("payload", entry, payload)``, ``("empty", "", None)`` or
        ``("conflict", owner, None)``.
        """
        keys = [self.hook_key(token, BOX), self.hook_key(token, META)]
        reply = await self._run(TAKE, keys, [run_id, after])
        kind = text(reply[0])
        if kind == "payload":
            return kind, text(reply[1]), bytes(reply[2]) if reply[2] else None
        if kind == "conflict":
            return kind, text(reply[1]), None
        return kind, "", None

    async def consumed(self, token: str, entry: str) -> None:
        """Drop a payload the run recorded; forget the token in the index once none are left."""
        left = int(await self._run(CONSUMED, [self.hook_key(token, BOX)], [entry]))
        if left == 0:
            await self._call(self.client.zrem(self.hooks_key, token))

    async def hook_owner(self, token: str) -> str:
        """The run that claimed hook `token`, ``""`` if none has."""
        return text(await self._call(self.client.hget(self.hook_key(token, META), OWNER)) or b"")

    async def pending_hooks(self, limit: int) -> list[tuple[str, float, int, str]]:
        """Tokens with payloads waiting: ``(token, last delivery, count, owner)``, oldest first."""
        listed = await self._call(self.client.zrange(self.hooks_key, 0, limit - 1, withscores=True))
        found = []
        for raw, score in listed:
            token = text(raw)
            count = int(await self._call(self.client.xlen(self.hook_key(token, BOX))))
            owner = text(await self._call(self.client.hget(self.hook_key(token, META), OWNER)) or b"")
            found.append((token, score / 1000, count, owner))
        return found

    async def discard_hook(self, token: str) -> None:
        """Delete the payloads waiting for `token` (and its claim and delivery keys)."""
        parts = HOOK_PARTS
        await self._call(self.client.delete(*(self.hook_key(token, part) for part in parts)))
        await self._call(self.client.zrem(self.hooks_key, token))
