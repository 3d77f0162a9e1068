"""The storage boundary: every Redis key and script of werkfluss, in one place.

Key layout (``P`` is the prefix, ``{R}`` the run ID as a Redis Cluster hash
tag, so all of a run's keys share one slot and one script may touch them):

    P{R}:state   hash    status, workflow, holder, lease (ms, server clock), epoch,
                         n (last event index), created, updated, result | error,
                         failed_seq, retry_seq, retry_index
    P{R}:log     stream  the run's events; entry ID ``0-<n>`` is the event index
    P{R}:steps   hash    ``c<seq>`` -> index of the step's completion,
                         ``f<seq>:<attempt>`` -> index of a failed attempt
    Pruns        zset    run IDs by creation time (ms)

Every write is one Lua script that first checks the run's epoch (fencing:
a process whose lease was taken over cannot write) and is idempotent:
redis-py re-sends a command whose reply was lost, and a completion already
recorded for ``(run, seq)`` is not recorded twice (first writer wins). The
log is never trimmed. Lease times come from the server's clock (``TIME``),
never from a worker's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._errors import StorageError, _Suspend

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from redis.commands.core import AsyncScript

__all__ = ["AcquireResult", "RedisStore", "redact"]

log = logging.getLogger("werkfluss")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: state, log. ARGV: holder, lease_ms, workflow, run-started event,
# run-resumed event, holder to take over ('' for none), digest of the arguments.
_ACQUIRE = (
    _NOW
    + """
local cur = redis.call('HMGET', KEYS[1], 'status', 'workflow', 'holder', 'lease')
if not cur[1] then
  redis.call('HSET', KEYS[1], 'status', 'running', 'workflow', ARGV[3], 'holder', ARGV[1],
             'lease', now + tonumber(ARGV[2]), 'epoch', 1, 'n', 1, 'created', now, 'updated', now,
             'args', ARGV[7])
  redis.call('XADD', KEYS[2], '0-1', 'e', ARGV[4])
  return {'new', 1, now}
end
if cur[2] ~= ARGV[3] then return {'conflict', cur[2]} end
if redis.call('HGET', KEYS[1], 'args') ~= ARGV[7] then return {'other-arguments'} end
if cur[1] == 'completed' then return {'completed', redis.call('HGET', KEYS[1], 'result')} end
if cur[1] == 'running' and cur[3] ~= ARGV[1] and cur[3] ~= ARGV[6] and tonumber(cur[4]) > now then
  return {'busy', cur[3], tonumber(cur[4]) - now}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[5])
redis.call('HSET', KEYS[1], 'status', 'running', 'holder', ARGV[1],
           'lease', now + tonumber(ARGV[2]), 'updated', now)
if cur[1] == 'failed' then
  -- Remember which step failed the run: the replay re-executes it instead
  -- of replaying its recorded failure (failures recorded up to index n).
  redis.call('HSET', KEYS[1], 'retry_seq', redis.call('HGET', KEYS[1], 'failed_seq') or '', 'retry_index', n)
end
local retry = redis.call('HMGET', KEYS[1], 'retry_seq', 'retry_index')
return {'resumed', epoch, cur[1], retry[1] or '', retry[2] or ''}
"""
)

# KEYS: state. ARGV: epoch, lease_ms.
_RENEW = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease', now + tonumber(ARGV[2]))
return 1
"""
)

# KEYS: state, log, steps. ARGV: epoch, dedup field, event, lease_ms.
# Returns the event index, 0 if this (run, seq[, attempt]) was recorded
# before (a re-sent command or a competing writer: first writer wins), -1 if fenced.
_APPEND_STEP = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then return 0 end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], n)
redis.call('HSET', KEYS[1], 'updated', now, 'lease', now + tonumber(ARGV[4]))
return n
"""
)

# KEYS: state, log. ARGV: epoch, status, event, result-or-error field, its value, failed_seq.
_FINISH = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'status') == 'completed' then return 0 end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[3])
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[4], ARGV[5], 'failed_seq', ARGV[6],
           'holder', '', 'lease', 0, 'updated', now)
return n
"""
)

# KEYS: state. ARGV: epoch. Lets a rerun take over at once after Ctrl-C.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease', 0, 'holder', '')
return 1
"""

_LOG_BATCH = 2000
_Arg = bytes | str | int | float


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """What `RedisStore.acquire` found: ``kind`` is new, resumed, completed, busy,
    conflict (another workflow's run) or other-arguments."""

    kind: str
    epoch: int = 0
    previous: str = ""
    result: bytes = b""
    holder: str = ""
    lease_left: float = 0.0
    workflow: str = ""
    retry_seq: int | None = None
    retry_index: int = 0


def redact(url: str) -> str:
    """`url` with any password replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """The run log and run state on one Redis/Valkey server."""

    def __init__(self, client: aioredis.Redis, *, prefix: str, where: str) -> None:
        self.client = client
        self.prefix = prefix
        self.where = where  # redacted, for error messages
        self._acquire: AsyncScript = client.register_script(_ACQUIRE)
        self._renew: AsyncScript = client.register_script(_RENEW)
        self._append: AsyncScript = client.register_script(_APPEND_STEP)
        self._finish: AsyncScript = client.register_script(_FINISH)
        self._release: AsyncScript = client.register_script(_RELEASE)

    @classmethod
    async def connect(
        cls, *, prefix: str, url: str | None = None, unix_socket: str | None = None, password: str | None = None
    ) -> RedisStore:
        """Connect and check the server, raising `StorageError` naming it if that fails."""
        options: dict[str, Any] = {
            "socket_timeout": 30.0,  # above any blocking read we issue
            "socket_connect_timeout": 5.0,
            "health_check_interval": 15,
            # Retries re-send commands whose reply was lost: safe, because
            # every write script is idempotent.
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        }
        if url is not None and not url.startswith("unix:"):
            options["socket_keepalive"] = True  # TCP only: notices a peer that vanished
        if url is not None:
            where = redact(url)
            try:
                client = aioredis.Redis.from_url(url, **options)
            except ValueError as exc:
                raise StorageError(f"invalid Redis URL {where}: {exc}") from None
        else:
            where = f"embedded server at unix://{unix_socket}"
            client = aioredis.Redis(unix_socket_path=unix_socket, password=password, **options)
        store = cls(client, prefix=prefix, where=where)
        await store._check_server(external=url is not None)
        return store

    async def _check_server(self, *, external: bool) -> None:
        info = await self._call(self.client.info("server"))
        version = str(info.get("valkey_version") or info.get("redis_version") or "0")
        numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if not info.get("valkey_version") and numbers < (6, 2):
            raise StorageError(f"{self.where} runs Redis {version}; werkfluss needs Redis >= 6.2 or Valkey")
        if external:
            await self._warn_if_lossy()

    async def _warn_if_lossy(self) -> None:
        try:
            config: dict[Any, Any] = {}
            for name in ("maxmemory-policy", "appendonly", "save"):
                config.update(await self.client.config_get(name))
        except RedisError:
            return  # CONFIG is often disabled on managed servers; nothing to check then
        values = {_text(k): _text(v) for k, v in config.items()}
        policy = values.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            log.warning(
                "%s has maxmemory-policy %s: it may evict run logs and lose progress; use noeviction",
                self.where,
                policy,
            )
        if values.get("appendonly") == "no" and not values.get("save"):
            log.warning("%s has no persistence (appendonly no, no save points): a restart loses every run", self.where)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    # -- keys -------------------------------------------------------------------------

    def key(self, run_id: str, part: str) -> str:
        """The key of `part` (state, log, steps) of run `run_id`."""
        return f"{self.prefix}{{{run_id}}}:{part}"

    @property
    def runs_key(self) -> str:
        """The sorted set of all run IDs by creation time."""
        return f"{self.prefix}runs"

    # -- calls ------------------------------------------------------------------------

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StorageError(f"cannot reach {self.where}: {exc}") from None
        except ResponseError as exc:
            raise StorageError(f"{self.where} refused a command: {exc}") from None

    async def acquire(
        self,
        run_id: str,
        *,
        workflow: str,
        holder: str,
        lease: float,
        started: bytes,
        resumed: bytes,
        take_over: str,
        args_digest: str,
    ) -> AcquireResult:
        """Create run `run_id` or take it over; see `AcquireResult` for the outcomes."""
        keys = [self.key(run_id, "state"), self.key(run_id, "log")]
        args: list[_Arg] = [holder, int(lease * 1000), workflow, started, resumed, take_over, args_digest]
        reply = await self._call(self._acquire(keys=keys, args=args))
        kind = _text(reply[0])
        if kind == "new":
            await self._call(self.client.zadd(self.runs_key, {run_id: int(reply[2])}, nx=True))
            return AcquireResult("new", epoch=int(reply[1]))
        if kind == "resumed":
            retry_seq = int(reply[3]) if reply[3] else None
            return AcquireResult(
                "resumed",
                epoch=int(reply[1]),
                previous=_text(reply[2]),
                retry_seq=retry_seq,
                retry_index=int(reply[4]) if reply[4] else 0,
            )
        if kind == "completed":
            return AcquireResult("completed", result=bytes(reply[1] or b""))
        if kind == "busy":
            return AcquireResult("busy", holder=_text(reply[1]), lease_left=int(reply[2]) / 1000)
        if kind == "other-arguments":
            return AcquireResult("other-arguments")
        return AcquireResult("conflict", workflow=_text(reply[1]))

    async def renew(self, run_id: str, epoch: int, lease: float) -> bool:
        """Extend the lease; False when the run was taken over."""
        keys = [self.key(run_id, "state")]
        return bool(await self._call(self._renew(keys=keys, args=[epoch, int(lease * 1000)])))

    async def append_step(self, run_id: str, epoch: int, dedup: str, event: bytes, lease: float) -> int:
        """Append a step event once per `dedup` field; 0 if it was recorded before.

        Raises:
            _Suspend: the run was taken over (fenced).
        """
        keys = [self.key(run_id, "state"), self.key(run_id, "log"), self.key(run_id, "steps")]
        n = int(await self._call(self._append(keys=keys, args=[epoch, dedup, event, int(lease * 1000)])))
        if n < 0:
            raise _Suspend(run_id, "another process took this run over; this one stops writing")
        return n

    async def finish(
        self, run_id: str, epoch: int, *, status: str, event: bytes, field: str, value: bytes, failed_seq: int | None
    ) -> None:
        """Record the run's end (completed, failed or blocked) with its event.

        Raises:
            _Suspend: the run was taken over (fenced).
        """
        keys = [self.key(run_id, "state"), self.key(run_id, "log")]
        args: list[_Arg] = [epoch, status, event, field, value, "" if failed_seq is None else failed_seq]
        if int(await self._call(self._finish(keys=keys, args=args))) < 0:
            raise _Suspend(run_id, "another process took this run over; this one stops writing")

    async def release(self, run_id: str, epoch: int) -> None:
        """Give up the lease at once (the run stays interrupted, resumable)."""
        await self._call(self._release(keys=[self.key(run_id, "state")], args=[epoch]))

    async def state(self, run_id: str) -> dict[str, bytes]:
        """The run's state hash (empty if there is no such run)."""
        raw = await self._call(self.client.hgetall(self.key(run_id, "state")))
        return {_text(k): v for k, v in raw.items()}

    async def read_log(self, run_id: str) -> AsyncIterator[list[tuple[int, bytes | None]]]:
        """The run's log in batches of ``(index, encoded event)``, oldest first.

        An entry without the expected field yields ``None`` for its body, so
        the caller can report it instead of crashing.
        """
        key = self.key(run_id, "log")
        start = "-"
        while True:
            entries = await self._call(self.client.xrange(key, min=start, max="+", count=_LOG_BATCH))
            if not entries:
                return
            batch = []
            for entry_id, fields in entries:
                index = int(_text(entry_id).split("-", 1)[1])
                batch.append((index, (fields or {}).get(b"e")))
            yield batch
            if len(entries) < _LOG_BATCH:
                return
            start = f"({_text(entries[-1][0])}"
