"""The store's connection: connecting, the server checks, and calls with their errors mapped.

`Connection` is the base of `RedisStore`'s families (`_runs`, `_run_log`,
`_run_reads`, `_hooks`, `_timers`, `_queue`): it holds the client, the fast
lane and the server's clock, and sends every command one of three ways:

- `_call`: a redis-py call, its errors mapped to `StorageError`;
- `_send`: a command given as its parts, on the fast lane (see `_lane`) or,
  when the lane misses, the same parts through redis-py (``execute_command``);
- `_run`: a `Script` by its SHA (``EVALSHA``), on the lane or through
  redis-py's script object, which loads it on NOSCRIPT.

Both paths of `_send` and `_run` return one shape, the raw reply as hiredis
parses it: the lane speaks the client's protocol, RESP3 (pinned: redis-py
before 8 speaks RESP2 by default, whose shapes differ, XREADGROUP's above
all), and what `_send` hands to redis-py goes through a client whose response
callbacks for those commands return the reply as it came (`_RAW_COMMANDS`).
On one server that is a second client on the same connection pool; a
cluster client's nodes share one callback table, so there it is the store's
own client (whose ``xrange`` and the like then return raw replies too).
Timeouts and the one deadline per call are in `_deadline`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import warnings
from typing import TYPE_CHECKING, Any, Self

import anyio
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._clock import skew
from .._errors import LossyServerWarning, StorageError
from .._options import redact
from ._deadline import CALL_DEADLINE, FIRST_CALL_DEADLINE, SOCKET_TIMEOUT, DeadlineRetry, carried, carry
from ._keys import DEFAULT_TAG, HOOKS, RUNS, hook_key, queue_key, run_key
from ._lane import _MISS, Arg, _FastLane, lane_fits

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

log = logging.getLogger("werkfluss")

# The commands the store sends as parts (`Connection._send`), on the fast lane or through redis-py: the
# client sending them through redis-py returns their replies as they came, as the lane does.
_RAW_COMMANDS = ("BLPOP", "HGET", "XADD", "XRANGE", "XREADGROUP", "XREVRANGE", "ZADD", "ZREM")


# The prelude of a script that reads the server's clock: ``now``, in milliseconds.
NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# `clock`: the time timers are due by (ms): the server's, moved ahead by a test clock
# (`werkfluss._clock`). A script that uses it is `Script(..., clocked=True)`: the
# store passes the skew as its last argument. Leases keep `now`.
CLOCK = (
    NOW
    + """
local clock = now + tonumber(ARGV[#ARGV])
"""
)


class Script:
    """A Lua script the store runs by its SHA1 (``EVALSHA``), with its `name` for messages."""

    __slots__ = ("clocked", "name", "packed_sha", "sha", "source")

    def __init__(self, name: str, source: str, *, clocked: bool = False) -> None:
        self.name = name
        self.source = source
        self.clocked = clocked  # takes the test clock's skew (ms) as its last argument (see CLOCK)
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.packed_sha = self.sha.encode()  # as the fast lane sends it, computed once

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha[:8]}>"


def text(value: Any) -> str:
    """A reply's bytes as text."""
    # Anything may be written into a stream; a byte that is not UTF-8 must not
    # stop a reader (a worker would read the same message forever).
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def entry_fields(raw: list[bytes] | None) -> dict[str, str]:
    """A stream entry's fields, from the flat ``[field, value, ...]`` list of its raw reply."""
    flat = raw or []
    return {text(k): text(v) for k, v in zip(flat[::2], flat[1::2], strict=False)}


def _logging_reaches(logger: logging.Logger, level: int) -> bool:
    """Whether a record of `level` on `logger` reaches a handler the application set up.

    werkfluss's own NullHandler does not count. A logger silenced on purpose
    (its level above `level`) counts as set up: the application decided.
    """
    if not logger.isEnabledFor(level):
        return True
    current: logging.Logger | None = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) and level >= h.level for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


def warn_user(category: type[Warning], level: int, message: str, *args: object) -> None:
    """Report something the user must see, where they will see it.

    To the ``werkfluss`` logger at `level` when the application configured
    logging; else as a `category` warning through Python's warnings, which
    print to stderr by default: the logger alone would drop it (its
    NullHandler). Never both, so a configured application does not see it twice.
    """
    if _logging_reaches(log, level):
        log.log(level, message, *args)
    else:
        warnings.warn(message % args, category, stacklevel=4)


def _warn_lossy(message: str, *args: object) -> None:
    """Report a server that could lose runs: a newcomer must learn that a restart of it loses every run."""
    warn_user(LossyServerWarning, logging.WARNING, message, *args)


class Connection:
    """One Redis/Valkey server or one Redis Cluster, and how the store talks to it.

    On a cluster every script's keys share one hash slot (see `_keys`), so
    the same calls work on both kinds of `client`.
    """

    def __init__(self, client: aioredis.Redis | RedisCluster, *, prefix: str, where: str) -> None:
        self.client = client
        self.prefix = prefix
        self.where = where  # redacted, for error messages
        # The server's clock at a moment of this process's monotonic clock (see now()).
        self._clock: tuple[float, float] | None = None
        # redis-py's script objects, registered on first use: see `_run`.
        self._scripts: dict[Script, AsyncScript] = {}
        # A cluster client routes each command to the node owning its keys: it keeps redis-py's path.
        self._lane = _FastLane(client) if isinstance(client, aioredis.Redis) and lane_fits(client) else None
        self._raw = (
            client if isinstance(client, RedisCluster) else aioredis.Redis(connection_pool=client.connection_pool)
        )
        for command in _RAW_COMMANDS:
            self._raw.set_response_callback(command, _as_sent)

    @classmethod
    async def connect(
        cls, *, prefix: str, url: str | None = None, unix_socket: str | None = None, password: str | None = None
    ) -> Self:
        """Connect and check the server, raising `StorageError` naming it if that fails.

        A `url` may point at any node of a Redis Cluster: the server is asked
        (``INFO cluster``) and, if it is one, a cluster client takes over.
        """
        options: dict[str, Any] = {
            "socket_timeout": SOCKET_TIMEOUT,  # above any blocking read we issue
            "socket_connect_timeout": 5.0,
            "health_check_interval": 15,
            # Retries re-send commands whose reply was lost: safe, because
            # every write script is idempotent. Bounded by a deadline per call.
            "retry": DeadlineRetry(CALL_DEADLINE),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
            # redis-py 8 caps a pool at 100 connections and then fails commands with "Too many
            # connections" (it does not wait): a worker running hundreds of runs at once, all
            # retrying after a server restart, needs more. The server's own default limit.
            "max_connections": 10_000,
            # The protocol whose reply shapes the store reads, on the fast lane and off it.
            "protocol": 3,
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
        try:
            carry(asyncio.get_running_loop().time(), FIRST_CALL_DEADLINE)
            # The embedded server is never a cluster; a URL may name any cluster node.
            is_cluster = url is not None and bool((await store._call(client.info("cluster"))).get("cluster_enabled"))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await store.close()
            raise
        if url is not None and is_cluster:
            await store.close()
            if url.startswith("unix:"):
                raise StorageError(f"{where} is a Redis Cluster node; redis-py reaches a cluster only over TCP")
            try:
                # The cluster client takes the same options, but uses `retry` only
                # for its count: it retries at once, after asking the cluster for
                # its current slot layout (a failover moves slots to another node).
                # Its nodes' connections do not retry, so each attempt waits one
                # socket_timeout at most: 7 of them for a node that never answers.
                retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6)
                cluster = RedisCluster.from_url(url, **{**options, "retry": retry})
            except (ValueError, RedisClusterException) as exc:  # e.g. a database other than 0
                raise StorageError(f"invalid Redis Cluster URL {where}: {exc}") from None
            store = cls(cluster, prefix=prefix, where=where)
        try:
            if isinstance(store.client, RedisCluster):
                # Learn the slot layout before the first commands: concurrent calls on a
                # client still discovering it can fail (redis/redis-py#3935).
                await store._call(store.client.initialize())
            await store._check_server(external=url is not None)
            await store._learn_clock()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await store.close()
            raise
        finally:
            carried.set(None)  # the caller's next calls have deadlines of their own
        return store

    async def _check_server(self, *, external: bool) -> None:
        for name, target in self._nodes():
            info = await self._call(self.client.info("server", **target))
            version = str(info.get("valkey_version") or info.get("redis_version") or "0")
            numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
            if not info.get("valkey_version") and numbers < (6, 2):
                raise StorageError(f"{name} runs Redis {version}; werkfluss needs Redis >= 6.2 or Valkey")
        if external:
            await self._warn_if_lossy()

    async def _learn_clock(self) -> None:
        """Read the server's clock once, against this process's monotonic clock (`now`)."""
        before = time.monotonic()
        seconds, micros = await self._call(self.client.time())
        after = time.monotonic()
        self._clock = (seconds + micros / 1e6, (before + after) / 2)

    def now(self) -> float:
        """The time timers are due by, as Unix time: the server's clock (`server_now`),
        moved ahead by a test clock for this prefix (`werkfluss._clock`).

        Deadlines a worker computes (a durable sleep's) are taken from it, so a
        worker whose clock runs ahead does not fire them early, nor one behind late,
        nor one whose clock is stepped while it runs.
        """
        return self.server_now() + skew(self.prefix)

    def server_now(self) -> float:
        """The server's clock, as Unix time: what leases run out by."""
        if self._clock is None:
            return time.time()
        # Counted on the monotonic clock from one reading of the server's: a wall clock set
        # off or stepped (NTP) after the connection does not move it.
        server, at = self._clock
        return server + time.monotonic() - at

    def _nodes(self) -> list[tuple[str, dict[str, Any]]]:
        """``(name for messages, command keywords)`` addressing each server once.

        INFO and CONFIG describe one node, and on a cluster every primary runs
        the scripts for its share of the slots, so each is asked on its own.
        """
        if isinstance(self.client, RedisCluster):
            return [(f"{self.where} (node {n.name})", {"target_nodes": n}) for n in self.client.get_primaries()]
        return [(self.where, {})]

    async def _warn_if_lossy(self) -> None:
        for name, target in self._nodes():
            try:
                config: dict[Any, Any] = {}
                for option in ("maxmemory-policy", "appendonly", "save"):
                    config.update(await self.client.config_get(option, **target))
            except (RedisError, RedisClusterException):
                return  # CONFIG is often disabled on managed servers; nothing to check then
            values = {text(k): text(v) for k, v in config.items()}
            policy = values.get("maxmemory-policy", "noeviction")
            if policy != "noeviction":
                _warn_lossy(
                    "%s has maxmemory-policy %s: it may evict run logs and lose progress; use noeviction", name, policy
                )
            if values.get("appendonly") == "no" and not values.get("save"):
                _warn_lossy(
                    "%s has no persistence (appendonly no, no save points): a restart loses every run; "
                    "use appendonly yes",
                    name,
                )

    async def close(self) -> None:
        """Close the connection pool (every node's, on a cluster)."""
        if self._lane is not None:
            await self._lane.close()
        await self.client.aclose()

    # -- keys (see `_keys`) -----------------------------------------------------------

    def key(self, run_id: str, part: str) -> str:
        """The key of `part` (state, log, steps) of run `run_id`."""
        return run_key(self.prefix, run_id, part)

    def hook_key(self, token: str, part: str) -> str:
        """The key of `part` (box, meta, keys) of hook `token`."""
        return hook_key(self.prefix, token, part)

    def queue_key(self, part: str, tag: str = DEFAULT_TAG) -> str:
        """The key of `part` (queue, timers, nudge, dead, ...) of queue partition `tag` (see `_keys`)."""
        return queue_key(self.prefix, part, tag)

    def _run_keys(self, run_id: str, *parts: str) -> list[str]:
        return [self.key(run_id, part) for part in parts]

    @property
    def runs_key(self) -> str:
        """The sorted set of all run IDs by creation time."""
        return self.prefix + RUNS

    @property
    def hooks_key(self) -> str:
        """Tokens with payloads waiting, by last delivery time."""
        return self.prefix + HOOKS

    # -- calls ------------------------------------------------------------------------

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StorageError(f"cannot reach {self.where}: {exc}") from None
        except ResponseError as exc:
            raise self._refused(exc) from None
        except RedisClusterException as exc:
            # Not a RedisError: the cluster client raises it when no node answers
            # or a slot has no node (SlotNotCoveredError).
            raise StorageError(f"cannot use the Redis Cluster at {self.where}: {exc}") from None

    async def _send(self, *parts: Arg) -> Any:
        """One command, given as its parts: on the fast lane, else through redis-py; its raw reply."""
        if self._lane is not None:
            try:
                reply = await self._lane.call(parts)
            except ResponseError as exc:
                raise self._refused(exc) from None
            if reply is not _MISS:
                return reply
        return await self._call(self._raw.execute_command(*parts))

    async def _run(self, script: Script, keys: list[str], args: list[Arg]) -> Any:
        """`script` with `keys` and `args`: on the fast lane, else through redis-py; its raw reply."""
        if script.clocked:
            args = [*args, int(skew(self.prefix) * 1000)]
        if self._lane is not None:
            try:
                reply = await self._lane.call((b"EVALSHA", script.packed_sha, len(keys), *keys, *args))
            except ResponseError as exc:
                raise self._refused(exc) from None
            if reply is not _MISS:
                return reply
        # redis-py's script objects run EVALSHA on the node owning the first key
        # and, on NOSCRIPT (a node that restarted or failed over), SCRIPT LOAD on
        # every primary before retrying, so they need nothing extra on a cluster.
        registered = self._scripts.get(script)
        if registered is None:
            registered = self._scripts[script] = self.client.register_script(script.source)
        return await self._call(registered(keys=keys, args=args))

    def _refused(self, exc: ResponseError) -> StorageError:
        return StorageError(f"{self.where} refused a command: {exc}")


def _as_sent(response: Any, **options: Any) -> Any:
    """A response callback that returns the reply as redis-py read it."""
    return response
