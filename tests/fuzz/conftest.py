"""Servers for the fuzzer: the session's embedded Valkey, and a Debian redis-server of this
module's own with ``appendfsync always``, which the restart fault may SIGKILL and restart.

Hypothesis keeps a cache of constants in ``./.hypothesis`` even without an example
database; it goes to a temporary directory instead (unless HYPOTHESIS_STORAGE_DIRECTORY
says where), so a test run leaves nothing in the repository."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from ..conftest import Server
from ..servers import RedisProcess

if TYPE_CHECKING:
    from collections.abc import Iterator

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    _home = tempfile.mkdtemp(prefix="wf-hypothesis-")
    set_hypothesis_home_dir(_home)
    atexit.register(shutil.rmtree, _home, True)


@pytest.fixture(scope="module")
def restartable_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    directory = tmp_path_factory.mktemp("fuzz-redis")
    with RedisProcess(directory, "--appendonly", "yes", "--appendfsync", "always") as server:
        yield server


@pytest.fixture(params=["valkey", "redis"])
def fuzz_server(request: pytest.FixtureRequest) -> tuple[Server, RedisProcess | None]:
    """The server a fuzz test runs on, and the process to restart (Redis only)."""
    if request.param == "valkey":
        return request.getfixturevalue("valkey_server"), None
    redis = request.getfixturevalue("restartable_redis")
    return Server("redis", {"WERKFLUSS_REDIS_URL": redis.url}, redis.url), redis
