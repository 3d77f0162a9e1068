"""Tests for tests/servers.py: each helper starts real redis-server processes, and plain
redis-py shows they do what they claim (restart without loss, a working cluster, TLS
that checks its CA, ACL users that cannot leave their key prefix)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from .servers import (
    PortInUseError,
    RedisCluster3,
    RedisProcess,
    RedisStartError,
    add_acl_user,
    require_binary,
    tls_redis,
)


def _redis_children() -> set[int]:
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith("redis-server"):
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


@pytest.fixture(autouse=True)
def no_leaked_servers() -> Iterator[None]:
    """Every redis-server a test starts is gone when it ends (session fixtures' servers excepted)."""
    before = _redis_children()
    yield
    assert _redis_children() - before == set()


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid)


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


# -- finding redis-server -----------------------------------------------------------


def test_missing_binary_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        require_binary("redis-server")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="redis-server is missing in CI"):
        RedisProcess("/nonexistent")


# -- RedisProcess -------------------------------------------------------------------


def test_restart_after_sigkill_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    with RedisProcess(tmp_path, "--appendonly", "yes", "--appendfsync", "always", unix_socket=True) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}"
        assert server.unix_url == f"unix://{tmp_path / 'redis.sock'}"
        first_pid = server.pid
        with server.client() as client:
            for i in range(200):
                client.set(f"k{i}", i)
            client.xadd("stream", {"n": "1"})
        server.kill()
        assert not server.running and _gone(first_pid)
        with pytest.raises(redis.ConnectionError), server.client(retry=_no_retry()) as client:
            client.ping()

        server.restart()
        assert server.pid != first_pid
        for url in (server.url, server.unix_url):  # same port, same socket, same data
            with redis.Redis.from_url(url) as client:
                assert client.mget([f"k{i}" for i in range(200)]) == [str(i).encode() for i in range(200)]
                assert client.xlen("stream") == 1
        assert "Ready to accept connections" in server.log_file.read_text()
    assert not server.running and _gone(server.pid)


def test_clean_stop_then_restart_and_unix_only(tmp_path: Path) -> None:
    with RedisProcess(tmp_path, tcp=False, unix_socket=True, password="s3cret") as server:
        assert server.url.startswith("unix://:s3cret@/")
        with server.client() as client:
            client.set("k", "v")
        server.stop()  # SIGTERM: a clean shutdown
        server.stop()  # idempotent
        assert server.log_file.exists()
        server.restart()
        with server.client() as client:
            assert client.dbsize() == 0  # no persistence by default (--save "")


def test_a_failing_test_body_leaves_no_process(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), RedisProcess(tmp_path) as server:
        pid = server.pid
        _ = 1 / 0
    assert _gone(pid)


def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    with pytest.raises(RedisStartError, match=r"(?s)exited with status 1.*Bad directive"):
        RedisProcess(tmp_path, "--no-such-option", "x")


def test_taken_port_raises_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(PortInUseError, match="Address already in use"):
            RedisProcess(tmp_path, port=taken.getsockname()[1], timeout=5)


def test_a_long_directory_gets_a_short_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with RedisProcess(deep, tcp=False, unix_socket=True) as server, server.client() as client:
        assert client.ping()
        assert server.socket_path is not None and len(str(server.socket_path)) < 100


# -- TLS ----------------------------------------------------------------------------


async def test_tls_needs_the_ca(tmp_path: Path) -> None:
    with tls_redis(tmp_path) as server:
        assert server.url == f"rediss://127.0.0.1:{server.port}"
        with redis.Redis.from_url(server.url, ssl_ca_certs=str(server.ca_file)) as client:
            assert client.ping()
        # The system trust store does not know our CA.
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            with redis.Redis.from_url(server.url, retry=_no_retry()) as client:
                client.ping()
        # Plain text on the TLS port gets nowhere.
        plain = server.url.replace("rediss://", "redis://")
        with pytest.raises(redis.ConnectionError), redis.Redis.from_url(plain, retry=_no_retry()) as client:
            client.ping()
        # The async client (what werkfluss uses) with the CA, and the certificate's DNS name.
        for url in (server.url, server.url.replace("127.0.0.1", "localhost")):
            aclient = redis.asyncio.Redis.from_url(url, ssl_ca_certs=str(server.ca_file))
            try:
                assert await aclient.ping()
                assert await aclient.config_get("port") == {"port": "0"}  # TLS only
            finally:
                await aclient.aclose()
        # The certificate chain passes Python's strict X.509 checks too.
        context = ssl.create_default_context(cafile=str(server.ca_file))
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() is not None


# -- ACL users ----------------------------------------------------------------------


def test_acl_users_stay_inside_their_prefix(tmp_path: Path) -> None:
    with RedisProcess(tmp_path, password="admin-pw", unix_socket=True) as server:
        url_a = add_acl_user(server.url, "appA", "pw-a", "appA:")
        with server.client() as admin:
            url_b = add_acl_user(admin, "appB", "pw:b/@?", "appB:")  # a client works too; odd passwords are quoted
        assert url_a == f"redis://appA:pw-a@127.0.0.1:{server.port}"
        assert "admin-pw" not in url_a + url_b

        with redis.Redis.from_url(url_a, decode_responses=True) as a, redis.Redis.from_url(url_b) as b:
            assert a.acl_whoami() == "appA"
            # Everything a workflow library does, under its own prefix.
            a.set("appA:x", "1")
            a.hset("appA:{run}:state", mapping={"status": "running"})  # hash tags match appA:*
            a.xadd("appA:{run}:log", {"e": "started"})
            a.xgroup_create("appA:{run}:log", "workers", id="0")
            assert a.xreadgroup("workers", "w1", {"appA:{run}:log": ">"}, count=1)
            script = a.register_script("redis.call('HSET', KEYS[1], 'n', ARGV[1]) return redis.call('TIME')[1]")
            assert script(keys=["appA:{run}:state"], args=[7])  # EVALSHA, then SCRIPT LOAD on NOSCRIPT
            assert a.hget("appA:{run}:state", "n") == "7"
            assert a.info("server")["redis_version"]
            with pytest.raises(redis.exceptions.NoPermissionError):
                a.config_get("appendonly")  # werkfluss then skips its persistence warning

            # Nothing outside it: not directly, not through a script's KEYS, not through ARGV.
            with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to access one of the keys"):
                a.set("appB:x", "1")
            with pytest.raises(redis.exceptions.NoPermissionError):
                a.get("appB:x")
            with pytest.raises(redis.exceptions.NoPermissionError):
                a.eval("return redis.call('SET', KEYS[1], 1)", 1, "appB:x")
            with pytest.raises(redis.ResponseError, match="can't access at least one of the keys"):
                a.eval("return redis.call('SET', ARGV[1], 1)", 0, "appB:x")
            for forbidden in ("FLUSHALL", "KEYS *", "CONFIG SET appendonly yes", "SCRIPT FLUSH", "ACL LIST"):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    a.execute_command(*forbidden.split())

            b.set("appB:x", "mine")
            with pytest.raises(redis.exceptions.NoPermissionError):
                b.get("appA:x")
        with server.client() as admin:
            assert admin.get("appB:x") == b"mine" and admin.exists("appA:x", "appA:{run}:state") == 2

        # The same user through the unix socket, now allowed CONFIG GET: which shows why that is opt-in.
        unix_a = add_acl_user(server.unix_url, "appA", "pw-a", "appA:", config_get=True)
        assert unix_a.startswith("unix://appA:pw-a@/")
        with redis.Redis.from_url(unix_a, decode_responses=True) as a:
            assert a.get("appA:x") == "1"
            assert a.config_get("appendonly") == {"appendonly": "no"}
            assert a.config_get("requirepass") == {"requirepass": "admin-pw"}


def test_acl_prefix_is_matched_literally(tmp_path: Path) -> None:
    with RedisProcess(tmp_path) as server:
        url = add_acl_user(server.url, "odd", "pw", "a*[b]?:")
        with redis.Redis.from_url(url) as client:
            client.set("a*[b]?:k", 1)
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.set("aXbY:k", 1)  # would match if * [b] ? were glob syntax


# -- cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    with RedisCluster3(tmp_path_factory.mktemp("cluster")) as started:
        yield started
        pids = [node.pid for node in started.nodes]
    assert all(_gone(pid) for pid in pids)  # stop() ended every node


@pytest.mark.slow
def test_cluster_spreads_keys_over_three_masters(cluster: RedisCluster3) -> None:
    assert cluster.url == f"redis://127.0.0.1:{cluster.ports[0]}"
    assert len(set(cluster.ports)) == 3
    for node in cluster.nodes:
        assert (node.directory / f"nodes-{node.port}.conf").exists()
        with node.client(decode_responses=True) as client:
            info = client.execute_command("CLUSTER", "INFO")
            assert "cluster_state:ok" in info and "cluster_size:3" in info

    with cluster.client() as client:
        for i in range(100):
            client.set(f"spread:{i}", i)
        assert [client.get(f"spread:{i}") for i in (0, 50, 99)] == [b"0", b"50", b"99"]
        # A script touches several keys of one slot, thanks to a hash tag.
        script = client.register_script("redis.call('SET', KEYS[1], ARGV[1]) return redis.call('INCR', KEYS[2])")
        assert script(keys=["{run7}:state", "{run7}:seq"], args=["x"]) == 1
        assert client.get("{run7}:state") == b"x"
    counts = []
    for node in cluster.nodes:
        with node.client() as direct:
            counts.append(len(direct.keys("spread:*")))
    assert sum(counts) == 100 and all(counts), counts


@pytest.mark.slow
async def test_cluster_acl_user_on_every_node(cluster: RedisCluster3) -> None:
    url = add_acl_user(cluster.url, "appA", "pw-a", "appA:")
    for node in cluster.nodes:
        with node.client() as direct:
            assert direct.acl_getuser("appA") is not None  # ACLs are per node
    client = redis.asyncio.RedisCluster.from_url(url)
    try:
        for run in range(20):  # hash-tagged keys in many slots, so on all three nodes
            await client.hset(f"appA:{{run{run}}}:state", "status", "ok")
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.set("appB:x", 1)
    finally:
        await client.aclose()
