"""Servers a fault scenario kills, restarts, rolls back or corrupts (`Target`, made by conftest's
``target`` fixture), and what the workers logged about it (`worker_troubles`).

R-07/R-08 (test_store_restarts.py), R-09/R-10 (test_aof.py) and R-22 (test_timers_restart.py) use them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from werkfluss import Settings
from werkfluss._store._embedded import ensure_server, stop_server

from ..servers import RedisProcess, require_binary
from .harness import LEASE

if TYPE_CHECKING:
    from .harness import Faults

__all__ = ["Target", "worker_troubles"]


class Target:
    """A server this test may kill and restart, and how processes reach it."""

    def __init__(self, kind: str, fsync: str, tmp: Path) -> None:
        self.kind = kind
        self.fsync = fsync
        self.redis: RedisProcess | None = None
        self.directory: Path | None = None
        if kind == "redis":
            require_binary("redis-server")
            self.redis = RedisProcess(tmp / "redis", "--appendonly", "yes", "--appendfsync", fsync)
            self.url = self.redis.url
            self.env = {"WERKFLUSS_REDIS_URL": self.url}
        else:
            self.directory = Path(tempfile.mkdtemp(prefix="wf-restart-"))  # short: the socket lives inside
            self.url = ensure_server(self.directory, fsync=fsync).url()
            self.env = {"WERKFLUSS_DIR": str(self.directory), "WERKFLUSS_FSYNC": fsync}

    def settings(self, prefix: str) -> Settings:
        if self.redis is not None:
            return Settings(redis_url=self.url, prefix=prefix, lease=LEASE)
        assert self.directory is not None
        return Settings(directory=str(self.directory), prefix=prefix, lease=LEASE, fsync=self.fsync)  # type: ignore[arg-type]

    def kill(self) -> None:
        if self.redis is not None:
            self.redis.kill()
            return
        assert self.directory is not None
        pid = int((self.directory / "valkey.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a daemon: not our child, so we cannot wait() for it
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.01)
        pytest.fail(f"valkey-server {pid} survived SIGKILL")

    def restart(self) -> None:
        if self.redis is not None:
            self.redis.restart()
        else:
            assert self.directory is not None
            ensure_server(self.directory, fsync=self.fsync)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        elif self.directory is not None:
            stop_server(self.directory)
            shutil.rmtree(self.directory, ignore_errors=True)


def worker_troubles(faults: Faults) -> tuple[Counter[str], int]:
    """Warnings and errors the workers logged, by the exception type they name; and tracebacks."""
    kinds: Counter[str] = Counter()
    tracebacks = 0
    for proc in faults.workers.procs:
        for line in faults.workers.log(proc).splitlines():
            tracebacks += line.startswith("Traceback")
            if " WARNING " in line or " ERROR " in line:
                found = re.search(r"\b([A-Z]\w*(?:Error|Exception))\b", line)
                kinds[found.group(1) if found else "other"] += 1
    return kinds, tracebacks
