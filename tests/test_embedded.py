"""Tests for the embedded, shared Valkey server (real processes, no mocks)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from werkfluss._errors import ConfigurationError, StorageError
from werkfluss._store._embedded import EmbeddedServer, ensure_server, server_status, stop_server

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "wf"
    yield directory
    stop_server(directory)


def _client(server: EmbeddedServer) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(server.socket_path), password=server.password)


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return  # Orphans may never be reaped in containers whose PID 1 does not.
        except psutil.NoSuchProcess:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still alive")


def _is_alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _servers_for(directory: Path) -> list[int]:
    """Pids of live valkey-server processes whose working directory is ``directory``."""
    pids = []
    for proc in psutil.process_iter(["name", "status"]):
        try:
            if (
                proc.info["status"] != psutil.STATUS_ZOMBIE
                and "valkey-server" in (proc.info["name"] or "")
                and proc.cwd() == str(directory)
            ):
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_data_persists_across_restart(data_dir: Path) -> None:
    server = ensure_server(data_dir)
    assert server.directory == data_dir.resolve()
    assert server.socket_path == data_dir.resolve() / "valkey.sock"
    _client(server).set("greeting", "hallo")
    assert stop_server(data_dir)
    assert not _is_alive(server.pid)
    assert server_status(data_dir) is None
    assert not stop_server(data_dir)

    restarted = ensure_server(data_dir)
    assert restarted.pid != server.pid
    assert restarted.password == server.password
    assert _client(restarted).get("greeting") == b"hallo"
    assert (data_dir / "appendonlydir").is_dir()
    assert list((data_dir / "appendonlydir").glob("*.manifest"))


def test_url_carries_password_and_repr_hides_it(data_dir: Path) -> None:
    server = ensure_server(data_dir)
    client = redis.Redis.from_url(server.url())
    assert client.ping()
    assert server.password not in repr(server)
    assert server.password not in server.redacted_url()


def test_security(data_dir: Path) -> None:
    server = ensure_server(data_dir)
    proc = psutil.Process(server.pid)
    assert proc.net_connections(kind="inet") == []
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "password").stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "valkey.conf").stat().st_mode) == 0o600
    assert server.password not in " ".join(proc.cmdline())
    no_retry = Retry(NoBackoff(), 0)  # redis-py would otherwise retry auth failures with backoff.
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=str(server.socket_path), retry=no_retry).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=str(server.socket_path), password="wrong", retry=no_retry).ping()


def test_existing_directory_is_made_private(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    ensure_server(data_dir)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


def test_reuse_returns_same_server(data_dir: Path) -> None:
    first = ensure_server(data_dir)
    assert ensure_server(data_dir) == first
    assert server_status(data_dir) == first
    assert _servers_for(first.directory) == [first.pid]


def test_threads_share_one_server(data_dir: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        pids = set(pool.map(lambda _: ensure_server(data_dir).pid, range(4)))
    assert len(pids) == 1
    assert _servers_for(data_dir.resolve()) == list(pids)


def test_server_status_never_starts(tmp_path: Path) -> None:
    assert server_status(tmp_path / "missing") is None
    assert not (tmp_path / "missing").exists()
    assert not stop_server(tmp_path / "missing")


def test_server_survives_sigkill_of_starter(data_dir: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from werkfluss._store._embedded import ensure_server\n"
        "print(ensure_server(Path(sys.argv[1])).pid, flush=True)\n"
        "sys.stdin.readline()\n"
    )
    with _python(code, str(data_dir)) as starter:
        assert starter.stdout is not None
        pid = int(starter.stdout.readline())
        starter.send_signal(signal.SIGKILL)
        assert starter.wait(timeout=10) == -signal.SIGKILL
    assert _is_alive(pid)
    assert ensure_server(data_dir).pid == pid


def test_restart_after_server_sigkill_keeps_data(data_dir: Path) -> None:
    server = ensure_server(data_dir, fsync="always")
    _client(server).set("durable", "yes")
    os.kill(server.pid, signal.SIGKILL)
    _wait_dead(server.pid)
    assert server.socket_path.exists()  # Stale socket left behind.
    assert (data_dir / "valkey.pid").exists()  # Stale pidfile too.
    assert server_status(data_dir) is None

    restarted = ensure_server(data_dir)
    assert restarted.pid != server.pid
    assert _client(restarted).get("durable") == b"yes"


def test_concurrent_processes_start_one_server(data_dir: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from werkfluss._store._embedded import ensure_server\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "print(ensure_server(Path(sys.argv[1])).pid, flush=True)\n"
    )
    procs = [_python(code, str(data_dir)) for _ in range(2)]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:  # Release both at once: they race for the same fresh directory.
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    pids = {int(proc.communicate(timeout=30)[0]) for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(pids) == 1
    assert _servers_for(data_dir.resolve()) == list(pids)


def test_long_directory_path(tmp_path: Path) -> None:
    directory = tmp_path / ("long path 'with' \"quotes\" é " + "x" * 100)
    try:
        server = ensure_server(directory)
        assert len(os.fsencode(directory / "valkey.sock")) > 107
        assert len(os.fsencode(server.socket_path)) <= 107
        socket_dir = server.socket_path.parent
        assert socket_dir.name.startswith(f"werkfluss-{os.getuid()}-")
        assert stat.S_IMODE(socket_dir.lstat().st_mode) == 0o700
        _client(server).set("k", "v")
        assert server_status(directory) == server
        assert ensure_server(directory).pid == server.pid
        assert redis.Redis.from_url(server.url()).get("k") == b"v"
    finally:
        stop_server(directory)
    assert not server.socket_path.parent.exists()


def test_fsync_upgraded_never_downgraded(data_dir: Path) -> None:
    server = ensure_server(data_dir)
    client = _client(server)
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert ensure_server(data_dir, fsync="always").pid == server.pid
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    ensure_server(data_dir, fsync="everysec")
    assert client.config_get("appendfsync") == {"appendfsync": "always"}


def test_bad_fsync_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="'sometimes'"):
        ensure_server(tmp_path / "wf", fsync="sometimes")


def test_corrupt_aof_reports_log(data_dir: Path) -> None:
    server = ensure_server(data_dir, fsync="always")
    client = _client(server)
    for i in range(20):
        client.set(f"key{i}", "v" * 50)
    assert stop_server(data_dir)
    incr = next((data_dir / "appendonlydir").glob("*.incr.aof"))
    data = bytearray(incr.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"garbage!"
    incr.write_bytes(bytes(data))

    with pytest.raises(StorageError, match="valkey-check-aof") as excinfo:
        ensure_server(data_dir, timeout=5)
    assert str(data_dir.resolve()) in str(excinfo.value)
    assert "Bad file format" in str(excinfo.value)
    assert incr.exists()  # Data files are never deleted.
