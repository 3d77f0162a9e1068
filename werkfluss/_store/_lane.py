"""The fast lane: the store's commands on connections of its own, without redis-py's per-command machinery.

See `_FastLane`. It reads redis-py's private connection attributes
(``_reader``, ``_writer``, ``_parser``), which is why pyproject bounds redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

try:  # redis-py parses replies in C with it when it is installed; so does the fast lane
    import hiredis
except ImportError:  # pragma: no cover - a dependency, but the code works without it
    hiredis = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from collections.abc import Sequence

    import redis.asyncio as aioredis
    from redis.asyncio.connection import AbstractConnection

log = logging.getLogger("werkfluss")

_MISS: Any = object()  # the fast lane could not serve a command: send it through redis-py
_READ_SIZE = 65536
_LANE_PAUSE = 1.0  # seconds the fast lane stands aside after it could not connect

# ``(deadline, loop time of the miss)`` a fast-lane call hands to redis-py's path when it misses.
_carried: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "werkfluss_carried_deadline", default=None
)


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
