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

import asyncio
import contextlib
import contextvars
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._errors import LossyServerWarning, StorageError, _Suspend
from . import _scripts

try:  # redis-py parses replies in C with it when it is installed; so does the fast lane
    import hiredis
except ImportError:  # pragma: no cover - a dependency, but the code works without it
    hiredis = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from redis.asyncio.connection import AbstractConnection
    from redis.commands.core import AsyncScript

__all__ = ["AcquireResult", "RedisStore", "redact"]

log = logging.getLogger("werkfluss")

_LOG_BATCH = 2000
_Arg = bytes | str | int | float


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """What `RedisStore.acquire` found: ``kind`` is new, resumed, completed, busy,
    cancelled, ended (failed or blocked, not resumed), missing, conflict
    (another workflow's run) or other-arguments. `cancel` is a pending
    cancel's reason."""

    kind: str
    epoch: int = 0
    previous: str = ""
    result: bytes = b""
    holder: str = ""
    lease_left: float = 0.0
    workflow: str = ""
    retry_seq: int | None = None
    retry_index: int = 0
    cancel: str | None = None


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


# -- the fast lane ------------------------------------------------------------------------

_MISS: Any = object()  # the fast lane could not serve a command: send it through redis-py
_READ_SIZE = 65536
_LANE_PAUSE = 1.0  # seconds the fast lane stands aside after it could not connect

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
# ``(deadline, loop time of the miss)`` a fast-lane call hands to redis-py's path when it misses.
_carried: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "werkfluss_carried_deadline", default=None
)


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


def _carry(started: float, budget: float | None) -> None:
    """End the deadline of this task's next redis-py calls at `started` + `budget` (loop time):
    what is left of a fast-lane call's deadline, or a shorter one for a first call."""
    if budget is not None:
        _carried.set((started + budget, asyncio.get_running_loop().time()))


class _Incomplete(Exception):
    """The bytes read so far end inside a reply."""


class _ErrorReply:
    """An error reply (``-ERR ...``) as data, classified later."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _encode_arg(value: Any) -> bytes:
    """One argument as redis-py's encoder sends it (bytes as they are, str as UTF-8, numbers by repr)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value).encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"cannot send {type(value).__name__} to Redis")


def pack_command(parts: Sequence[Any]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = _encode_arg(part)
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def parse_reply(buf: bytes | bytearray, pos: int = 0) -> tuple[Any, int]:
    """One RESP2 reply starting at `pos`: ``(value, position after it)``.

    Values come out as redis-py returns them without decoding: bytes,
    int, None, lists; an error reply is an `_ErrorReply`.

    Raises:
        _Incomplete: `buf` ends inside the reply.
        ValueError: the bytes are not RESP2.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            raise _Incomplete
        return bytes(buf[end + 2 : stop]), stop + 2
    if kind == 58:  # : integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 42:  # * array
        count = int(buf[pos + 1 : end])
        pos = end + 2
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = parse_reply(buf, pos)
            items.append(item)
        return items, pos
    if kind == 43:  # + simple string
        return bytes(buf[pos + 1 : end]), end + 2
    if kind == 45:  # - error
        return _ErrorReply(bytes(buf[pos + 1 : end]).decode(errors="replace")), end + 2
    raise ValueError(f"not a RESP2 reply: {bytes(buf[pos : pos + 20])!r}")


def _lane_fits(client: aioredis.Redis) -> bool:
    """Whether the store may use the fast lane with `client`: replies as bytes, as the lane gives them.

    ``WERKFLUSS_FAST_LANE=0`` turns the lane off (everything goes through
    redis-py): an escape hatch, and the A/B switch of the benchmarks.
    """
    if os.environ.get("WERKFLUSS_FAST_LANE", "1").strip() == "0":
        return False
    return not client.connection_pool.connection_kwargs.get("decode_responses")


class _FastLane:
    """Commands on connections of its own, without redis-py's per-command machinery.

    redis-py spends more client CPU on one command than the server spends
    running a step's script: packing, the retry wrapper, the pool's lock
    and checks, an ``asyncio.wait_for`` around each send (Python < 3.12).
    The lane writes hand-packed RESP to a connected redis-py connection's
    stream and parses the reply itself. Each connection carries one command
    at a time; idle ones wait in a free list, so concurrent runs use one each.

    It never decides anything on its own: when something is off (no
    connection, a connection error, a reply later than ``socket_timeout``,
    NOSCRIPT, a reply redis-py would treat as a connection error) it drops
    the connection and returns `_MISS`, and the caller sends the same
    command through redis-py, whose retries and script loading apply,
    within what is left of the call's deadline (`CALL_DEADLINE`).
    Sending it again is safe, as it is for redis-py's own retries: every
    write script is idempotent. A call cancelled (or failing) between
    sending and reading its reply closes its connection, so no connection
    is left with an unread reply.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        pool = client.connection_pool
        self._pool = pool
        kwargs = pool.connection_kwargs
        timeout = kwargs.get("socket_timeout")
        self._timeout = float(timeout) if timeout else None
        # A miss hands redis-py's path what is left of the call's deadline, not a new one.
        self._budget: float | None = getattr(kwargs.get("retry"), "budget", None)
        # redis-py checks a connection idle this long with a PING; the lane opens a new one instead.
        self._max_idle = float(kwargs.get("health_check_interval") or 0) or float("inf")
        self._paused_until = 0.0
        self._idle: list[tuple[AbstractConnection, float]] = []  # (connection, loop time of its last call)
        self._open: set[AbstractConnection] = set()
        # Replies awaited: connection -> deadline (loop time). One timer checks them, re-armed
        # lazily, which costs far less per call than an asyncio.timeout() around each read.
        self._waiting: dict[AbstractConnection, float] = {}
        self._watchdog: asyncio.TimerHandle | None = None
        self._parser: Any = None  # redis-py's error classification, from the first connection
        self.closed = False
        self.enabled = True
        self.misses = 0  # calls handed to redis-py for a reason other than NOSCRIPT (tests watch this)

    def _reuse(self, now: float) -> AbstractConnection | None:
        """An idle connection that is still fit for use at loop time `now`, dropping those that are not."""
        while self._idle:
            conn, used = self._idle.pop()
            reader, writer = conn._reader, conn._writer
            if (
                now - used < self._max_idle
                and reader is not None
                and writer is not None
                and not reader.at_eof()
                and not writer.transport.is_closing()
            ):
                return conn
            self._drop(conn)
        return None

    async def _connect(self) -> AbstractConnection | None:
        if time.monotonic() < self._paused_until:
            return None
        # RESP2 whatever the client speaks (redis-py 8 defaults to RESP3): the store reads the
        # lane's replies in RESP2's shapes (arrays, never maps), and parse_reply speaks RESP2.
        conn = self._pool.connection_class(**{**self._pool.connection_kwargs, "protocol": 2})
        conn.retry = Retry(NoBackoff(), 0)  # one attempt: redis-py's own path does the retrying
        self._open.add(conn)
        try:
            # A handshake is a reply like any other: an unanswered one takes no longer than one.
            async with asyncio.timeout(self._timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
        except Exception:
            self._drop(conn)
            self._paused_until = time.monotonic() + _LANE_PAUSE
            return None
        except BaseException:
            self._drop(conn)
            raise
        if conn._reader is None or conn._writer is None:  # pragma: no cover - not asyncio streams
            self.enabled = False
            self._drop(conn)
            return None
        if self._parser is None:
            self._parser = conn._parser
        return conn

    def _drop(self, conn: AbstractConnection) -> None:
        """Close `conn` at once, without awaiting anything (safe while being cancelled)."""
        self._open.discard(conn)
        self._waiting.pop(conn, None)
        writer = conn._writer
        conn._reader = conn._writer = None
        with contextlib.suppress(Exception):
            conn._parser.on_disconnect()  # type: ignore[no-untyped-call]
        if writer is not None:
            writer.transport.abort()

    async def close(self) -> None:
        """Close every connection of the lane; later calls return `_MISS`."""
        self.closed = True
        self._idle.clear()
        for conn in list(self._open):
            self._drop(conn)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _watch(self) -> None:
        """Abort connections whose reply is overdue: their read then fails, and the call misses."""
        self._watchdog = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn, deadline in list(self._waiting.items()):
            if deadline <= now:
                log.warning(
                    "no reply from %s within %g s on the fast lane; closing that connection", conn, self._timeout
                )
                self._drop(conn)
        if self._waiting:
            self._watchdog = loop.call_at(min(self._waiting.values()), self._watch)

    async def call(self, parts: Sequence[Any]) -> Any:
        """Send one command; returns its reply, or `_MISS` to use redis-py instead.

        Raises:
            ResponseError: the server refused the command (not NOSCRIPT, not a connection error).
        """
        if self.closed or not self.enabled:
            return _MISS
        if _carried.get() is not None:  # a new call: the deadline of the last one is no longer ours
            _carried.set(None)
        command = pack_command(parts)  # before taking a connection: an argument may not encode
        loop = asyncio.get_running_loop()
        now = loop.time()  # one clock read per call: idle times and the reply's deadline
        conn = self._reuse(now) or await self._connect()
        if conn is None:
            self.misses += 1
            _carry(now, self._budget)
            return _MISS
        reader, writer = conn._reader, conn._writer
        assert reader is not None and writer is not None
        if self._timeout is not None:
            deadline = now + self._timeout
            self._waiting[conn] = deadline
            if self._watchdog is None:
                self._watchdog = loop.call_at(deadline, self._watch)
        done = False
        try:
            writer.write(command)
            reply = await _read_reply(reader)
            done = True
        except (OSError, ValueError, EOFError):
            self.misses += 1
            _carry(now, self._budget)
            return _MISS
        finally:
            if done and not self.closed:
                self._waiting.pop(conn, None)
                self._idle.append((conn, now))
            else:
                self._drop(conn)
        if isinstance(reply, _ErrorReply):
            error = (
                self._parser.parse_error(reply.message) if self._parser is not None else ResponseError(reply.message)
            )
            if isinstance(error, (NoScriptError, RedisConnectionError)):
                self.misses += not isinstance(error, NoScriptError)
                _carry(now, self._budget)
                return _MISS
            raise error
        return reply


async def _read_reply(reader: asyncio.StreamReader) -> Any:
    """Read exactly one reply (the lane never has more than one outstanding).

    With hiredis its C parser reads it (far faster on long replies such as a
    log batch); without, `parse_reply`.
    """
    if hiredis is not None:
        parser = hiredis.Reader(notEnoughData=_MISS, replyError=_HiredisReplyError)
        while True:
            chunk = await reader.read(_READ_SIZE)
            if not chunk:
                raise EOFError("the server closed the connection")
            parser.feed(chunk)
            try:
                reply = parser.gets()
            except hiredis.ProtocolError as exc:
                raise ValueError(str(exc)) from None
            if reply is not _MISS:
                if parser.has_data():
                    raise ValueError("unexpected bytes after a reply")
                return _ErrorReply(str(reply)) if isinstance(reply, _HiredisReplyError) else reply
    data: bytes | bytearray = await reader.read(_READ_SIZE)
    while True:
        if not data:
            raise EOFError("the server closed the connection")
        try:
            reply, end = parse_reply(data)
        except _Incomplete:
            more = await reader.read(_READ_SIZE)
            if not more:
                raise EOFError("the server closed the connection") from None
            if not isinstance(data, bytearray):
                data = bytearray(data)
            data += more  # in place: a long reply grows in linear time
            continue
        if end != len(data):
            raise ValueError("unexpected bytes after a reply")
        return reply


class _HiredisReplyError(Exception):
    """An error reply, as hiredis hands it over."""


class RedisStore:
    """The run log and run state on one Redis/Valkey server or one Redis Cluster.

    On a cluster every script's keys share one hash slot (see the module
    docstring), so the same calls work on both kinds of `client`.
    """

    def __init__(self, client: aioredis.Redis | RedisCluster, *, prefix: str, where: str) -> None:
        self.client = client
        self.prefix = prefix
        self.where = where  # redacted, for error messages
        # The server's clock at a moment of this process's monotonic clock (see now()).
        self._clock: tuple[float, float] | None = None
        # redis-py's script objects run EVALSHA on the node owning the first key
        # and, on NOSCRIPT (a node that restarted or failed over), SCRIPT LOAD on
        # every primary before retrying, so they need nothing extra on a cluster.
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(getattr(_scripts, name)) for name in _scripts.__all__
        }
        self._shas = {name: script.sha.encode() for name, script in self._scripts.items()}
        # A cluster client routes each command to the node owning its keys: it keeps redis-py's path.
        self._lane = _FastLane(client) if isinstance(client, aioredis.Redis) and _lane_fits(client) else None

    @classmethod
    async def connect(
        cls, *, prefix: str, url: str | None = None, unix_socket: str | None = None, password: str | None = None
    ) -> RedisStore:
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
            values = {_text(k): _text(v) for k, v in config.items()}
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
        except RedisClusterException as exc:
            # Not a RedisError: the cluster client raises it when no node answers
            # or a slot has no node (SlotNotCoveredError).
            raise StorageError(f"cannot use the Redis Cluster at {self.where}: {exc}") from None

    async def _fast(self, parts: list[_Arg]) -> Any:
        """`parts` on the fast lane: the raw reply, or `_MISS` (no lane, or send it through redis-py)."""
        if self._lane is None:
            return _MISS
        try:
            return await self._lane.call(parts)
        except ResponseError as exc:
            raise StorageError(f"{self.where} refused a command: {exc}") from None

    async def _run(self, script: str, keys: list[str], args: list[_Arg]) -> Any:
        reply = await self._fast([b"EVALSHA", self._shas[script], len(keys), *keys, *args])
        if reply is _MISS:
            reply = await self._call(self._scripts[script](keys=keys, args=args))
        return reply

    async def _index_run(self, run_id: str, created_ms: int) -> None:
        """Add a new run to the index of runs by creation time."""
        if await self._fast([b"ZADD", self.runs_key, b"NX", created_ms, run_id]) is _MISS:
            await self._call(self.client.zadd(self.runs_key, {run_id: created_ms}, nx=True))

    def _run_keys(self, run_id: str, *parts: str) -> list[str]:
        return [self.key(run_id, part) for part in parts]

    # -- runs -------------------------------------------------------------------------

    async def acquire(
        self,
        run_id: str,
        *,
        workflow: str,
        holder: str,
        lease: float,
        started: bytes,
        resumed: bytes,
        take_over: str = "",
        args_digest: str = "",
        retry: bool = True,
        parent: str = "",
        process: str = "",
    ) -> AcquireResult:
        """Create run `run_id` or take it over; see `AcquireResult` for the outcomes.

        An empty `workflow`, `started` or `args_digest` means: accept any
        workflow, never create, do not compare arguments (what a worker
        passes, knowing only the run ID). `retry` lets a failed or blocked
        run resume. A holder whose name starts with `process` (the caller's
        own process) is reported busy even past its lease.
        """
        args: list[_Arg] = [
            holder, int(lease * 1000), workflow, started, resumed, take_over, args_digest, "1" if retry else "", parent,
            process,
        ]  # fmt: skip
        reply = await self._run("ACQUIRE", self._run_keys(run_id, "state", "log"), args)
        kind = _text(reply[0])
        if kind == "new":
            await self._index_run(run_id, int(reply[2]))
            return AcquireResult("new", epoch=int(reply[1]), workflow=workflow)
        if kind == "resumed":
            return AcquireResult(
                "resumed",
                epoch=int(reply[1]),
                previous=_text(reply[2]),
                retry_seq=int(reply[3]) if reply[3] else None,
                retry_index=int(reply[4]) if reply[4] else 0,
                workflow=_text(reply[5]),
                cancel=_text(reply[6]) if reply[6] else None,
            )
        if kind == "completed":
            return AcquireResult("completed", result=bytes(reply[1] or b""))
        if kind == "busy":
            return AcquireResult(
                "busy", holder=_text(reply[1]), lease_left=int(reply[2]) / 1000, workflow=_text(reply[3])
            )
        if kind == "conflict":
            return AcquireResult("conflict", workflow=_text(reply[1]))
        if kind == "cancelled":
            return AcquireResult("cancelled", cancel=_text(reply[1]))
        if kind == "ended":
            return AcquireResult("ended", previous=_text(reply[1]))
        return AcquireResult(kind)  # missing, other-arguments

    async def create(self, run_id: str, *, workflow: str, started: bytes, args_digest: str) -> tuple[str, str]:
        """Create a pending run for the queue: ``("new", "")``, ``("exists", status)``,
        ``("conflict", workflow)`` or ``("other-arguments", "")``."""
        reply = await self._run("CREATE", self._run_keys(run_id, "state", "log"), [workflow, started, args_digest])
        kind = _text(reply[0])
        if kind == "new":
            await self._index_run(run_id, int(reply[1]))
            return kind, ""
        return kind, _text(reply[1]) if len(reply) > 1 else ""

    async def renew(self, run_id: str, epoch: int, lease: float) -> tuple[bool, str | None]:
        """Extend the lease: ``(held, cancel reason or None)``; held is False once taken over."""
        reply = await self._run("RENEW", [self.key(run_id, "state")], [epoch, int(lease * 1000)])
        if not int(reply[0]):
            return False, None
        return True, _text(reply[1]) or None

    async def append(
        self, run_id: str, epoch: int, dedup: str, event: bytes, lease: float, *, seen: int | None = None
    ) -> tuple[int, str | None]:
        """Append an event once per `dedup` field: ``(index or 0 if recorded before, cancel reason)``.

        `seen` is the highest log index the caller has seen, if it checks that the
        log was not rolled back under it.

        Raises:
            _Suspend: the run was taken over (fenced), or its log rolled back.
        """
        keys = self._run_keys(run_id, "state", "log", "steps")
        reply = await self._run("APPEND", keys, [epoch, dedup, event, int(lease * 1000), _seen(seen)])
        n = int(reply[0])
        if n < 0:
            raise _refused(run_id, n)
        return n, _text(reply[1]) or None

    async def pause(
        self, run_id: str, epoch: int, event: bytes, waiting: bytes, *, seen: int | None = None
    ) -> str | None:
        """Park the run; returns a pending cancel's reason instead of parking, if there is one.

        Raises:
            _Suspend: the run was taken over (fenced), or its log rolled back (see `append`).
        """
        reply = await self._run("PAUSE", self._run_keys(run_id, "state", "log"), [epoch, event, waiting, _seen(seen)])
        if int(reply[0]) < 0:
            raise _refused(run_id, int(reply[0]))
        return _text(reply[1]) or None

    async def finish(
        self, run_id: str, epoch: int, *, status: str, event: bytes, field: str, value: bytes, failed_seq: int | None,
        seen: int | None = None,
    ) -> str:  # fmt: skip
        """Record the run's end (completed, failed, blocked or cancelled); returns its parent run or ``""``.

        Raises:
            _Suspend: the run was taken over (fenced), or its log rolled back (see `append`).
        """
        args: list[_Arg] = [epoch, status, event, field, value, "" if failed_seq is None else failed_seq, _seen(seen)]
        reply = await self._run("FINISH", self._run_keys(run_id, "state", "log"), args)
        if int(reply[0]) < 0:
            raise _refused(run_id, int(reply[0]))
        return _text(reply[1])

    async def release(self, run_id: str, epoch: int, *, pending: bool = False) -> None:
        """Give up the lease at once (the run stays resumable by anyone).

        With `pending`, a running run also becomes ``pending``: it was handed
        back to the queue and waits for a worker. Fenced (nothing happens) once
        another holder took the run over.
        """
        await self._run("RELEASE", [self.key(run_id, "state")], [epoch, "1" if pending else ""])

    async def cancel(self, run_id: str, reason: str, event: bytes) -> tuple[str, str]:
        """Cancel a run: ``(outcome, parent)``; outcome is cancelled, requested (its live
        holder stops at the next step), already-completed, already-cancelled or missing."""
        reply = await self._run("CANCEL", self._run_keys(run_id, "state", "log"), [reason, event])
        return _text(reply[0]), _text(reply[1])

    async def state(self, run_id: str) -> dict[str, bytes]:
        """The run's state hash (empty if there is no such run)."""
        raw = await self._call(self.client.hgetall(self.key(run_id, "state")))
        return {_text(k): v for k, v in raw.items()}

    async def log_ends(self, run_id: str, newest: int) -> tuple[bytes | None, list[bytes | None]]:
        """The run's first event and its `newest` last ones (newest first), undecoded."""
        key = self.key(run_id, "log")
        first = await self._call(self.client.xrange(key, count=1))
        last = await self._call(self.client.xrevrange(key, count=newest))
        head = (first[0][1] or {}).get(b"e") if first else None
        return head, [(fields or {}).get(b"e") for _, fields in last]

    async def runs_by_time(self, top: str, offset: int, count: int) -> list[tuple[str, int]]:
        """``(run ID, creation ms)`` from the run index, newest first, created at or before `top`
        (a score, ``+inf`` or ``(<score>`` for strictly before), skipping `offset`."""
        batch = await self._call(
            self.client.zrange(self.runs_key, top, "-inf", desc=True, byscore=True, offset=offset, num=count,
                               withscores=True)
        )  # fmt: skip
        return [(_text(member), int(score)) for member, score in batch]

    async def states(self, run_ids: list[str], fields: tuple[str, ...]) -> list[dict[str, bytes]]:
        """`fields` of many runs' state hashes in one round trip (absent fields left out)."""
        if not run_ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hmget(self.key(run_id, "state"), fields)
        replies = await self._call(pipe.execute())
        return [{f: v for f, v in zip(fields, reply, strict=True) if v is not None} for reply in replies]

    async def status(self, run_id: str) -> str:
        """The run's status, ``""`` if there is no such run."""
        status = await self._fast([b"HGET", self.key(run_id, "state"), b"status"])
        if status is _MISS:
            status = await self._call(self.client.hget(self.key(run_id, "state"), "status"))
        return _text(status or b"")

    async def read_log(self, run_id: str) -> AsyncIterator[list[tuple[int, bytes | None]]]:
        """The run's log in batches of ``(index, encoded event)``, oldest first.

        An entry without the expected field yields ``None`` for its body, so
        the caller can report it instead of crashing.
        """
        key = self.key(run_id, "log")
        start = "-"
        while True:
            entries = _MISS
            if self._lane is not None:
                try:
                    entries = await self._lane.call([b"XRANGE", key, start, b"+", b"COUNT", _LOG_BATCH])
                except ResponseError as exc:
                    raise StorageError(f"{self.where} refused a command: {exc}") from None
            if entries is _MISS:
                parsed = await self._call(self.client.xrange(key, min=start, max="+", count=_LOG_BATCH))
                entries = [(entry_id, [k for kv in (fields or {}).items() for k in kv]) for entry_id, fields in parsed]
            if not entries:
                return
            yield [(_entry_index(entry_id), _field(fields, b"e")) for entry_id, fields in entries]
            if len(entries) < _LOG_BATCH:
                return
            start = f"({_text(entries[-1][0])}"

    # -- hooks ------------------------------------------------------------------------

    def hook_key(self, token: str, part: str) -> str:
        """The key of `part` (box, meta, keys) of hook `token`."""
        return f"{self.prefix}{{hook:{token}}}:{part}"

    @property
    def hooks_key(self) -> str:
        """Tokens with payloads waiting, by last delivery time."""
        return f"{self.prefix}hooks"

    async def deliver(self, token: str, payload: bytes, key: str = "") -> tuple[bool, str]:
        """Store a payload for `token`, once per delivery `key` (``""``: always).

        Returns ``(stored, owner)``: False if an earlier delivery had the same
        key (nothing is stored), and the run to wake: the one that owns the
        token, or ``""`` (also for a duplicate whose payload the run has taken
        already: waking it would only replay and pause it again).
        """
        keys = [self.hook_key(token, "box"), self.hook_key(token, "meta"), self.hook_key(token, "keys")]
        # The nonce tells this call's own write, re-sent after a lost reply, from another's.
        entry, owner, outcome = await self._run("DELIVER", keys, [payload, key, os.urandom(8).hex() if key else ""])
        if _text(outcome) != "stored":
            # A duplicate must not bring a consumed token back into the index.
            return False, _text(owner) if _text(outcome) == "waiting" else ""
        ms = int(_text(entry).split("-", 1)[0])
        await self._call(self.client.zadd(self.hooks_key, {token: ms}))
        return True, _text(owner)

    async def delivered(self, token: str, key: str) -> bool:
        """Whether a delivery with `key` was stored for `token` (and not discarded since)."""
        return bool(await self._call(self.client.hexists(self.hook_key(token, "keys"), key)))

    async def take(self, token: str, run_id: str, after: str) -> tuple[str, str, bytes | None]:
        """Claim `token` for `run_id` and peek at its next payload after entry `after`.

        Returns ``("payload", entry, payload)``, ``("empty", "", None)`` or
        ``("conflict", owner, None)``.
        """
        keys = [self.hook_key(token, "box"), self.hook_key(token, "meta")]
        reply = await self._run("TAKE", keys, [run_id, after])
        kind = _text(reply[0])
        if kind == "payload":
            return kind, _text(reply[1]), bytes(reply[2]) if reply[2] else None
        if kind == "conflict":
            return kind, _text(reply[1]), None
        return kind, "", None

    async def consumed(self, token: str, entry: str) -> None:
        """Drop a payload the run recorded; forget the token in the index once none are left."""
        left = int(await self._run("CONSUMED", [self.hook_key(token, "box")], [entry]))
        if left == 0:
            await self._call(self.client.zrem(self.hooks_key, token))

    async def hook_owner(self, token: str) -> str:
        """The run that claimed hook `token`, ``""`` if none has."""
        return _text(await self._call(self.client.hget(self.hook_key(token, "meta"), "owner")) or b"")

    async def pending_hooks(self, limit: int) -> list[tuple[str, float, int, str]]:
        """Tokens with payloads waiting: ``(token, last delivery, count, owner)``, oldest first."""
        listed = await self._call(self.client.zrange(self.hooks_key, 0, limit - 1, withscores=True))
        found = []
        for raw, score in listed:
            token = _text(raw)
            count = int(await self._call(self.client.xlen(self.hook_key(token, "box"))))
            owner = _text(await self._call(self.client.hget(self.hook_key(token, "meta"), "owner")) or b"")
            found.append((token, score / 1000, count, owner))
        return found

    async def discard_hook(self, token: str) -> None:
        """Delete the payloads waiting for `token` (and its claim and delivery keys)."""
        parts = ("box", "meta", "keys")
        await self._call(self.client.delete(*(self.hook_key(token, part) for part in parts)))
        await self._call(self.client.zrem(self.hooks_key, token))

    # -- timers -----------------------------------------------------------------------

    def queue_key(self, part: str) -> str:
        """The key of `part` (queue, timers, nudge, dead, errors, probation, sweep) of the shared queue."""
        return f"{self.prefix}{{q}}:{part}"

    async def wake(self, run_id: str, at: float | None = None) -> None:
        """Make run `run_id` due at Unix time `at` (default now), unless it is due sooner.

        Workers learn of it at once (a nudge), not at their next look. The time
        counts from the server's clock: `at` is taken as a delay from now here.
        """
        delay = 0 if at is None else max(int((at - time.time()) * 1000), 0)
        await self._run("WAKE", [self.queue_key("timers"), self.queue_key("nudge")], [run_id, delay])

    async def reschedule(self, run_id: str, at: float | None) -> None:
        """Set (or with None remove) the run's timer, keeping a wake-up that is already due."""
        keys = [self.queue_key("timers"), self.queue_key("nudge")]
        await self._run("RESCHEDULE", keys, [run_id, "" if at is None else int(at * 1000)])

    async def unschedule(self, run_id: str) -> None:
        """Remove the run's timer entry."""
        # On the fast lane: every start() run that ends removes its watchdog (see _runtime.drive).
        if await self._fast([b"ZREM", self.queue_key("timers"), run_id]) is _MISS:
            await self._call(self.client.zrem(self.queue_key("timers"), run_id))

    async def due(self, run_ids: list[str]) -> list[float | None]:
        """When each run is due next (Unix time), None for no entry."""
        scores = await self._call(self.client.zmscore(self.queue_key("timers"), run_ids))
        return [None if s is None else float(s) / 1000 for s in scores]

    async def claim_timer(self, run_id: str, push: float) -> bool:
        """Take the run's due timer entry by pushing it `push` seconds ahead."""
        return bool(await self._run("CLAIM_TIMER", [self.queue_key("timers")], [run_id, int(push * 1000)]))

    async def move_due(self, limit: int = 100) -> tuple[int, float | None]:
        """Move due timers to the queue: ``(moved, seconds until the next is due, or None)``."""
        moved, wait = await self._run("MOVE_DUE", [self.queue_key("timers"), self.queue_key("queue")], [limit])
        return int(moved), None if int(wait) < 0 else int(wait) / 1000

    async def wait_for_nudge(self, block: float) -> bool:
        """Block up to `block` seconds for a nudge (a timer entry due now or sooner than
        the rest); returns whether one came. One waiting worker takes each nudge."""
        key = self.queue_key("nudge")
        # Within the socket timeout, which a longer BLPOP would run into.
        seconds = f"{min(max(block, 0.001), SOCKET_TIMEOUT - 2):.3f}"
        reply = await self._fast([b"BLPOP", key, seconds])
        if reply is _MISS:
            reply = await self._call(self.client.blpop([key], timeout=float(seconds)))
        return reply is not None

    async def claim_sweep(self, holder: str, seconds: float, *, key: str = "sweep") -> bool:
        """Whether `holder` may sweep the run index for stuck runs now: one sweep per
        `seconds` among all workers of this prefix (the queue's `key`, expiring)."""
        key = self.queue_key(key)
        return bool(await self._call(self.client.set(key, holder, nx=True, px=max(1, int(seconds * 1000)))))

    async def queued_runs(self, limit: int) -> set[str] | None:
        """The runs with a message in the queue (waiting, or taken and not yet
        acknowledged), or None when it holds more than `limit` messages."""
        key = self.queue_key("queue")
        if int(await self._call(self.client.xlen(key))) > limit:
            return None
        runs: set[str] = set()
        start = "-"
        while True:
            entries = await self._call(self.client.xrange(key, min=start, max="+", count=1000))
            runs.update(_fields(fields).get("r", "") for _, fields in entries)
            if len(entries) < 1000:
                runs.discard("")
                return runs
            start = f"({_text(entries[-1][0])}"

    # -- the queue --------------------------------------------------------------------

    async def ensure_group(self, group: str) -> None:
        """Create the consumer group (reading from the start of the queue) if missing."""
        try:
            await self.client.xgroup_create(self.queue_key("queue"), group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise StorageError(f"{self.where} refused to create the consumer group: {exc}") from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StorageError(f"cannot reach {self.where}: {exc}") from None

    async def enqueue(self, run_id: str, *, retry: bool = False) -> str:
        """Put "run or resume `run_id`" on the queue; returns the message ID."""
        fields: dict[str, str] = {"r": run_id, **({"x": "1"} if retry else {})}
        message = await self._fast([b"XADD", self.queue_key("queue"), b"*", *(p for kv in fields.items() for p in kv)])
        if message is _MISS:
            message = await self._call(self.client.xadd(self.queue_key("queue"), fields))  # type: ignore[arg-type]
        return _text(message)

    async def read_queue(self, group: str, consumer: str, count: int, block: float) -> list[tuple[str, dict[str, str]]]:
        """Up to `count` new messages for `consumer`, waiting up to `block` seconds."""
        key, ms = self.queue_key("queue"), int(block * 1000)
        reply = await self._fast(
            [b"XREADGROUP", b"GROUP", group, consumer, b"COUNT", count, b"BLOCK", ms, b"STREAMS", key, b">"]
        )
        if reply is _MISS:
            reply = await self._call(self.client.xreadgroup(group, consumer, {key: ">"}, count=count, block=ms))
        return [(_text(i), _fields(f)) for _, entries in reply or [] for i, f in entries]

    async def reclaim(
        self, group: str, consumer: str, min_idle: float, count: int, max_deliveries: int, *, suspect: bool = True,
        held: Sequence[str] = (),
    ) -> tuple[list[tuple[str, dict[str, str], bool]], list[tuple[str, str]]]:  # fmt: skip
        """Claim messages idle longer than `min_idle` seconds (their worker is gone),
        dead-lettering those delivered `max_deliveries` times.

        A message of a worker that died with nothing on probation is a suspect: at
        most one is claimed (with `suspect`), and this consumer's probation names
        it until `end_probation`. Messages in `held` (this consumer's own, in
        progress) are left alone. Returns ``(id, fields, is suspect)`` of each
        claimed message, and ``(run ID, reason)`` of each dead letter.
        """
        keys = [self.queue_key("queue"), self.queue_key("dead"), self.queue_key("errors"), self.queue_key("probation")]
        claimed: list[tuple[str, dict[str, str], bool]] = []
        buried: list[tuple[str, str]] = []
        cursor, wanted = "-", count
        # Only messages idle past the lease come back from the scan: normally none at all.
        while wanted > 0 or suspect:
            args: list[_Arg] = [
                group, consumer, int(min_idle * 1000), max(wanted, 16), max_deliveries, cursor, "1" if suspect else "",
                wanted, *held,
            ]  # fmt: skip
            nxt, entries, dead = await self._run("RECLAIM", keys, args)
            for i, f, flag in entries:
                claimed.append((_text(i), _fields(f), bool(int(flag))))
                if int(flag):
                    suspect = False
                else:
                    wanted -= 1
            buried.extend((_text(run), _text(reason)) for run, reason in dead)
            cursor = _text(nxt)
            if cursor == "0-0":
                break
        return claimed, buried

    async def end_probation(self, consumer: str, message: str) -> None:
        """`consumer`'s suspect `message` proved itself (or ended): a crash there now blames
        nobody in particular (unless its next suspect is on probation already)."""
        await self._run("END_PROBATION", [self.queue_key("probation")], [consumer, message])

    async def touch(self, group: str, consumer: str, ids: list[str]) -> set[str]:
        """Reset the idle time of messages `consumer` still owns; returns those."""
        if not ids:
            return set()
        owned = await self._run("TOUCH", [self.queue_key("queue")], [group, consumer, *ids])
        return {_text(i) for i in owned}

    async def ack(self, group: str, *ids: str) -> None:
        """Acknowledge and delete messages whose progress is in the log."""
        await self._run("ACK", [self.queue_key("queue"), self.queue_key("errors")], [group, *ids])

    async def requeue(self, group: str, message: str, run_id: str, *, retry: bool = False) -> None:
        """Hand a message back as a fresh one, readable at once; the deliveries that
        failed before this one still count toward the dead letters."""
        await self._run("REQUEUE", [self.queue_key("queue")], [group, message, run_id, "1" if retry else ""])

    async def note_error(self, message: str, error: str) -> None:
        """Remember the last error a worker hit on `message` (for its dead letter)."""
        await self._call(self.client.hset(self.queue_key("errors"), message, error[:2000]))

    async def dead_letter(self, group: str, message: str, run_id: str, reason: str) -> None:
        """Move `message` to the dead letters with `reason`."""
        keys = [self.queue_key("queue"), self.queue_key("dead"), self.queue_key("errors")]
        await self._run("DEAD", keys, [group, message, run_id, reason[:2000]])

    async def bury(self, run_id: str, source: str, reason: str) -> None:
        """Add a dead letter for something other than a queue message (a malformed
        hook payload): `source` says where it came from."""
        at = int(time.time() * 1000)
        fields = {"r": run_id, "source": source, "at": at, "reason": reason[:2000]}
        await self._call(self.client.xadd(self.queue_key("dead"), fields))  # type: ignore[arg-type]

    async def dead_letters(self, limit: int) -> list[tuple[str, dict[str, str]]]:
        """The dead letters, oldest first."""
        entries = await self._call(self.client.xrange(self.queue_key("dead"), count=limit))
        return [(_text(i), _fields(f)) for i, f in entries]

    async def redrive(self, dead_id: str) -> str:
        """Put a dead letter's run back on the queue; returns the new message ID or ``""``."""
        return _text(await self._run("REDRIVE", [self.queue_key("queue"), self.queue_key("dead")], [dead_id]))

    async def queue_depth(self, group: str) -> tuple[int, int]:
        """``(messages not yet delivered, messages pending)`` for `group`."""
        groups = await self._call(self.client.xinfo_groups(self.queue_key("queue")))
        for info in groups:
            if _text(info.get("name", b"")) == group:
                lag = info.get("lag")
                return int(lag or 0), int(info.get("pending", 0))
        return 0, 0


def _seen(seen: int | None) -> _Arg:
    return "" if seen is None else seen


def _refused(run_id: str, code: int) -> _Suspend:
    """What a run write refused with `code` (-1 fenced, -2 rolled back) raises."""
    if code == -2:
        return _Suspend(run_id, "the server's log of this run is shorter than this process saw (the server came "
                        "back from an older state); this one stops, and the run resumes from the log")  # fmt: skip
    return _Suspend(run_id, "another process took this run over; this one stops writing")


def _entry_index(entry_id: bytes | str) -> int:
    """The sequence part of a stream entry ID: ``0-<n>`` is event index n."""
    raw = entry_id if isinstance(entry_id, bytes) else entry_id.encode()
    return int(raw[raw.index(b"-") + 1 :])


def _field(fields: list[bytes] | None, name: bytes) -> bytes | None:
    """Field `name` of a stream entry given as a flat ``[field, value, ...]`` list."""
    if fields:
        if fields[0] == name:  # the only field werkfluss writes
            return fields[1]
        for i in range(2, len(fields) - 1, 2):
            if fields[i] == name:
                return fields[i + 1]
    return None


def _fields(raw: Any) -> dict[str, str]:
    """A stream entry's fields: a dict from redis-py, a flat list from a script or the fast lane."""
    if isinstance(raw, list):
        raw = dict(zip(raw[::2], raw[1::2], strict=False))
    return {_text(k): _text(v) for k, v in (raw or {}).items()}
