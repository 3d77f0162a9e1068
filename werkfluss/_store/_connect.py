"""The store's connection: connecting, the server checks, deadlines, and calls with their errors mapped.

`Connection` is the base of `RedisStore`'s families (`_runs`, `_hooks`,
`_queue`): it holds the client, the fast lane and the server's clock, and
sends every command through `_call` (redis-py, errors as `StorageError`),
`_fast` (the lane, see `_lane`) or `_run` (a `Script`, on the lane first).
"""

from __future__ import annotations

import asyncio
import contextvars
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

from .._errors import LossyServerWarning, StorageError
from .._options import redact
from ._keys import HOOKS, RUNS, hook_key, queue_key, run_key
from ._lane import _MISS, _carried, _carry, _FastLane, lane_fits

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from redis.commands.core import AsyncScript

log = logging.getLogger("werkfluss")

Arg = bytes | str | int | float
"""An argument of a command, as redis-py and the fast lane send it."""


# How long werkfluss waits for the server. One attempt waits SOCKET_TIMEOUT for a reply: above the
# longest blocking read werkfluss issues (the worker's BLPOP for timer nudges, up to its `poll`,
# 4 s; XREADGROUP BLOCK 1 s) plus a healthy server's stall (an fsync, a fork for a rewrite: a
# second or two). One call, retries included, waits CALL_DEADLINE at most, from its first attempt
# on the fast lane to its last through redis-py: long enough to ride out a restart (connections
# refused, then LOADING), short enough that a worker cut off by a partition (no RST, nothing
# answers) learns it within seconds, not minutes.
SOCKET_TIMEOUT = 7.0
CALL_DEADLINE = 10.0
# The first call of a connection (is the server there at all?) gives up sooner: a wrong URL or
# a server that is down is reported in seconds, as it was before the deadline (6 retries).
_FIRST_CALL_DEADLINE = 5.0
# Seconds after a fast-lane miss during which redis-py's calls in that task keep the lane's deadline:
# the call goes on through redis-py at once (a pool's connect, then the command, each a retry loop of
# its own). The task's next lane call drops it; so does this window, for a call that was abandoned.
_CARRY_FRESH = 1.0


# The deadline of the call this task is making through redis-py (loop time), while it makes it.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("werkfluss_deadline", default=None)


class _DeadlineRetry(Retry):
    """redis-py's `Retry`, bounded by a total deadline per call (`budget` seconds) instead of a count.

    redis-py nests its retries: a command's attempt reconnects, and the reconnect's handshake
    and the health check's PING retry on their own, each with the same count, so the waits
    multiply (6 retries took 24 s against a server refusing connections, and a blackholed
    command 7 times socket_timeout and more). Here the outermost retry loop sets a deadline
    that nested ones share, and cuts the attempt in flight when it passes: the call raises
    redis-py's `TimeoutError` (``StorageError`` for werkfluss's callers). Until then failures
    are retried with backoff, however many, so a restart of a few seconds is ridden out.
    A call the fast lane tried first gets only what is left of the same deadline.

    `retries` stays a count for what reads it as one: redis-py's failure handlers (they
    only record metrics past it) and a cluster client, which gets a plain `Retry` anyway.
    """

    def __init__(self, budget: float, *, retries: int = 1000) -> None:
        super().__init__(ExponentialBackoff(cap=1.0, base=0.05), retries)
        self.budget = budget

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _DeadlineRetry) and self.budget == other.budget and super().__eq__(other)

    __hash__ = Retry.__hash__

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[Any]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        """Call `do` until it succeeds, retrying supported errors with backoff, within the deadline."""
        deadline = _deadline.get()
        if deadline is not None:  # inside an attempt of an outer call: its deadline is ours
            return await self._attempts(do, fail, is_retryable, with_failure_count, deadline)
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + self.budget
        carried = _carried.get()
        if carried is not None and now - carried[1] <= _CARRY_FRESH:
            deadline = min(deadline, carried[0])
        token = _deadline.set(deadline)
        try:
            async with asyncio.timeout_at(deadline):
                return await self._attempts(do, fail, is_retryable, with_failure_count, deadline)
        except TimeoutError:
            # asyncio's, from the deadline (redis-py's own timeouts are its TimeoutError, no builtin one).
            raise RedisTimeoutError(f"no reply within {self.budget:g} s, retries included") from None
        finally:
            _deadline.reset(token)

    async def _attempts(
        self,
        do: Callable[[], Awaitable[Any]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None,
        with_failure_count: bool,
        deadline: float,
    ) -> Any:
        loop = asyncio.get_running_loop()
        self._backoff.reset()  # type: ignore[no-untyped-call]
        failures = 0
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                await (fail(error, failures) if with_failure_count else fail(error))
                backoff = self._backoff.compute(failures)
                if loop.time() + backoff >= deadline:
                    raise error
                if backoff > 0:
                    await asyncio.sleep(backoff)


# The prelude of a script that reads the server's clock: ``now``, in milliseconds.
NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


class Script:
    """A Lua script the store runs by its SHA1 (``EVALSHA``), with its `name` for messages."""

    __slots__ = ("name", "packed_sha", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.packed_sha = self.sha.encode()  # as the fast lane sends it, computed once

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha[:8]}>"


def text(value: Any) -> str:
    """A reply's bytes as text."""
    # Anything may be written into a stream; a byte that is not UTF-8 must not
    # stop a reader (a worker would read the same message forever).
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


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


def _warn_lossy(message: str, *args: object) -> None:
    """Report a server that could lose runs where the user will see it.

    To the ``werkfluss`` logger when the application configured logging; else
    as a `LossyServerWarning` through Python's warnings, which print to stderr
    by default: the logger alone would drop it (its NullHandler), and a
    newcomer would never learn that a restart of the server loses every run.
    Never both, so a configured application does not see it twice.
    """
    if _logging_reaches(log, logging.WARNING):
        log.warning(message, *args)
    else:
        warnings.warn(message % args, LossyServerWarning, stacklevel=3)


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
            "retry": _DeadlineRetry(CALL_DEADLINE),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
            # redis-py 8 caps a pool at 100 connections and then fails commands with "Too many
            # connections" (it does not wait): a worker running hundreds of runs at once, all
            # retrying after a server restart, needs more. The server's own default limit.
            "max_connections": 10_000,
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
            _carry(asyncio.get_running_loop().time(), _FIRST_CALL_DEADLINE)
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
            _carried.set(None)  # the caller's next calls have deadlines of their own
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
        """The server's clock, as Unix time: what timers are due by.

        Deadlines a worker computes (a durable sleep's) are taken from it, so a
        worker whose clock runs ahead does not fire them early, nor one behind late,
        nor one whose clock is stepped while it runs.
        """
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

    def queue_key(self, part: str) -> str:
        """The key of `part` (queue, timers, nudge, dead, errors, probation, sweep) of the shared queue."""
        return queue_key(self.prefix, part)

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
            raise StorageError(f"{self.where} refused a command: {exc}") from None
        except RedisClusterException as exc:
            # Not a RedisError: the cluster client raises it when no node answers
            # or a slot has no node (SlotNotCoveredError).
            raise StorageError(f"cannot use the Redis Cluster at {self.where}: {exc}") from None

    async def _fast(self, parts: list[Arg]) -> Any:
        """`parts` on the fast lane: the raw reply, or `_MISS` (no lane, or send it through redis-py)."""
        if self._lane is None:
            return _MISS
        try:
            return await self._lane.call(parts)
        except ResponseError as exc:
            raise StorageError(f"{self.where} refused a command: {exc}") from None

    async def _run(self, script: Script, keys: list[str], args: list[Arg]) -> Any:
        """`script` with `keys` and `args`: on the fast lane, else through redis-py."""
        reply = await self._fast([b"EVALSHA", script.packed_sha, len(keys), *keys, *args])
        if reply is _MISS:
            # redis-py's script objects run EVALSHA on the node owning the first key
            # and, on NOSCRIPT (a node that restarted or failed over), SCRIPT LOAD on
            # every primary before retrying, so they need nothing extra on a cluster.
            registered = self._scripts.get(script)
            if registered is None:
                registered = self._scripts[script] = self.client.register_script(script.source)
            reply = await self._call(registered(keys=keys, args=args))
        return reply
