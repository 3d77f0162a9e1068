"""R-38: the embedded Valkey server, inspected while it runs: no TCP listener at all, the
unix socket and data directory private to this user, a password required, AOF on; and
another OS user can reach neither the socket nor the password file."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from werkfluss._store._embedded import ensure_server, stop_server

from .harness import report

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.slow

OTHER_USER = 65534  # nobody

AS_OTHER_USER = """
import socket, sys
results = []
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    results.append("socket:connected")
except OSError as exc:
    results.append(f"socket:{type(exc).__name__}")
try:
    open(sys.argv[2]).read()
    results.append("password:read")
except OSError as exc:
    results.append(f"password:{type(exc).__name__}")
print(" ".join(results))
"""


def _text(value: bytes | str | None) -> str:
    if value is None:  # redis-py types a CONFIG GET value as optional
        return ""
    return value.decode() if isinstance(value, bytes) else value


def as_other_user(*args: str) -> str | None:
    """Run `AS_OTHER_USER` as user nobody; None when this process cannot switch users, or
    no Python interpreter is executable by nobody (a venv under /root is not)."""
    if os.geteuid() != 0:
        return None
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]):
        if not python:
            continue
        try:
            done = subprocess.run(
                [python, "-c", AS_OTHER_USER, *args], user=OTHER_USER, group=OTHER_USER, extra_groups=[],
                cwd="/", capture_output=True, text=True, timeout=30,
            )  # fmt: skip
        except PermissionError:
            continue
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()
    return None


@pytest.fixture
def data_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="wf-r38-"))  # short: the socket lives inside
    yield directory
    stop_server(directory)
    shutil.rmtree(directory, ignore_errors=True)


def test_r38_the_embedded_server_listens_on_a_private_unix_socket_only(data_dir: Path) -> None:
    server = ensure_server(data_dir)
    proc = psutil.Process(server.pid)
    tcp = proc.net_connections(kind="inet")
    assert tcp == [], f"the embedded server has TCP sockets: {tcp}"
    no_retry = Retry(NoBackoff(), 0)
    with pytest.raises(redis.AuthenticationError):  # the socket alone is not enough
        redis.Redis(unix_socket_path=str(server.socket_path), retry=no_retry).ping()
    client = redis.Redis.from_url(server.url(), retry=no_retry)
    try:
        config = {_text(k): _text(v) for k, v in client.config_get("*").items()}
        persistence = client.info("persistence")
    finally:
        client.close()
    assert config["port"] == "0" and config["appendonly"] == "yes" and config["requirepass"]
    assert config["unixsocketperm"] == "700", config["unixsocketperm"]
    assert persistence["aof_enabled"] == 1
    modes = {
        "data directory": stat.S_IMODE(data_dir.stat().st_mode),
        "socket": stat.S_IMODE(server.socket_path.stat().st_mode),
        "password file": stat.S_IMODE((data_dir / "password").stat().st_mode),
        "config file": stat.S_IMODE((data_dir / "valkey.conf").stat().st_mode),
    }
    assert modes == {"data directory": 0o700, "socket": 0o700, "password file": 0o600, "config file": 0o600}
    assert (data_dir / "appendonlydir").is_dir()
    other_user = as_other_user(str(server.socket_path), str(data_dir / "password"))
    if other_user is not None:
        assert other_user == "socket:PermissionError password:PermissionError"
    report(
        "R-38 embedded server",
        tcp_listeners=len([c for c in tcp if c.status == psutil.CONN_LISTEN]),
        tcp_sockets=len(tcp),
        file_modes={name: oct(mode) for name, mode in modes.items()},
        aof_enabled="yes",
        requirepass_set="yes",
        unauthenticated_ping="refused",
        other_os_user=other_user or "not tested: cannot run a process as another user here",
    )
