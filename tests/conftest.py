"""Shared fixtures: real servers (embedded Valkey and Debian's redis-server), a
fresh key prefix per test, and helpers to run scripts in real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from werkfluss import Settings
from werkfluss._store._embedded import ensure_server, stop_server
from werkfluss._store._open import close_stores

from .servers import RedisCluster3

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from .helpers import Cli

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Server:
    """A server the tests talk to: its kind and how a process reaches it."""

    kind: str  # "valkey" (embedded), "redis" (Debian's redis-server) or "cluster" (3 masters)
    env: dict[str, str]  # environment that points werkfluss at it
    url: str  # redis-py URL with credentials, for direct inspection

    def settings(self, prefix: str) -> Settings:
        if "WERKFLUSS_REDIS_URL" in self.env:
            return Settings(redis_url=self.env["WERKFLUSS_REDIS_URL"], prefix=prefix)
        return Settings(directory=self.env["WERKFLUSS_DIR"], prefix=prefix)


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[Server]:
    directory = Path(tempfile.mkdtemp(prefix="wf-valkey-"))
    server = ensure_server(directory)
    yield Server("valkey", {"WERKFLUSS_DIR": str(directory)}, server.url())
    stop_server(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Server]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing in CI: .ci/run must install Debian's redis-server")
        pytest.skip("Debian's redis-server is not installed (apt-get install redis-server)")
    directory = Path(tempfile.mkdtemp(prefix="wf-redis-"))
    sock = directory / "redis.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--dir", str(directory),
         "--appendonly", "yes", "--save", "", "--daemonize", "no", "--logfile", str(directory / "redis.log")],
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not sock.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"redis-server did not start: {(directory / 'redis.log').read_text()[-2000:]}")
        time.sleep(0.01)
    url = f"unix://{sock}"
    yield Server("redis", {"WERKFLUSS_REDIS_URL": url}, url)
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A local three-master Redis Cluster (tests/servers.py), formed on first use (just over 2 s).

    Not among `server`'s params: a module that runs its tests on the cluster too overrides
    `server` with params ``["valkey", "redis", "cluster"]``. Processes reach it over TCP; a URL
    naming one node gets werkfluss a cluster client."""
    nodes = RedisCluster3(tmp_path_factory.mktemp("cluster"), "--appendonly", "yes")  # as redis_server: no warning
    yield Server("cluster", {"WERKFLUSS_REDIS_URL": nodes.url}, nodes.url)
    nodes.stop()


@pytest.fixture(params=["valkey", "redis"])
def server(request: pytest.FixtureRequest) -> Server:
    """Each test using this runs once on the embedded Valkey and once on Redis."""
    return request.getfixturevalue(f"{request.param}_server")  # type: ignore[no-any-return]


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix: tests share servers, never keys."""
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def settings(server: Server, prefix: str) -> Settings:
    return server.settings(prefix)


@pytest.fixture
async def wf(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[Settings]:
    """`settings` for a test that runs workflows in this process.

    What the test module counts across calls (the counters and flags its module-level
    ``RESET`` names) is cleared before the test; the stores this process opened are closed
    after it, so the next test's event loop opens its own.
    """
    for state in getattr(request.module, "RESET", ()):
        state.clear()
    yield settings
    await close_stores()


@pytest.fixture
def cli(server: Server, prefix: str) -> Cli:
    """Run the `werkfluss` console script against the test's server and prefix (the repo on its path,
    so that ``werkfluss worker tests.some_module`` finds the tests' modules)."""
    from .helpers import run_cli

    async def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **server.env, "WERKFLUSS_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
        env.pop("WERKFLUSS_REDIS_URL" if server.kind == "valkey" else "WERKFLUSS_DIR", None)
        return await run_cli(*args, env=env, stdin=stdin)

    return run


@pytest.fixture
def run_script(tmp_path: Path, server: Server, prefix: str) -> Callable[..., subprocess.Popen[str]]:
    """Start `python <script>` in a real process pointed at the test's server and prefix."""

    def start(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        full = {**os.environ, **server.env, "WERKFLUSS_PREFIX": prefix, "PYTHONPATH": str(ROOT), **(env or {})}
        full.pop("WERKFLUSS_REDIS_URL" if server.kind == "valkey" else "WERKFLUSS_DIR", None)
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=tmp_path,
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    return start


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
