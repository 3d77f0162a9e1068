"""A small TCP fault-injection proxy for fault tests.

:class:`FaultProxy` listens on ``127.0.0.1`` (port chosen by the OS) and forwards every connection to one upstream
``(host, port)``. Faults (abrupt resets, a network partition, latency, refused connections) are switched on and off
from any thread and take effect before the call returns.

The proxy runs its own asyncio event loop in a background thread, so it serves synchronous tests and tests that run
their own event loop alike. A control call blocks the calling thread only for the moment the proxy's loop needs to
apply it (well under a millisecond); calling one from inside a coroutine therefore briefly blocks that coroutine's
loop, which fault tests can afford.

Example::

    with FaultProxy("127.0.0.1", 6379) as proxy:
        client = redis.Redis.from_url(proxy.url())
        proxy.blackhole()  # commands now time out
        proxy.blackhole(False)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import socket
import struct
import threading
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from types import TracebackType

__all__ = ["FaultProxy"]

_LISTEN_HOST = "127.0.0.1"
_CHUNK_SIZE = 64 * 1024
# Chunks read ahead of the writer per direction. Bounded so that a blackholed or delayed direction pushes back on the
# sender through TCP flow control instead of buffering without limit here.
_QUEUE_CHUNKS = 16
# Generous: a control call only waits for the proxy loop to run one short callback.
_CONTROL_TIMEOUT = 10.0
_START_TIMEOUT = 10.0


class FaultProxy:
    """Forward TCP connections from ``127.0.0.1:<port>`` to ``upstream_host:upstream_port``, injecting faults.

    The proxy starts listening in the constructor, so :attr:`port` is usable at once; the target stays readable as
    ``upstream_host`` and ``upstream_port``. Use it as a context manager or call :meth:`close` when done. Every fault
    control may be called from any thread and has taken effect when it returns; calling one after :meth:`close`
    raises :class:`RuntimeError`.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        """Start the proxy thread and listen on a port chosen by the OS.

        Raises whatever opening the listening socket raised, or :class:`TimeoutError` if the thread did not start.
        """
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self._closed = False
        self._latency = 0.0
        self._refusing = False
        self._stopping = False
        self._links: set[_Link] = set()
        self._total = 0
        self._late_upstream = 0
        self._held_upstream = 0
        # Created here, used only on the proxy loop: asyncio primitives bind to a loop on first use, not creation.
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name=f"FaultProxy->{upstream_host}:{upstream_port}", daemon=True
        )
        self._thread.start()
        try:
            port = started.result(timeout=_START_TIMEOUT)
        except BaseException:
            self._closed = True
            if started.done():
                self._thread.join()
            raise
        self._port = port

    # -- lifecycle -------------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The local port the proxy listens on (on ``127.0.0.1``)."""
        return self._port

    def url(self, password: str | None = None, db: int = 0) -> str:
        """A ``redis://`` URL that reaches the upstream through this proxy, e.g. ``redis://:pw@127.0.0.1:5123/0``."""
        auth = "" if password is None else f":{quote(password, safe='')}@"
        return f"redis://{auth}{_LISTEN_HOST}:{self._port}/{db}"

    def close(self) -> None:
        """Stop listening, abort every open connection and join the proxy thread. Calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop already ended on its own (it crashed); the thread is finishing anyway
                pass
        self._thread.join()

    def __enter__(self) -> Self:
        """Return the already running proxy."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Close the proxy."""
        self.close()

    # -- fault controls --------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Abruptly close every open client and upstream connection, sending RST; new connections are still accepted.

        Bytes the proxy still holds (delayed or blackholed) are discarded. When this returns, the sockets are closed.
        Connections still waiting in the kernel's accept queue are not affected.
        """
        self._control(self._reset_all)

    def blackhole(self, on: bool = True) -> None:
        """Simulate a network partition while ``on``: nothing is forwarded in either direction, nothing is closed.

        Bytes sent meanwhile are held, not lost: the proxy stops forwarding and, once its small per-connection buffer
        is full, stops reading, so TCP flow control stalls the senders. New connections are accepted by the kernel
        but not connected upstream until the partition ends.

        Turning it off does *not* reset existing connections: like a partition that heals before TCP gives up, held
        bytes are then delivered in order and new connections reach the upstream. To model a partition long enough
        for connections to die, call :meth:`reset` before turning the blackhole off.
        """

        async def apply() -> None:
            if on:
                self._flowing.clear()
            else:
                self._flowing.set()

        self._control(apply)

    def latency(self, seconds: float) -> None:
        """Delay every chunk forwarded from now on, in either direction, by ``seconds``; ``0`` turns the delay off.

        Chunks are delayed concurrently, not one after another, so throughput is kept and order is preserved. Chunks
        already waiting keep the delay they were read with. Raises :class:`ValueError` for negative or non-finite
        values.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"latency must be a finite number of seconds >= 0, not {seconds!r}")

        async def apply() -> None:
            self._latency = float(seconds)

        self._control(apply)

    def refuse(self, on: bool = True) -> None:
        """While ``on``, close each new connection with RST right after accepting it; open connections are untouched.

        The kernel completes the TCP handshake before the proxy sees the connection, so clients see ``ECONNRESET``
        rather than ``ECONNREFUSED``: usually on first use, sometimes (on loopback) already from ``connect()``.
        """

        async def apply() -> None:
            self._refusing = on

        self._control(apply)

    @property
    def connections(self) -> int:
        """Number of client connections currently open through the proxy (refused ones are never counted)."""
        return len(self._links)

    @property
    def total_connections(self) -> int:
        """Number of client connections accepted since the proxy started, including refused ones."""
        return self._total

    @property
    def held_bytes_upstream(self) -> int:
        """Bytes clients sent on connected links while a blackhole was on (held, not yet or since delivered).

        What a client sends on a connection opened during the blackhole is not among them: the
        proxy reads it only once the connection reaches the upstream, after the heal.
        """
        return self._held_upstream

    @property
    def late_bytes_upstream(self) -> int:
        """Bytes clients sent while a blackhole was on that reached the upstream once it was off.

        Held bytes arrive even from a client that gave up and closed its connection meanwhile
        (its FIN is held behind them), as packets still in flight when a real partition heals:
        the late writes a fence has to refuse.
        """
        return self._late_upstream

    # -- proxy thread ----------------------------------------------------------------------------------------------

    def _control(self, apply: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # The lock keeps close() from stopping the loop while a control is in flight, which would leave the caller
        # waiting on a coroutine that never runs.
        with self._lock:
            if self._closed:
                raise RuntimeError("FaultProxy is closed")
            coro = apply()
            try:
                future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            except RuntimeError:  # the loop died on its own
                coro.close()
                raise
            future.result(timeout=_CONTROL_TIMEOUT)

    def _run(self, started: concurrent.futures.Future[int]) -> None:
        try:
            asyncio.run(self._serve(started))
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            else:
                raise

    async def _serve(self, started: concurrent.futures.Future[int]) -> None:
        self._loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self._accept, _LISTEN_HOST, 0)
        try:
            started.set_result(server.sockets[0].getsockname()[1])
            await self._stop.wait()
        finally:
            self._stopping = True
            server.close()
            await self._reset_all()
            # Since Python 3.12 this also waits for the connections, hence after aborting them.
            await server.wait_closed()

    def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # Synchronous on purpose: asyncio calls it as soon as the connection is made, so every connection is counted
        # and registered at once; a coroutine would start a loop iteration later and could miss a reset() or close().
        self._total += 1
        if self._refusing or self._stopping:
            _abort(client_writer)
            return
        link = _Link(client_writer)
        link.task = asyncio.create_task(self._handle(link, client_reader))
        self._links.add(link)

    async def _reset_all(self) -> None:
        links = list(self._links)
        for link in links:
            link.abort()
        if links:
            await asyncio.wait([link.task for link in links])
        for link in links:
            # Also covers a task cancelled before it ever ran, whose own cleanup therefore never ran either.
            await link.wait_closed()
            self._links.discard(link)

    async def _handle(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        try:
            await self._flowing.wait()
            upstream_reader, upstream_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            link.upstream = upstream_writer
            async with asyncio.TaskGroup() as group:
                group.create_task(self._forward(link, client_reader, upstream_writer, upstream=True))
                group.create_task(self._forward(link, upstream_reader, link.client))
            link.client.close()
            upstream_writer.close()
        except OSError:
            # The upstream is unreachable: tell the client the way a dead server would.
            link.abort(cancel=False)
        finally:
            try:
                # Wait for the sockets to be really closed, so that reset() and close() return only once they are
                # and no transport outlives the loop. Shielded because reset() may cancel this task meanwhile.
                await asyncio.shield(link.wait_closed())
            finally:
                self._links.discard(link)

    async def _forward(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool = False
    ) -> None:
        # One reader and one writer task per direction, so that delays overlap (latency, not lower bandwidth) while
        # the single writer keeps the order.
        queue: asyncio.Queue[tuple[float, bytes, bool] | None] = asyncio.Queue(maxsize=_QUEUE_CHUNKS)
        loop = asyncio.get_running_loop()

        async def receive() -> None:
            try:
                while chunk := await reader.read(_CHUNK_SIZE):
                    held = not self._flowing.is_set()
                    if held and upstream:
                        self._held_upstream += len(chunk)
                    await queue.put((loop.time() + self._latency, chunk, held))
            except OSError:
                link.abort()  # pass a reset on from one side to the other
                return
            await queue.put(None)

        receiver = asyncio.create_task(receive())
        try:
            while (item := await queue.get()) is not None:
                deadline, chunk, held = item
                if (remaining := deadline - loop.time()) > 0:
                    await asyncio.sleep(remaining)
                held = held or not self._flowing.is_set()
                await self._flowing.wait()
                writer.write(chunk)
                await writer.drain()
                if held and upstream:
                    self._late_upstream += len(chunk)
            # Pass a half-close on: the peer may still answer after its input ended.
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        except OSError:
            link.abort()
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)


class _Link:
    """One client connection and, once connected, its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.task: asyncio.Task[None]
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.aborted = False

    def abort(self, *, cancel: bool = True) -> None:
        """Reset both sockets and, unless ``cancel`` is false, stop the link's task. Idempotent."""
        if self.aborted:
            return
        self.aborted = True
        _abort(self.client)
        if self.upstream is not None:
            _abort(self.upstream)
        if cancel:
            self.task.cancel()

    async def wait_closed(self) -> None:
        """Wait until both sockets are closed."""
        await _closed(self.client)
        if self.upstream is not None:
            await _closed(self.upstream)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close the connection at once, discarding buffered data, with RST rather than FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            # Linger on with a zero timeout makes close() send RST, as a crashed peer or a middlebox would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:  # already closed by the peer's reset; RST or not no longer matters
            pass
    writer.transport.abort()


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Wait until the connection is closed, whatever error closed it."""
    if not writer.is_closing():
        writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
