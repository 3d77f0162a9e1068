"""The fast lane: the store's hot commands on connections of its own, without redis-py's per-command machinery.

`_FastLane` packs a command with `hiredis.pack_command`, writes it to a
connected redis-py connection's stream and reads the reply with a
`hiredis.Reader`: replies come back raw (bytes, ints, None, lists, dicts for
RESP3 maps), in the protocol of the client's connections, the shape the
store's redis-py fallback gives too (see `_connect`). It reads redis-py's
private connection attributes (``_reader``, ``_writer``, ``_parser``), which
is why pyproject keeps redis-py below 9.

One connection per command in flight. A connection carries one command at a
time and goes back to a free list after its reply, so a process holds as many
lane connections as it has had commands in flight at once: a worker running N
runs holds up to N (their steps' writes) plus its blocking reads (the timer
nudge's BLPOP, XREADGROUP), on top of redis-py's own pool. The lane's
connections are not counted against the pool's ``max_connections``
(10,000, which only bounds redis-py's pool). On the server they all count
against ``maxclients``, whose default, 10,000, is the same number: the bench
saw about 810 server connections for 4 workers x 2,500 runs. Past
``maxclients`` the server refuses new connections; the lane then stands
aside for a second (`_LANE_PAUSE`) and redis-py's path, refused too, ends in
a `StorageError`. Deployments with many workers of high concurrency should
raise ``maxclients`` (or lower ``concurrency``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import hiredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from ._deadline import carried, carry

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.connection import AbstractConnection

log = logging.getLogger("werkfluss")

Arg = bytes | str | int | float
"""An argument of a command, as redis-py and the fast lane send it."""

_MISS: Any = object()  # the fast lane could not serve a command: send it through redis-py
_READ_SIZE = 65536
_LANE_PAUSE = 1.0  # seconds the fast lane stands aside after it could not connect


def lane_fits(client: aioredis.Redis) -> bool:
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
    The lane writes the packed command to a connected redis-py connection's
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
        # The client's own protocol: a reply has the shape redis-py's path gives it (see _connect).
        conn = self._pool.connection_class(**self._pool.connection_kwargs)
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

    async def call(self, parts: tuple[Arg, ...]) -> Any:
        """Send one command; returns its reply, or `_MISS` to use redis-py instead.

        Raises:
            ResponseError: the server refused the command (not NOSCRIPT, not a connection error).
        """
        if self.closed or not self.enabled:
            return _MISS
        if carried.get() is not None:  # a new call: the deadline of the last one is no longer ours
            carried.set(None)
        # Before taking a connection: an argument may not encode. (hiredis's stub types a 1-tuple.)
        command = hiredis.pack_command(parts)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        now = loop.time()  # one clock read per call: idle times and the reply's deadline
        conn = self._reuse(now) or await self._connect()
        if conn is None:
            self.misses += 1
            carry(now, self._budget)
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
            carry(now, self._budget)
            return _MISS
        finally:
            if done and not self.closed:
                self._waiting.pop(conn, None)
                self._idle.append((conn, now))
            else:
                self._drop(conn)
        if isinstance(reply, _ErrorReply):
            message = str(reply)
            error = self._parser.parse_error(message) if self._parser is not None else ResponseError(message)
            if isinstance(error, (NoScriptError, RedisConnectionError)):
                self.misses += not isinstance(error, NoScriptError)
                carry(now, self._budget)
                return _MISS
            raise error
        return reply


async def _read_reply(reader: asyncio.StreamReader) -> Any:
    """Read exactly one reply (the lane never has more than one outstanding), an error reply as an `_ErrorReply`.

    Raises:
        EOFError: the server closed the connection.
        ValueError: the bytes are not RESP, or more follow the reply.
    """
    parser = hiredis.Reader(notEnoughData=_MISS, replyError=_ErrorReply)
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
            return reply


class _ErrorReply(Exception):
    """An error reply (``-ERR ...``), as hiredis hands it over: its text is the message, classified later."""
