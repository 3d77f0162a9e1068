"""What the bench scripts share: versions and statistics for their reports, the servers they
start, worker processes, and hand-packed commands for the transport floors.

`dbos_side.py` imports this module too, and DBOS never shares a process with werkfluss: so
nothing here imports werkfluss at module level (`Embedded` does when it starts a server).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import hiredis
import redis

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Sequence

    from werkfluss import Settings
    from werkfluss._store._embedded import EmbeddedServer

__all__ = [
    "BENCH",
    "DebianRedis",
    "Embedded",
    "ReplaySample",
    "package_version",
    "parse_ints",
    "percentile",
    "read_reply",
    "reply_parser",
    "resp",
    "runs_per_sample",
    "start_processes",
    "stop_processes",
    "worker_env",
]

BENCH = Path(__file__).resolve().parent


# -- reports -------------------------------------------------------------------------------------------------------


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or ``"absent"``."""
    try:
        return dist_version(name)
    except PackageNotFoundError:
        return "absent"


def percentile(values: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def parse_ints(text: str) -> list[int]:
    """``"1,10,100_000"`` as ``[1, 10, 100000]``: the scripts' list options."""
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def runs_per_sample(n: int) -> int:
    """Runs of N steps per repetition, whose median is its sample: 15 for N <= 20, 3 for N = 100, 1 for
    N = 1000 (short runs are mostly noise alone). step_overhead.py and dbos_side.py use it alike."""
    return max(1, min(15, 300 // max(n, 1)))


@dataclass
class ReplaySample:
    """A run of `k` recorded steps: the seconds to record them (build) and to replay them in a rerun,
    and the rerun's peak memory above where it started."""

    k: int
    build_s: float = float("nan")
    replay_s: float = float("nan")
    extra_mib: float = float("nan")


# -- hand-packed commands ----------------------------------------------------------------------------------------


def resp(*parts: bytes | str | int) -> bytes:
    """One command in the Redis protocol (a RESP2 array of bulk strings), packed by hiredis."""
    return bytes(hiredis.pack_command(tuple(parts)))


class _ErrorReply(Exception):
    """An error reply (``-ERR ...``), as hiredis hands it over."""


async def read_reply(reader: asyncio.StreamReader, parser: hiredis.Reader) -> Any:
    """Read one reply from `reader` through `parser` (a ``hiredis.Reader(replyError=...)`` of the connection).

    Raises:
        RuntimeError: on an error reply (a bench command the server refused).
        ConnectionError: when the server closes the connection.
    """
    while True:
        reply = parser.gets()
        if reply is not False:
            if isinstance(reply, _ErrorReply):
                raise RuntimeError(f"the server refused a hand-packed command: {reply}")
            return reply
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        parser.feed(data)


def reply_parser() -> hiredis.Reader:
    """A parser for `read_reply`, one per connection."""
    return hiredis.Reader(replyError=_ErrorReply)


# -- servers -------------------------------------------------------------------------------------------------------


class Embedded:
    """A fresh embedded Valkey server (werkfluss's `ensure_server`) in a temp data directory, with a key
    prefix of its own; `close` stops it and deletes the directory.

    With ``start=False`` the directory is made but the server is left to the first store that opens it.
    """

    def __init__(self, label: str, *, fsync: Literal["everysec", "always"] = "everysec", start: bool = True) -> None:
        from werkfluss import Settings
        from werkfluss._store._embedded import ensure_server

        self.dir = Path(tempfile.mkdtemp(prefix=f"wfbench-{label}-"))
        self.prefix = f"wfbench-{label}-{uuid.uuid4().hex[:6]}:"
        self.settings: Settings = Settings(directory=str(self.dir), prefix=self.prefix, fsync=fsync)
        self.server: EmbeddedServer | None = ensure_server(self.dir, fsync=fsync) if start else None

    def client(self) -> redis.Redis:
        """A redis-py client of the server, for inspecting it beside werkfluss."""
        assert self.server is not None, "Embedded(start=False): no server started here"
        return redis.Redis(unix_socket_path=str(self.server.socket_path), password=self.server.password)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a worker process on this server and prefix (`worker_env`)."""
        return worker_env(self.dir, self.prefix, **extra)

    def close(self) -> None:
        """Stop the server (whoever started it) and delete its directory."""
        from werkfluss._store._embedded import stop_server

        try:
            stop_server(self.dir)
        except Exception as exc:
            print(f"stopping the server in {self.dir} failed: {exc}", file=sys.stderr)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Embedded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DebianRedis:
    """Debian's redis-server on a unix socket in a temp dir, started and stopped by us."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="wfbench-redis-"))
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start it with ``appendonly yes``, ``appendfsync everysec``; its URL once it answers PING."""
        argv = [
            self.binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        client = redis.Redis(unix_socket_path=str(self.socket))
        try:
            while True:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err}")
                with contextlib.suppress(redis.RedisError, OSError):
                    if client.ping():
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer PING within 10 s")
                time.sleep(0.02)
        finally:
            client.close()
        return f"unix://{self.socket}"

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown that flushes the AOF), then delete its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- worker processes ----------------------------------------------------------------------------------------------


def worker_env(directory: Path, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a process using the embedded server in `directory` under `prefix`, importing
    the bench modules (bench_flows, wake_flows, scale_flows) from bench/."""
    path = os.pathsep.join(p for p in [str(BENCH), os.environ.get("PYTHONPATH", "")] if p)
    env = {**os.environ, "WERKFLUSS_DIR": str(directory), "WERKFLUSS_PREFIX": prefix, "PYTHONPATH": path, **extra}
    env.pop("WERKFLUSS_REDIS_URL", None)
    return env


def start_processes(
    argv: list[str], env: dict[str, str], count: int, ready: str, logs: Path
) -> list[subprocess.Popen[bytes]]:
    """Start `count` processes (cwd bench/) and wait until each printed `ready` to its log."""
    procs = []
    for i in range(count):
        log = logs / f"proc-{uuid.uuid4().hex[:6]}-{i}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=BENCH, env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_processes(procs)
                raise RuntimeError(f"{argv[:4]} did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
    return procs


def stop_processes(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each, then wait for it (SIGKILL after 30 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
