"""The fault-injection proxy, exercised with real sockets against Debian's redis-server."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults.proxy import FaultProxy

REDIS_SERVER = shutil.which("redis-server") or next(
    (path for path in ["/usr/bin/redis-server"] if Path(path).exists()), None
)
if REDIS_SERVER is None:
    if os.environ.get("CI"):
        pytest.fail("redis-server is missing in CI: .ci/run must install Debian's redis-server", pytrace=False)
    pytest.skip(
        "Debian's redis-server is not installed (apt-get install redis-server); the fault proxy tests need it",
        allow_module_level=True,
    )

HOST = "127.0.0.1"
PONG = b"+PONG\r\n"


def free_port() -> int:
    # redis-server cannot report a port the OS picked, so pick one here; a rare race is retried by the fixture.
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def connect(port: int, timeout: float = 5.0, name: str | None = None, lazy: bool = False) -> redis.Redis:
    """A client that never retries, so every fault reaches the test.

    It connects at once and keeps that one connection, unless ``lazy``: then it connects on first use.
    """
    return redis.Redis(
        HOST,
        port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=not lazy,
        client_name=name,
    )


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` s, a bound only a bug exceeds (the proxy answers
    in milliseconds, but its thread may wait seconds for a CPU on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.01)


def answers_ping(port: int) -> bool:
    try:
        with connect(port, timeout=1.0) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


def redis_clients_named(port: int, name: str) -> int:
    with connect(port) as direct:
        return sum(client["name"] == name for client in direct.client_list())


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Port of a throwaway redis-server on 127.0.0.1."""
    assert REDIS_SERVER is not None
    directory = tmp_path_factory.mktemp("redis")
    log = directory / "redis.log"
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(directory), "--logfile", str(log)],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline and not answers_ping(port):
            time.sleep(0.01)
        if proc.poll() is None and answers_ping(port):
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail(f"redis-server did not start: {log.read_text()[-2000:] if log.exists() else 'no log'}")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def proxy(upstream: int) -> Iterator[FaultProxy]:
    with FaultProxy(HOST, upstream) as proxy:
        yield proxy


def test_forwards_commands_and_counts_connections(proxy: FaultProxy) -> None:
    with connect(proxy.port) as client:
        assert client.ping() is True
        client.set("faults:key", b"value")
        assert client.get("faults:key") == b"value"
        assert proxy.connections == 1
        assert proxy.total_connections == 1
    wait_until(lambda: proxy.connections == 0)
    assert proxy.total_connections == 1


def test_url(proxy: FaultProxy) -> None:
    assert proxy.url() == f"redis://127.0.0.1:{proxy.port}/0"
    assert proxy.url(password="p@ss/word", db=3) == f"redis://:p%40ss%2Fword@127.0.0.1:{proxy.port}/3"
    with redis.Redis.from_url(proxy.url(db=2), socket_timeout=5) as client:
        assert client.ping() is True


def test_reset_breaks_open_connections_then_new_ones_work(proxy: FaultProxy, upstream: int) -> None:
    with connect(proxy.port, name="via-proxy") as client, socket.create_connection((HOST, proxy.port), 5) as raw:
        assert client.ping() is True
        raw.sendall(b"PING\r\n")
        assert raw.recv(64) == PONG
        assert redis_clients_named(upstream, "via-proxy") == 1

        proxy.reset()

        assert proxy.connections == 0  # reset() returns once the sockets are closed
        with pytest.raises(redis.ConnectionError):
            client.ping()
        with pytest.raises(ConnectionResetError):  # RST, not an orderly FIN that would read as b""
            raw.recv(64)
        wait_until(lambda: redis_clients_named(upstream, "via-proxy") == 0)  # the upstream side is gone as well
    with connect(proxy.port) as fresh:
        assert fresh.ping() is True
    assert proxy.total_connections == 3


def test_blackhole_times_out_then_new_connections_work(proxy: FaultProxy) -> None:
    # The first ping must succeed, so its timeout is no latency target: 2 s covers a loaded machine's stall.
    with connect(proxy.port, timeout=2.0) as client:
        assert client.ping() is True
        proxy.blackhole()
        with pytest.raises(redis.TimeoutError):
            client.ping()
    with connect(proxy.port, timeout=0.5, lazy=True) as during:
        with pytest.raises(redis.TimeoutError):
            during.ping()
    proxy.blackhole(False)
    with connect(proxy.port, timeout=5) as fresh:
        assert fresh.ping() is True


def test_blackhole_holds_bytes_and_delivers_them_when_healed(proxy: FaultProxy) -> None:
    with socket.create_connection((HOST, proxy.port), 5) as raw:
        proxy.blackhole()
        raw.sendall(b"PING\r\n")
        raw.settimeout(0.3)
        with pytest.raises(TimeoutError):
            raw.recv(64)
        # Partitioned, not closed. Waited for: the proxy's thread accepts the connection some time after the
        # kernel completed the handshake, and under load that may be after the 0.3 s above.
        wait_until(lambda: proxy.connections == 1)
        proxy.blackhole(False)
        raw.settimeout(5)
        assert raw.recv(64) == PONG


def test_latency_delays_both_directions(proxy: FaultProxy) -> None:
    with connect(proxy.port) as client:
        assert client.ping() is True  # connect before measuring
        proxy.latency(0.2)
        started = time.monotonic()
        assert client.ping() is True
        delayed = time.monotonic() - started
        proxy.latency(0)
        # The best of up to 10 pings: one ping may stall on a loaded machine; all ten would not, while a delay
        # left on delays every one of them by 0.4 s.
        undelayed = math.inf
        for _ in range(10):
            started = time.monotonic()
            assert client.ping() is True
            undelayed = min(undelayed, time.monotonic() - started)
            if undelayed < 0.4:
                break
    # Once on the way to the server and once on the way back: a lower bound, which no load can break.
    assert delayed >= 0.4
    assert undelayed < 0.4
    with pytest.raises(ValueError, match="latency"):
        proxy.latency(-1)


def test_latency_keeps_order(proxy: FaultProxy) -> None:
    expected = b"".join(b"$%d\r\n%d\r\n" % (len(str(i)), i) for i in range(20))
    with socket.create_connection((HOST, proxy.port), 5) as raw:
        proxy.latency(0.05)
        for i in range(20):
            # Separate small writes become separate chunks, each with its own delay.
            raw.sendall(b"ECHO %d\r\n" % i)
        received = b""
        while len(received) < len(expected):
            chunk = raw.recv(4096)
            assert chunk, "proxy closed the connection"
            received += chunk
    assert received == expected


def test_large_values_arrive_intact_with_latency(proxy: FaultProxy) -> None:
    value = bytes(range(256)) * 16384  # 4 MiB: many chunks, enough to fill the proxy's buffers and socket buffers
    with connect(proxy.port) as client:
        proxy.latency(0.01)
        client.set("faults:large", value)
        assert client.get("faults:large") == value


def test_unreachable_upstream_resets_clients() -> None:
    closed_port = free_port()
    with FaultProxy(HOST, closed_port) as proxy:
        with pytest.raises(ConnectionResetError), socket.create_connection((HOST, proxy.port), 5) as raw:
            raw.recv(64)
        assert proxy.total_connections == 1


def test_refuse_closes_new_connections_only(proxy: FaultProxy) -> None:
    with connect(proxy.port) as established:
        assert established.ping() is True
        proxy.refuse()
        with connect(proxy.port, lazy=True) as refused, pytest.raises(redis.ConnectionError):
            refused.ping()
        # The kernel completes the handshake, then the proxy resets the connection: usually seen on first use, but
        # on loopback the reset can win the race with connect() returning.
        with pytest.raises(ConnectionResetError), socket.create_connection((HOST, proxy.port), 5) as raw:
            raw.recv(64)
        assert established.ping() is True  # open connections are left alone
        assert proxy.connections == 1
        assert proxy.total_connections == 3
        proxy.refuse(False)
        with connect(proxy.port) as accepted:
            assert accepted.ping() is True


def test_close_is_idempotent_and_ends_everything(upstream: int) -> None:
    proxy = FaultProxy(HOST, upstream)
    with connect(proxy.port) as client:
        assert client.ping() is True
        proxy.close()
        proxy.close()
        with pytest.raises(redis.ConnectionError):
            client.ping()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, proxy.port), 5).close()
    assert proxy.connections == 0
    with pytest.raises(RuntimeError, match="closed"):
        proxy.reset()


def test_controls_work_from_inside_another_event_loop(proxy: FaultProxy) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis(
            host=HOST, port=proxy.port, socket_timeout=5, retry=redis.asyncio.retry.Retry(NoBackoff(), 0)
        )
        try:
            assert await client.ping() is True
            proxy.reset()
            with pytest.raises(redis.ConnectionError):
                await client.ping()
            assert await client.ping() is True  # the pool replaced the broken connection
        finally:
            await client.aclose()

    asyncio.run(main())
