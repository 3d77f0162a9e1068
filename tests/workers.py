"""Real worker processes for tests: ``python -m werkfluss worker MODULE`` pointed at one
server and key prefix, started, waited for, SIGKILLed and stopped.

Shared by tests/test_worker.py and the fault suite in tests/faults/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from .conftest import ROOT, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Server

__all__ = ["Workers", "server_env"]


def server_env(server: Server, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a process that uses `server` under `prefix`, importing from the repository."""
    env = {**os.environ, **server.env, "WERKFLUSS_PREFIX": prefix, "PYTHONPATH": str(ROOT), **extra}
    env.pop("WERKFLUSS_REDIS_URL" if server.kind == "valkey" else "WERKFLUSS_DIR", None)
    return env


class Workers:
    """Worker processes (``werkfluss worker <module>``) sharing one environment.

    Each process logs to ``<tmp>/worker-<n>.log``. `start` waits until the worker
    serves; `spawn` does not (for a replacement started while something else happens).
    """

    def __init__(
        self, env: dict[str, str], tmp: Path, module: str = "tests.worker_flows", *, concurrency: int = 8
    ) -> None:
        self.env = env
        self.tmp = tmp
        self.module = module
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed: set[int] = set()
        self.concurrency = concurrency
        self.logs: dict[int, Path] = {}

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a worker process with extra command-line `args` and environment `env`; do not wait."""
        path = self.tmp / f"worker-{len(self.procs)}.log"
        with open(path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "werkfluss", "worker", self.module, "--log-level", "INFO",
                 "--concurrency", str(self.concurrency), *args],
                cwd=ROOT, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs.append(proc)
        self.logs[proc.pid] = path
        return proc

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a worker process and wait until it serves."""
        proc = self.spawn(*args, env=env)
        self.wait_serving(proc)
        return proc

    def wait_serving(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        path = self.logs[proc.pid]
        wait_for(lambda: b"serving" in path.read_bytes() or proc.poll() is not None, timeout, "a worker to start")
        assert proc.poll() is None, self.log(proc)

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """What the worker wrote so far."""
        return self.logs[proc.pid].read_text(errors="replace")

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and reap it."""
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.killed.add(proc.pid)

    def stop_all(self, *, graceful: bool = True) -> None:
        """SIGTERM every worker (SIGKILL after 15 s), or SIGKILL them at once; reap all."""
        for proc in self.procs:
            if proc.poll() is None:
                if graceful:
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
                else:
                    proc.kill()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
